"""docs/level2.md by hand on the live bed: a VM's disk routed through its host's AM, a secondary VM on the peer
host, and a crash of the primary host after which the secondary VM serves on the same address with every
acknowledged record. Root only; no console: the XenAPI package against xapisim and the AMs' HTTP API.

One bed for the module (the sequence builds on itself); conditions are waited on with deadlines. The time from
the crash to the first acknowledged write on the secondary is printed (``-s`` shows it), not asserted.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support import wait_for
from tests.xapisim.level2_support import (
    AM,
    RESOURCE_KEY,
    Writer,
    bed_state,
    connect,
    copy_for_secondary,
    first_disk,
    master_session,
)
from tests.xapisim.test_live import alive, running_bed
from tests.xapisim.test_live import pytestmark as pytestmark  # root, ip and nft, as the live bed's tests


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    with running_bed(tmp_path_factory.mktemp("level2")) as live:
        yield live


def test_a_routed_guest_rides_out_a_dropped_disk_connection_and_is_unrouted_while_paused(bed):
    live, api = bed, bed.api
    info = live.live()
    token = (Path(info["workdir"]) / "am" / "mgmt.token").read_text().strip()
    vm = live.vm("web-02")
    host = api.VM.get_resident_on(vm)
    am = AM(api.host.get_other_config(host)["eac_am_url"], token)
    wait_for(lambda: am.peer_state() == "connected", timeout=20, message="the AM to see its peer")
    vdi = first_disk(api, vm)
    vdi_uuid, sr_uuid = api.VDI.get_uuid(vdi), api.SR.get_uuid(api.VDI.get_SR(vdi))
    name = f"vdi-{vdi_uuid}"
    api.VM.pause(vm)
    code, body = am.call("POST", "/v1/resources", {"name": name, "role": "primary", "sr": sr_uuid,
                                                    "vdi": vdi_uuid, "vm": api.VM.get_uuid(vm)})
    assert code == 201, body
    api.VDI.add_to_other_config(vdi, RESOURCE_KEY, name)
    api.VM.unpause(vm)
    writer = Writer(live, live.ip("web-02"))
    writer.start()
    try:
        wait_for(lambda: writer.count() >= 20, timeout=20, message="records through the AM")
        # The export goes away under the running guest (a demotion drops its NBD clients) and comes back: the
        # guest reconnects, sends again what was not acknowledged, and goes on.
        assert am.call("POST", f"/v1/resources/{name}/demote")[0] == 200
        assert am.resource(name)["clients"] == 0  # meanwhile the guest retries, refused by a secondary
        assert am.call("POST", f"/v1/resources/{name}/promote")[0] == 200
        count = writer.count()
        wait_for(lambda: writer.count() >= count + 20, timeout=20, message="records after the reconnection")
    finally:
        writer.stop()
    assert writer.errors == []
    # Unrouted as docs/level2.md says: paused, key removed, resource deleted, unpaused.
    api.VM.pause(vm)
    api.VDI.remove_from_other_config(vdi, RESOURCE_KEY)
    assert am.call("POST", f"/v1/resources/{name}/demote")[0] == 200
    assert am.call("DELETE", f"/v1/resources/{name}")[0] == 204
    api.VM.unpause(vm)
    conn = live.connect("web-02")
    try:
        assert conn.ask("PUT after the unprotection").startswith("OK ")
        for seq, record in writer.acked.items():
            assert conn.ask(f"GET {seq}") == f"VAL {seq} {record}"
    finally:
        conn.close()
    assert live.guest("web-02")["disk"]["export"] == vdi_uuid  # the host's disk server again


def test_a_crash_of_the_primary_host_leaves_the_secondary_vm_serving_every_acknowledged_record(bed):
    live, api = bed, bed.api
    info = live.live()
    token = (Path(info["workdir"]) / "am" / "mgmt.token").read_text().strip()
    credentials = Path(info["workdir"]) / "xapi" / "hook.json"
    assert credentials.stat().st_mode & 0o777 == 0o600 and credentials.parent.stat().st_mode & 0o777 == 0o700
    host1 = api.host.get_by_name_label("xcp-host-1")[0]
    config1 = api.host.get_other_config(host1)
    host2 = api.host.get_by_uuid(config1["eac_am_peer"])
    assert api.host.get_name_label(host2) == "xcp-host-2"
    am1, am2 = AM(config1["eac_am_url"], token), AM(api.host.get_other_config(host2)["eac_am_url"], token)
    wait_for(lambda: am1.peer_state() == "connected", timeout=20,
             message="the AMs of hosts 1 and 2 to see each other")

    # A live-guest VM on host 1.
    vm = live.vm("web-01")
    if api.VM.get_resident_on(vm) != host1:
        api.VM.pool_migrate(vm, host1, {})
    wait_for(lambda: (g := live.guest("web-01")) and g["host"] == "xcp-host-1", timeout=15,
             message="web-01's guest on host 1")
    vm_uuid, ip = api.VM.get_uuid(vm), live.ip("web-01")
    conn = live.connect("web-01")
    try:
        assert conn.ask("PUT before the protection").startswith("OK ")
    finally:
        conn.close()

    # Route its disk through host 1's AM, paused.
    vdi = first_disk(api, vm)
    vdi_uuid, sr_uuid = api.VDI.get_uuid(vdi), api.SR.get_uuid(api.VDI.get_SR(vdi))
    name = f"vdi-{vdi_uuid}"
    api.VM.pause(vm)
    code, body = am1.call("POST", "/v1/resources",
                          {"name": name, "role": "primary", "sr": sr_uuid, "vdi": vdi_uuid, "vm": vm_uuid})
    assert code == 201, body
    assert body["image"] == str(Path(info["workdir"]) / "srs" / sr_uuid / f"{vdi_uuid}.img")
    api.VDI.add_to_other_config(vdi, RESOURCE_KEY, name)
    api.VM.unpause(vm)
    # XAPI answers once the record says Running; the bed continues the guest, on its new endpoint, just after.
    routed = {"address": f"{info['hosts'][0]['address']}:10809", "export": name}
    wait_for(lambda: live.guest("web-01")["disk"] == routed, timeout=10, message="the guest on its AM's export")
    conn = live.connect("web-01")
    try:  # the guest's next request goes to its new endpoint
        assert conn.ask("PUT through the AM, alone").startswith("OK ")  # no replica on host 2 yet
    finally:
        conn.close()
    assert am1.resource(name)["clients"] == 1

    # The secondary VM: a copy (through a snapshot: xapi copies only a halted VM or a snapshot) on host 2's
    # local SR, with the primary's MACs.
    local2 = api.SR.get_by_name_label("Local storage xcp-host-2")[0]
    copy = copy_for_secondary(api, vm, "web-01", local2)
    assert sorted(api.VIF.get_MAC(v) for v in api.VM.get_VIFs(copy)) == sorted(
        api.VIF.get_MAC(v) for v in api.VM.get_VIFs(vm))
    assert api.VM.get_other_config(copy)["xapisim_live_ip"] == ip
    replica = first_disk(api, copy)
    replica_uuid = api.VDI.get_uuid(replica)
    replica_image = Path(info["workdir"]) / "srs" / api.SR.get_uuid(local2) / f"{replica_uuid}.img"
    assert replica_image.stat().st_size == int(api.VDI.get_virtual_size(vdi))
    code, body = am2.call("POST", "/v1/resources", {"name": name, "role": "secondary", "sr": api.SR.get_uuid(local2),
                                                     "vdi": replica_uuid, "vm": api.VM.get_uuid(copy)})
    assert code == 201, body
    api.VDI.add_to_other_config(replica, RESOURCE_KEY, name)
    wait_for(lambda: (am2.resource(name) or {}).get("disk") == "UpToDate", timeout=120,
             message="the secondary's full resync")
    api.VM.start_on(copy, host2, True, False)
    assert api.VM.get_power_state(copy) == "Paused" and api.VM.get_resident_on(copy) == host2
    assert all(g["vm"] != "web-01 (eAC secondary)" for g in live.live()["guests"]), "a paused copy runs nothing"

    # A client writes; host 1 crashes.
    writer = Writer(live, ip, identify=True)
    writer.start()
    try:
        wait_for(lambda: writer.count() >= 50, timeout=20, message="records acknowledged before the crash")
        old_pid = live.guest("web-01")["pid"]
        crashed_at = time.monotonic()
        live.cmd.control("POST", "/sim/hosts/xcp-host-1/crash")
        before = writer.count()
        # the primary answers until the crash call has killed it: the secondary's first answer is the measure
        served = wait_for(lambda: writer.acked_by("web-01 (eAC secondary)", after=crashed_at), timeout=30,
                          message="a record acknowledged by the secondary VM after the crash")
        serving = served[0]
        wait_for(lambda: writer.count() >= before + 20, timeout=20, message="more records on the secondary")
    finally:
        writer.stop()
    took = serving - crashed_at
    print(f"\nlevel 2 failover: {took:.2f} s from the crash of xcp-host-1 to the first record acknowledged by "
          f"the secondary VM ({before} records before, {writer.count()} in all)")
    assert not alive(old_pid)

    # The secondary VM runs on host 2, answers on the same address, and holds every acknowledged record.
    session, url = wait_for(lambda: master_session(live), timeout=20, message="a master after the crash of host 1")
    api = session.xenapi
    assert api.VM.get_power_state(copy) == "Running" and api.VM.get_resident_on(copy) == host2
    assert (am2.resource(name) or {}).get("role") == "Primary"
    guest = next(g for g in bed_state(url)["guests"] if g["vm"] == "web-01 (eAC secondary)")
    assert guest["host"] == "xcp-host-2" and guest["ip"] == ip and guest["disk"]["export"] == name
    conn = connect(live, ip)
    try:
        assert conn.ask("PING") == "PONG web-01 (eAC secondary)"
        missing = {seq: record for seq, record in writer.acked.items()
                   if conn.ask(f"GET {seq}") != f"VAL {seq} {record}"}
        assert conn.ask("GET 1") == "VAL 1 before the protection"
    finally:
        conn.close()
    assert missing == {}, f"{len(missing)} acknowledged records lost of {writer.count()}"
    assert writer.errors == []
    events = am2.call("GET", "/v1/events?after=0")[1]
    assert [e["ok"] for e in events if e["kind"] == "on-promote"] == [True]
    session.xenapi.session.logout()
