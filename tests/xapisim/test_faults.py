"""The /sim/ control API and what each fault looks like to a XAPI client."""

from __future__ import annotations

import socket
import time

import pytest
import XenAPI

from tests.support import wait_for, xapi_login
from tests.xapisim.rpc import control


def _failure(call, *args) -> list[str]:
    with pytest.raises(XenAPI.Failure) as failure:
        call(*args)
    return failure.value.details


def _refused(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sim_state_lists_hosts_vms_and_faults(sim):
    status, state = control(sim.url, "GET", "/sim/state")
    assert status == 200
    assert [h["name"] for h in state["hosts"]] == [f"xcp-host-{i}" for i in range(1, 5)]
    assert [h["address"] for h in state["hosts"]] == [f"127.0.0.{i}" for i in range(1, 5)]
    assert [h["master"] for h in state["hosts"]] == [True, False, False, False]
    assert all(h["live"] for h in state["hosts"])
    web = next(v for v in state["vms"] if v["name"] == "web-01")
    assert (web["power_state"], web["host"]) == ("Running", "xcp-host-1")
    assert len(state["vms"]) == len(sim.engine.store.tables["VM"]), "every VM record, as a client counts them"
    assert state["faults"] == {"crashed_hosts": [], "slow_hosts": {}, "pif_carrier_down": [], "pbd_failed": []}


def test_host_crash_without_ha_halts_its_vms_after_the_timeout(make_sim):
    # Long enough a timeout to look at the pool between the crash and its detection.
    sim = make_sim(ha_timeout=2.0)
    try:
        _check_host_crash_without_ha(xapi_login(sim.url).xenapi, sim)
    finally:
        sim.stop()


def _check_host_crash_without_ha(api, sim) -> None:
    host = api.host.get_by_name_label("xcp-host-3")[0]
    metrics = api.host.get_metrics(host)
    guests = [vm for vm in api.host.get_resident_VMs(host) if not api.VM.get_is_control_domain(vm)]
    assert guests
    status, body = control(sim.url, "POST", "/sim/hosts/xcp-host-3/crash")
    assert status == 200 and body["powered_on"] is False
    assert _refused(sim.url_of(2)), "a crashed host does not answer"
    assert api.host_metrics.get_live(metrics) is True
    # xapi still thinks the host is up but cannot reach it.
    assert _failure(api.VM.clean_shutdown, guests[0]) == ["HOST_OFFLINE", host]
    halted = api.VM.get_by_name_label("dev-sandbox")[0]
    assert _failure(api.VM.start_on, halted, host, False, False) == ["HOST_OFFLINE", host]
    wait_for(lambda: not api.host_metrics.get_live(metrics), timeout=10, message="host declared dead")
    assert _failure(api.VM.start_on, halted, host, False, False) == ["HOST_NOT_LIVE"]
    for vm in guests:
        assert (api.VM.get_power_state(vm), api.VM.get_resident_on(vm)) == ("Halted", "OpaqueRef:NULL")
    assert not any(m["name"] == "HA_HOST_FAILED" for m in api.message.get_all_records().values())
    assert control(sim.url, "GET", "/sim/state")[1]["faults"]["crashed_hosts"] == ["xcp-host-3"]
    assert control(sim.url, "POST", "/sim/hosts/xcp-host-3/crash")[0] == 409

    assert control(sim.url, "POST", "/sim/hosts/xcp-host-3/power-on")[0] == 200
    wait_for(lambda: api.host_metrics.get_live(metrics), timeout=10, message="host back")
    assert not _refused(sim.url_of(2))
    assert _failure(xapi_login, sim.url_of(2)) == ["HOST_IS_SLAVE", "127.0.0.1"]
    assert all(api.VM.get_power_state(vm) == "Halted" for vm in guests), "without HA nothing restarts"


def test_master_crash_elects_a_new_master_and_slaves_point_to_it(make_sim):
    sim = make_sim(ha_timeout=1.5)
    try:
        api = xapi_login(sim.url).xenapi
        pool = api.pool.get_all()[0]
        old_master = api.pool.get_master(pool)
        assert _failure(xapi_login, sim.url_of(1)) == ["HOST_IS_SLAVE", "127.0.0.1"]
        assert control(sim.url, "POST", "/sim/hosts/xcp-host-1/crash")[0] == 200
        assert _refused(sim.url)
        # Until the failure is noticed the others still name the old master.
        assert _failure(xapi_login, sim.url_of(2)) == ["HOST_IS_SLAVE", "127.0.0.1"]
        session = wait_for(lambda: _try_login(sim.url_of(1)), timeout=10, message="new master")
        api = session.xenapi
        new_master = api.pool.get_master(pool)
        assert new_master != old_master and api.host.get_name_label(new_master) == "xcp-host-2"
        assert api.host_metrics.get_live(api.host.get_metrics(old_master)) is False
        assert _failure(xapi_login, sim.url_of(3)) == ["HOST_IS_SLAVE", "127.0.0.2"]
        status, state = control(sim.url_of(1), "GET", "/sim/state")
        assert state["pool"]["master"] == "xcp-host-2"
        assert control(sim.url_of(1), "POST", "/sim/hosts/xcp-host-1/power-on")[0] == 200
        wait_for(
            lambda: api.host_metrics.get_live(api.host.get_metrics(old_master)), timeout=10, message="old master back"
        )
        assert _failure(xapi_login, sim.url) == ["HOST_IS_SLAVE", "127.0.0.2"], "it comes back as a slave"
    finally:
        sim.stop()


def _try_login(url: str) -> XenAPI.Session | None:
    try:
        return xapi_login(url)
    except (XenAPI.Failure, OSError):
        return None


def test_pif_carrier_fault_flips_pif_metrics_carrier(api, sim):
    pif = api.PIF.get_all()[0]
    uuid = api.PIF.get_uuid(pif)
    metrics = api.PIF.get_metrics(pif)
    token = api.event_from(["pif_metrics"], "", 0.0)["token"]
    assert control(sim.url, "POST", f"/sim/pifs/{uuid}/carrier", {"up": False}) == (
        200,
        {"pif": uuid, "carrier": False},
    )
    events = api.event_from(["pif_metrics"], token, 2.0)["events"]
    assert [(e["ref"], e["snapshot"]["carrier"]) for e in events] == [(metrics, False)]
    assert api.PIF.get_currently_attached(pif) is True
    assert control(sim.url, "GET", "/sim/state")[1]["faults"]["pif_carrier_down"] == [uuid]
    control(sim.url, "POST", f"/sim/pifs/{uuid}/carrier", {"up": True})
    assert api.PIF_metrics.get_carrier(metrics) is True


def test_pbd_failure_detaches_storage_from_one_host_until_repaired(api, sim):
    shared = next(r for r, sr in api.SR.get_all_records().items() if sr["shared"])
    host = api.host.get_by_name_label("xcp-host-2")[0]
    pbd = next(p for p in api.SR.get_PBDs(shared) if api.PBD.get_host(p) == host)
    uuid = api.PBD.get_uuid(pbd)
    assert control(sim.url, "POST", f"/sim/pbds/{uuid}/fail")[0] == 200
    assert api.PBD.get_currently_attached(pbd) is False
    vm = api.VM.get_by_name_label("dev-sandbox")[0]
    assert _failure(api.VM.start_on, vm, host, False, False) == ["VM_REQUIRES_SR", vm, shared]
    assert _failure(api.VM.assert_agile, vm) == ["HA_CONSTRAINT_VIOLATION_SR_NOT_SHARED", shared]
    assert control(sim.url, "POST", f"/sim/pbds/{uuid}/repair")[0] == 200
    assert api.PBD.get_currently_attached(pbd) is True
    api.VM.start_on(vm, host, False, False)


def test_a_slow_host_delays_every_call(api, sim):
    assert control(sim.url, "POST", "/sim/hosts/xcp-host-1/slow", {"delay_ms": 500})[0] == 200
    start = time.monotonic()
    api.pool.get_all()
    assert time.monotonic() - start >= 0.5
    assert control(sim.url, "GET", "/sim/state")[1]["faults"]["slow_hosts"] == {"xcp-host-1": 500}
    control(sim.url, "POST", "/sim/hosts/xcp-host-1/slow", {"delay_ms": 0})
    assert control(sim.url, "GET", "/sim/state")[1]["faults"]["slow_hosts"] == {}  # no call waits any more
    assert api.pool.get_all()


def test_a_crashed_vm_without_ha_stays_halted(api, sim):
    vm = api.VM.get_by_name_label("vpn-gw")[0]
    assert control(sim.url, "POST", f"/sim/vms/{api.VM.get_uuid(vm)}/crash")[0] == 200
    assert api.VM.get_power_state(vm) == "Halted"
    time.sleep(0.3)
    assert api.VM.get_power_state(vm) == "Halted"
    assert control(sim.url, "POST", "/sim/vms/vpn-gw/crash")[0] == 409


def test_unknown_objects_get_404_and_bad_bodies_400(sim):
    cases = [
        ("POST", "/sim/hosts/no-such-host/crash", None, 404),
        ("POST", "/sim/vms/no-such-vm/crash", None, 404),
        ("POST", "/sim/pifs/not-a-uuid/carrier", {"up": False}, 404),
        ("POST", "/sim/pbds/not-a-uuid/fail", None, 404),
        ("POST", "/sim/hosts/xcp-host-1/explode", None, 404),
        ("POST", "/sim/nothing", None, 404),
        ("POST", "/sim/hosts/xcp-host-1/slow", {"delay_ms": "lots"}, 400),
        ("POST", "/sim/hosts/xcp-host-1/slow", b"{not json", 400),
        ("POST", "/sim/hosts/xcp-host-1/slow", [1, 2], 400),
        ("GET", "/sim/hosts/xcp-host-1/crash", None, 405),
        # The live bed's routes, without --live.
        ("GET", "/sim/live", None, 404),
        ("POST", "/sim/hosts/xcp-host-1/nic", {"up": False}, 404),
    ]
    pif = next(iter(sim.engine.store.tables["PIF"].values()))["uuid"]
    cases.append(("POST", f"/sim/pifs/{pif}/carrier", {"up": "no"}, 400))
    for method, path, body, expected in cases:
        status, answer = control(sim.url, method, path, body)
        assert status == expected, (method, path)
        assert answer["error"], (method, path)
