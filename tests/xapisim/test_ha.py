"""HA: plan fields, plan-breaking operations, restarts after a host or VM crash."""

from __future__ import annotations

import time

import pytest
import XenAPI

from tests.support import wait_for, xapi_login
from tests.xapisim.rpc import control

GiB = 1 << 30


def _failure(call, *args) -> list[str]:
    with pytest.raises(XenAPI.Failure) as failure:
        call(*args)
    return failure.value.details


def _shared_sr(api) -> str:
    return next(r for r, sr in api.SR.get_all_records().items() if sr["shared"])


def _new_vm(api, name: str, gib: int, priority: str = "") -> str:
    template = api.VM.get_by_name_label("Debian Bookworm 12")[0]
    vm = api.VM.clone(template, name)
    api.VM.set_is_a_template(vm, False)
    size = str(gib * GiB)
    api.VM.set_memory_limits(vm, str(GiB), size, size, size)
    api.VM.set_ha_restart_priority(vm, priority)
    return vm


def test_operations_that_would_break_the_failover_plan_are_refused(make_sim):
    """Three 256 GiB hosts A, B, C; protected P1 on A, P2 and P3 on B (100 GiB each).

    One failure is survivable (A's VM goes to C, B's two go to A and C); starting
    a 200 GiB VM on C would leave nowhere for P1 if A failed.
    """
    sim = make_sim(hosts=3, vms=0)
    try:
        api = xapi_login(sim.url).xenapi
        pool = api.pool.get_all()[0]
        a, b, c = sorted(api.host.get_all(), key=api.host.get_name_label)
        p1, p2, p3 = (_new_vm(api, f"p{i}", 100, "restart") for i in (1, 2, 3))
        big = _new_vm(api, "big", 200)
        for vm, host in ((p1, a), (p2, b), (p3, b)):
            api.VM.start_on(vm, host, False, False)
        api.pool.enable_ha([_shared_sr(api)], {"timeout": "1"})
        api.pool.set_ha_host_failures_to_tolerate(pool, "1")
        record = api.pool.get_record(pool)
        assert record["ha_enabled"] is True
        assert record["ha_configuration"] == {"timeout": "1"}
        assert (record["ha_plan_exists_for"], record["ha_overcommitted"]) == ("1", False)
        assert api.pool.ha_compute_max_host_failures_to_tolerate() == "1"
        assert api.pool.ha_failover_plan_exists("1") is True
        assert api.pool.ha_failover_plan_exists("2") is False
        assert _failure(api.pool.set_ha_host_failures_to_tolerate, pool, "2") == [
            "HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN"
        ]

        assert _failure(api.VM.start_on, big, c, False, False) == ["HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN"]
        assert api.VM.get_power_state(big) == "Halted"

        api.pool.set_ha_allow_overcommit(pool, True)
        api.VM.start_on(big, c, False, False)
        record = api.pool.get_record(pool)
        assert (record["ha_plan_exists_for"], record["ha_overcommitted"]) == ("0", True)
        names = {m["name"]: m for m in api.message.get_all_records().values()}
        assert names["HA_POOL_OVERCOMMITTED"]["cls"] == "Pool"
        assert names["HA_POOL_DROP_IN_PLAN_EXISTS_FOR"]["body"] == "0"
        assert api.pool.ha_compute_max_host_failures_to_tolerate() == "0"
        # Were only P2 protected, losing B (P2 to A) would still be survivable.
        assert api.pool.ha_compute_hypothetical_max_host_failures_to_tolerate({p2: "restart"}) == "1"
        plan = api.pool.ha_compute_vm_failover_plan([b], [p2])
        assert plan == {p2: {"host": a}}
        plan = api.pool.ha_compute_vm_failover_plan([a], [p1])
        assert plan == {p1: {"error_code": "HOST_NOT_ENOUGH_FREE_MEMORY"}}

        api.VM.hard_shutdown(big)
        record = api.pool.get_record(pool)
        assert (record["ha_plan_exists_for"], record["ha_overcommitted"]) == ("1", False)
        api.pool.disable_ha()
        record = api.pool.get_record(pool)
        assert (record["ha_enabled"], record["ha_statefiles"], record["ha_configuration"]) == (False, [], {})
    finally:
        sim.stop()


def test_ha_settings_are_validated(api, sim):
    vm = api.VM.get_by_name_label("web-01")[0]
    pool = api.pool.get_all()[0]
    assert _failure(api.VM.set_ha_restart_priority, vm, "always") == ["INVALID_VALUE", "ha_restart_priority", "always"]
    for priority in ("restart", "best-effort", ""):
        api.VM.set_ha_restart_priority(vm, priority)
        assert api.VM.get_ha_restart_priority(vm) == priority
    api.VM.set_order(vm, "3")
    api.VM.set_start_delay(vm, 5)
    assert (api.VM.get_order(vm), api.VM.get_start_delay(vm)) == ("3", "5")
    assert _failure(api.pool.set_ha_host_failures_to_tolerate, pool, "-1")[0] == "INVALID_VALUE"
    assert _failure(api.pool.disable_ha) == ["HA_NOT_ENABLED"]
    local = next(r for r, sr in api.SR.get_all_records().items() if not sr["shared"])
    assert _failure(api.pool.enable_ha, [local], {}) == ["HA_CONSTRAINT_VIOLATION_SR_NOT_SHARED", local]
    api.pool.enable_ha([], {})
    assert _failure(api.pool.enable_ha, [], {}) == ["HA_IS_ENABLED"]


def test_assert_agile_names_the_unshared_sr_or_network(api, sim):
    local_vm = api.VM.get_by_name_label("build-agent-1")[0]
    disk = next(b for b in api.VM.get_VBDs(local_vm) if not api.VBD.get_empty(b))
    local_sr = api.VDI.get_SR(api.VBD.get_VDI(disk))
    assert _failure(api.VM.assert_agile, local_vm) == ["HA_CONSTRAINT_VIOLATION_SR_NOT_SHARED", local_sr]
    shared_vm = api.VM.get_by_name_label("web-01")[0]
    api.VM.assert_agile(shared_vm)
    # A network some host has no PIF on is not shared (done in-process: no API removes a PIF).
    network = api.VIF.get_network(api.VM.get_VIFs(shared_vm)[0])
    pif = api.network.get_PIFs(network)[0]
    host = api.PIF.get_host(pif)
    store = sim.engine.store
    with sim.engine.lock:
        store.set_remove(network, "PIFs", pif)
        store.set_remove(host, "PIFs", pif)
    assert _failure(api.VM.assert_agile, shared_vm) == ["HA_CONSTRAINT_VIOLATION_NETWORK_NOT_SHARED", network]


def test_host_crash_with_ha_restarts_protected_vms_on_survivors(api, sim):
    hosts = {r["name_label"]: ref for ref, r in api.host.get_all_records().items()}
    victim = hosts["xcp-host-2"]
    vms = {r["name_label"]: ref for ref, r in api.VM.get_all_records().items()}
    on_victim = {n for n, ref in vms.items() if api.VM.get_resident_on(ref) == victim}
    assert {"db-replica", "web-02", "fileserver", "k8s-node-2", "build-agent-2"} <= on_victim
    api.VM.set_ha_restart_priority(vms["db-replica"], "restart")
    api.VM.set_order(vms["db-replica"], "0")
    api.VM.set_start_delay(vms["db-replica"], "1")
    for name in ("web-02", "fileserver"):
        api.VM.set_ha_restart_priority(vms[name], "restart")
        api.VM.set_order(vms[name], "1")
    api.VM.set_ha_restart_priority(vms["k8s-node-2"], "best-effort")
    pool = api.pool.get_all()[0]
    api.pool.enable_ha([_shared_sr(api)], {"timeout": "1"})
    api.pool.set_ha_host_failures_to_tolerate(pool, "1")
    assert api.pool.get_ha_plan_exists_for(pool) == "1"

    crashed_at = time.monotonic()
    assert control(sim.url, "POST", "/sim/hosts/xcp-host-2/crash")[0] == 200
    metrics = api.host.get_metrics(victim)
    assert api.host_metrics.get_live(metrics) is True, "xapi only notices after the timeout"
    assert api.VM.get_power_state(vms["web-02"]) == "Running"

    wait_for(lambda: not api.host_metrics.get_live(metrics), timeout=10, message="host declared dead")
    assert time.monotonic() - crashed_at >= 0.9
    first_running: dict[str, float] = {}

    def restarted() -> bool:
        for name in ("db-replica", "web-02", "fileserver", "k8s-node-2"):
            if name not in first_running and api.VM.get_power_state(vms[name]) == "Running":
                first_running[name] = time.monotonic()
        return len(first_running) == 4

    wait_for(restarted, timeout=10, message="HA restarts")
    for name in ("db-replica", "web-02", "fileserver", "k8s-node-2"):
        assert api.VM.get_resident_on(vms[name]) not in (victim, "OpaqueRef:NULL")
    assert first_running["web-02"] - first_running["db-replica"] >= 0.8, "order 1 waits for order 0's start_delay"
    assert api.VM.get_power_state(vms["build-agent-2"]) == "Halted", "its disk died with its host"
    assert api.VM.get_resident_on(vms["build-agent-2"]) == "OpaqueRef:NULL"
    messages = list(api.message.get_all_records().values())
    failed = [m for m in messages if m["name"] == "HA_HOST_FAILED"]
    assert [m["obj_uuid"] for m in failed] == [api.host.get_uuid(victim)]
    assert failed[0]["cls"] == "Host"
    started = {m["obj_uuid"] for m in messages if m["name"] == "VM_STARTED"}
    for name in ("db-replica", "web-02", "fileserver", "k8s-node-2"):
        assert api.VM.get_uuid(vms[name]) in started
    assert vms["build-agent-2"] not in api.host.get_resident_VMs(victim)


def test_a_crashed_protected_vm_is_restarted_by_ha(api, sim):
    vm = api.VM.get_by_name_label("web-03")[0]
    api.VM.set_ha_restart_priority(vm, "restart")
    api.pool.enable_ha([], {"timeout": "1"})
    status, body = control(sim.url, "POST", "/sim/vms/web-03/crash")
    assert (status, body["power_state"]) == (200, "Halted")
    assert api.VM.get_power_state(vm) == "Halted"
    uuid = api.VM.get_uuid(vm)
    assert any(m["name"] == "VM_CRASHED" and m["obj_uuid"] == uuid for m in api.message.get_all_records().values())
    wait_for(lambda: api.VM.get_power_state(vm) == "Running", timeout=10, message="HA restart")
    assert api.VM.get_ha_always_run(vm) is True
    # A VM its owner shuts down is not restarted.
    api.VM.clean_shutdown(vm)
    assert api.VM.get_ha_always_run(vm) is False
    time.sleep(0.3)
    assert api.VM.get_power_state(vm) == "Halted"
