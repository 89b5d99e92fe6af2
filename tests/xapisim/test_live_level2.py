"""docs/level2.md by hand on the live bed: a VM's disk routed through its host's AM, a secondary VM on the peer
host, and a crash of the primary host after which the secondary VM serves on the same address with every
acknowledged record. Root only; no console: the XenAPI package against xapisim and the AMs' HTTP API.

One bed for the module (the sequence builds on itself); conditions are waited on with deadlines. The time from
the crash to the first acknowledged write on the secondary is printed (``-s`` shows it), not asserted.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import XenAPI

from tests.support import wait_for, xapi_login
from tests.xapisim.test_live import Conn, Live, alive, start_live
from tests.xapisim.test_live import pytestmark as pytestmark  # root, ip and nft, as the live bed's tests

RESOURCE_KEY = "eac_am_resource"


class AM:
    """One host's AM management API, from the simulator's namespace (the bed's uplink)."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Authorization": f"Bearer {self.token}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                text = response.read()
                return response.status, json.loads(text) if text else None
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def peer_state(self) -> str | None:
        with contextlib.suppress(OSError):
            code, body = self.call("GET", "/v1/status")
            return body["peer"]["state"] if code == 200 else None
        return None

    def resource(self, name: str) -> dict | None:
        with contextlib.suppress(OSError):
            code, body = self.call("GET", f"/v1/resources/{name}")
            return body if code == 200 else None
        return None


class Writer(threading.Thread):
    """A client in the client namespace PUTting numbered records to one address, reconnecting whenever its
    connection fails; ``acked`` maps each acknowledged sequence number to its record."""

    def __init__(self, live: Live, ip: str) -> None:
        super().__init__(name="level2-writer", daemon=True)
        self.live, self.ip = live, ip
        self.acked: dict[int, str] = {}
        self.acked_at: list[float] = []  # monotonic time of each acknowledgement
        self.errors: list[str] = []
        self.halt = threading.Event()
        self.n = 0

    def run(self) -> None:
        with self.live.ns.in_ns("client"):
            while not self.halt.is_set():
                try:
                    sock = socket.create_connection((self.ip, 7000), timeout=0.5)
                except OSError:
                    time.sleep(0.02)
                    continue
                try:
                    self._write(sock)
                except OSError:
                    pass
                finally:
                    sock.close()

    def _write(self, sock: socket.socket) -> None:
        sock.settimeout(1.0)  # an answer slower than that: the connection is dead (its host crashed)
        buffer = b""
        while not self.halt.is_set():
            self.n += 1
            record = f"record-{self.n}"
            sock.sendall(f"PUT {record}\n".encode())
            while b"\n" not in buffer:
                data = sock.recv(4096)
                if not data:
                    raise ConnectionError("closed")
                buffer += data
            line, _, buffer = buffer.partition(b"\n")
            words = line.decode().split()
            if words[:1] == ["OK"]:
                self.acked[int(words[1])] = record
                self.acked_at.append(time.monotonic())
            else:
                self.errors.append(line.decode())
            time.sleep(0.005)

    def count(self) -> int:
        return len(self.acked)

    def stop(self) -> None:
        self.halt.set()
        self.join(10)


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    cmd = start_live(tmp_path_factory.mktemp("level2"))
    live = None
    try:
        live = Live(cmd)
        yield live
    finally:
        if live is not None:
            with contextlib.suppress(Exception):
                live.session.xenapi.session.logout()
        cmd.stop()


def master_session(live: Live, hosts: int = 4):
    """(a XenAPI session, its URL) with the pool's master of now (host 1, the first master, may have crashed);
    None while no master answers (one is elected after the HA timeout)."""
    base, port = live.cmd.url.rsplit(":", 1)
    prefix = base.rsplit(".", 1)[0]
    for i in range(1, hosts + 1):
        url = f"{prefix}.{i}:{port}"
        try:
            return xapi_login(url), url
        except XenAPI.Failure as exc:
            if exc.details[0] == "HOST_IS_SLAVE":
                with contextlib.suppress(OSError, XenAPI.Failure):
                    url = f"http://{exc.details[1]}:{port}"
                    return xapi_login(url), url
        except OSError:
            continue
    return None


def bed_state(url: str) -> dict:
    with urllib.request.urlopen(url + "/sim/live", timeout=5) as response:
        return json.loads(response.read())


def connect(live: Live, ip: str) -> Conn:
    def attempt():
        with contextlib.suppress(OSError):
            return Conn(live.in_client(lambda: socket.create_connection((ip, 7000), timeout=1)))
        return None

    return wait_for(attempt, timeout=10, message=f"a guest to accept a connection on {ip}")


def first_disk(api, vm: str) -> str:
    return next(api.VBD.get_VDI(b) for b in sorted(api.VM.get_VBDs(vm), key=api.VBD.get_userdevice)
                if api.VBD.get_type(b) == "Disk" and not api.VBD.get_empty(b))


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
    assert live.guest("web-01")["disk"] == {"address": f"{info['hosts'][0]['address']}:10809", "export": name}
    conn = live.connect("web-01")
    try:  # the guest's next request goes to its new endpoint
        assert conn.ask("PUT through the AM, alone").startswith("OK ")  # no replica on host 2 yet
    finally:
        conn.close()
    assert am1.resource(name)["clients"] == 1

    # The secondary VM: a copy (through a snapshot: xapi copies only a halted VM or a snapshot) on host 2's
    # local SR, with the primary's MACs.
    local2 = api.SR.get_by_name_label("Local storage xcp-host-2")[0]
    snap = api.VM.snapshot(vm, "web-01 (eAC seed)")
    copy = api.VM.copy(snap, "web-01 (eAC secondary)", local2)
    seed_disks = [api.VBD.get_VDI(b) for b in api.VM.get_VBDs(snap) if not api.VBD.get_empty(b)]
    api.VM.destroy(snap)
    for disk in seed_disks:
        api.VDI.destroy(disk)
    api.VM.set_is_a_template(copy, False)
    for vif in api.VM.get_VIFs(copy):
        api.VIF.destroy(vif)
    for vif in api.VM.get_VIFs(vm):
        record = api.VIF.get_record(vif)
        api.VIF.create({key: record[key] for key in ("device", "network", "MAC", "MTU", "other_config",
                                                      "qos_algorithm_type", "qos_algorithm_params")} | {"VM": copy})
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
    writer = Writer(live, ip)
    writer.start()
    try:
        wait_for(lambda: writer.count() >= 50, timeout=20, message="records acknowledged before the crash")
        old_pid = live.guest("web-01")["pid"]
        crashed_at = time.monotonic()
        live.cmd.control("POST", "/sim/hosts/xcp-host-1/crash")
        before = writer.count()
        wait_for(lambda: writer.acked_at and writer.acked_at[-1] > crashed_at + 0.05 and writer.count() > before,
                 timeout=30, message="a record acknowledged after the crash")
        serving = next(t for t in writer.acked_at if t > crashed_at + 0.05)
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
