"""VM operations: power-state rules, memory, storage, tasks and the events they make."""

from __future__ import annotations

import threading
import time

import pytest
import XenAPI

from tests.support import wait_for, xapi_login

GiB = 1 << 30


def _vm(api, name: str) -> str:
    return api.VM.get_by_name_label(name)[0]


def _failure(call, *args) -> list[str]:
    with pytest.raises(XenAPI.Failure) as failure:
        call(*args)
    return failure.value.details


def _wait_task(api, task: str) -> dict:
    wait_for(lambda: api.task.get_status(task) != "pending", timeout=10, message="task end")
    return api.task.get_record(task)


def test_async_vm_start_returns_a_task_that_ends_in_success(api):
    vm = _vm(api, "backup-proxy")
    task = api.Async.VM.start(vm, False, False)
    assert task.startswith("OpaqueRef:") and api.task.get_name_label(task) == "Async.VM.start"
    record = _wait_task(api, task)
    assert record["status"] == "success"
    assert record["progress"] == 1.0
    assert record["result"] == "<value></value>", "a void answer is an empty string, kept as its XML-RPC value"
    assert record["error_info"] == []
    assert record["finished"] >= record["created"]
    vm_record = api.VM.get_record(vm)
    assert vm_record["power_state"] == "Running"
    host = vm_record["resident_on"]
    assert vm in api.host.get_resident_VMs(host)
    assert api.VM_metrics.get_memory_actual(vm_record["metrics"]) == vm_record["memory_dynamic_max"]
    messages = api.message.get_all_records().values()
    assert any(m["name"] == "VM_STARTED" and m["obj_uuid"] == vm_record["uuid"] for m in messages)
    api.task.destroy(task)
    assert task not in api.task.get_all()


def test_async_task_result_is_the_xmlrpc_value_of_the_answer(api):
    task = api.Async.VM.clone(_vm(api, "dev-sandbox"), "sandbox-2")
    record = _wait_task(api, task)
    assert record["status"] == "success"
    assert record["result"].startswith("<value>OpaqueRef:") and record["result"].endswith("</value>")
    clone = record["result"][len("<value>") : -len("</value>")]
    assert api.VM.get_name_label(clone) == "sandbox-2"


def test_a_failed_async_call_puts_the_error_in_the_task(api):
    task = api.Async.VM.start(_vm(api, "web-01"), False, False)
    record = _wait_task(api, task)
    assert record["status"] == "failure"
    assert record["error_info"] == ["VM_BAD_POWER_STATE", _vm(api, "web-01"), "halted", "running"]


def test_power_state_errors_name_the_expected_states_in_lowercase(api):
    running, halted = _vm(api, "web-01"), _vm(api, "dev-sandbox")
    assert _failure(api.VM.start, running, False, False) == ["VM_BAD_POWER_STATE", running, "halted", "running"]
    assert _failure(api.VM.unpause, running) == ["VM_BAD_POWER_STATE", running, "paused", "running"]
    assert _failure(api.VM.hard_shutdown, halted) == [
        "VM_BAD_POWER_STATE",
        halted,
        "paused, suspended, running",
        "halted",
    ]
    assert _failure(api.VM.pool_migrate, halted, api.host.get_all()[0], {}) == [
        "VM_BAD_POWER_STATE",
        halted,
        "running",
        "halted",
    ]


def test_templates_and_snapshots_cannot_start(api):
    template = _vm(api, "Debian Bookworm 12")
    assert _failure(api.VM.start, template, False, False) == ["VM_IS_TEMPLATE", template, "start"]
    snapshot = _vm(api, "db-primary before upgrade")
    assert _failure(api.VM.start, snapshot, False, False) == ["VM_IS_SNAPSHOT", snapshot, "start"]


def test_a_vm_runs_only_where_its_memory_fits(api):
    vm = _vm(api, "dev-sandbox")
    api.VM.set_memory_limits(vm, str(GiB), str(40 * GiB), str(40 * GiB), str(40 * GiB))
    record = api.VM.get_record(vm)
    needed = int(record["memory_static_max"]) + int(record["memory_overhead"])
    hosts = api.host.get_all_records()
    busiest = min(hosts, key=lambda h: int(api.host_metrics.get_memory_free(hosts[h]["metrics"])))
    available = int(api.host.compute_free_memory(busiest))
    assert available < needed
    assert _failure(api.VM.start_on, vm, busiest, False, False) == [
        "HOST_NOT_ENOUGH_FREE_MEMORY",
        str(needed),
        str(available),
    ]
    api.VM.set_memory_limits(vm, str(GiB), str(200 * GiB), str(200 * GiB), str(200 * GiB))
    assert _failure(api.VM.start, vm, False, False) == ["NO_HOSTS_AVAILABLE"]
    api.VM.set_memory_limits(vm, str(GiB), str(8 * GiB), str(8 * GiB), str(8 * GiB))
    free_before = {h: int(api.host_metrics.get_memory_free(r["metrics"])) for h, r in hosts.items()}
    api.VM.start(vm, False, False)
    host = api.VM.get_resident_on(vm)
    assert free_before[host] == max(free_before.values()), "VM.start picks the host with most free memory"
    needed = 8 * GiB + int(api.VM.get_memory_overhead(vm))
    assert int(api.host_metrics.get_memory_free(hosts[host]["metrics"])) == free_before[host] - needed


def test_a_vm_on_local_storage_cannot_start_elsewhere(api):
    vm = _vm(api, "build-agent-4")
    vbd = next(b for b in api.VM.get_VBDs(vm) if api.VBD.get_type(b) == "Disk")
    sr = api.VDI.get_SR(api.VBD.get_VDI(vbd))
    owner = api.PBD.get_host(api.SR.get_PBDs(sr)[0])
    other = next(h for h in api.host.get_all() if h != owner)
    assert _failure(api.VM.start_on, vm, other, False, False) == ["VM_REQUIRES_SR", vm, sr]
    api.VM.start(vm, False, False)
    assert api.VM.get_resident_on(vm) == owner


def test_lifecycle_pause_suspend_resume_reboot_migrate_shutdown(api):
    vm = _vm(api, "mail")
    host = api.VM.get_resident_on(vm)
    api.VM.pause(vm)
    assert api.VM.get_power_state(vm) == "Paused"
    api.VM.unpause(vm)
    api.VM.suspend(vm)
    record = api.VM.get_record(vm)
    assert record["power_state"] == "Suspended"
    assert record["resident_on"] == "OpaqueRef:NULL"
    assert api.VDI.get_type(record["suspend_VDI"]) == "suspend"
    api.VM.resume(vm, False, False)
    record = api.VM.get_record(vm)
    assert record["power_state"] == "Running" and record["suspend_VDI"] == "OpaqueRef:NULL"
    domid = record["domid"]
    api.VM.clean_reboot(vm)
    assert api.VM.get_domid(vm) != domid
    target = next(h for h in api.host.get_all() if h != api.VM.get_resident_on(vm))
    api.VM.pool_migrate(vm, target, {"live": "true"})
    assert api.VM.get_resident_on(vm) == target
    assert vm in api.host.get_resident_VMs(target)
    assert vm not in api.host.get_resident_VMs(host)
    api.VM.clean_shutdown(vm)
    record = api.VM.get_record(vm)
    assert (record["power_state"], record["resident_on"], record["domid"]) == ("Halted", "OpaqueRef:NULL", "-1")
    assert all(not api.VBD.get_currently_attached(b) for b in record["VBDs"])
    names = [m["name"] for m in api.message.get_all_records().values() if m["obj_uuid"] == record["uuid"]]
    for name in ("VM_PAUSED", "VM_SUSPENDED", "VM_RESUMED", "VM_REBOOTED", "VM_MIGRATED", "VM_SHUTDOWN"):
        assert name in names


def test_snapshot_clone_copy_and_destroy(api):
    vm = _vm(api, "gitlab")
    snap = api.VM.snapshot(vm, "gitlab before upgrade")
    record = api.VM.get_record(snap)
    assert record["is_a_snapshot"] and record["is_a_template"] and record["snapshot_of"] == vm
    assert snap in api.VM.get_snapshots(vm)
    disk = next(b for b in record["VBDs"] if not api.VBD.get_empty(b))
    assert api.VDI.get_is_a_snapshot(api.VBD.get_VDI(disk))
    local_sr = next(r for r, sr in api.SR.get_all_records().items() if sr["name_label"] == "Local storage xcp-host-1")
    halted = _vm(api, "dev-sandbox")
    copy = api.VM.copy(halted, "sandbox-copy", local_sr)
    copy_disk = next(b for b in api.VM.get_VBDs(copy) if not api.VBD.get_empty(b))
    assert api.VDI.get_SR(api.VBD.get_VDI(copy_disk)) == local_sr
    clone = api.VM.clone(halted, "sandbox-clone")
    assert set(api.VM.get_VIFs(clone)).isdisjoint(api.VM.get_VIFs(halted))
    assert api.VIF.get_MAC(api.VM.get_VIFs(clone)[0]) != api.VIF.get_MAC(api.VM.get_VIFs(halted)[0])
    assert _failure(api.VM.destroy, vm) == ["VM_BAD_POWER_STATE", vm, "halted, suspended", "running"]
    vbds = api.VM.get_VBDs(clone)
    api.VM.destroy(clone)
    assert clone not in api.VM.get_all()
    assert not set(vbds) & set(api.VBD.get_all())
    api.VM.destroy(snap)
    assert snap not in api.VM.get_snapshots(vm)


def test_memory_limits_follow_xapis_rules(api):
    running, halted = _vm(api, "web-03"), _vm(api, "dev-sandbox")
    assert _failure(api.VM.set_memory_limits, running, "1", "2", "2", "2")[0] == "VM_BAD_POWER_STATE"
    assert _failure(api.VM.set_memory_limits, halted, str(2 * GiB), str(GiB), str(GiB), str(GiB))[0] == (
        "MEMORY_CONSTRAINT_VIOLATION"
    )
    assert _failure(api.VM.set_ha_restart_priority, halted, "always")[0] == "INVALID_VALUE"


def test_an_operation_in_progress_blocks_another_and_shows_in_events(make_sim):
    sim = make_sim(op_delay=0.6)
    try:
        api = xapi_login(sim.url).xenapi
        vm = _vm(api, "backup-proxy")
        token = api.event_from(["vm"], "", 0.0)["token"]
        task = api.Async.VM.start(vm, False, False)
        wait_for(lambda: api.VM.get_current_operations(vm), timeout=10, message="current_operations")
        assert api.VM.get_current_operations(vm) == {task: "start"}
        assert api.VM.get_allowed_operations(vm) == []
        assert api.VM.get_scheduled_to_be_resident_on(vm) != "OpaqueRef:NULL"
        assert _failure(api.VM.start, vm, False, False) == ["OTHER_OPERATION_IN_PROGRESS", "VM", vm, "start", task]
        seen = []
        # As from xapi: first the operation appears, then the power state changes, then it goes.
        while not seen or seen[-1]["power_state"] != "Running" or seen[-1]["current_operations"]:
            answer = api.event_from([f"vm/{vm}"], token, 5.0)
            token = answer["token"]
            seen += [e["snapshot"] for e in answer["events"]]
        assert seen[-1]["resident_on"] != "OpaqueRef:NULL"
        assert "clean_shutdown" in seen[-1]["allowed_operations"]
        assert api.task.get_status(task) == "success"
    finally:
        sim.stop()


def test_cancelling_a_task_stops_the_operation(make_sim):
    sim = make_sim(op_delay=1.0)
    try:
        api = xapi_login(sim.url).xenapi
        vm = _vm(api, "jenkins")
        task = api.Async.VM.clean_shutdown(vm)
        wait_for(lambda: api.VM.get_current_operations(vm), timeout=10, message="operation start")
        api.task.cancel(task)
        record = _wait_task(api, task)
        assert record["status"] == "cancelled"
        assert record["error_info"] == ["TASK_CANCELLED", task]
        assert api.VM.get_power_state(vm) == "Running"
        assert api.VM.get_current_operations(vm) == {}
        assert _failure(api.task.cancel, task)[0] == "OPERATION_NOT_ALLOWED"
    finally:
        sim.stop()


def test_concurrent_starts_never_overcommit_a_host(make_sim):
    sim = make_sim(op_delay=0.2)
    try:
        api = xapi_login(sim.url).xenapi
        host = api.host.get_all()[0]
        vms = [_vm(api, n) for n in ("backup-proxy", "dev-sandbox")]
        free = int(api.host.compute_free_memory(host))
        for vm in vms:  # each fits alone; not both
            size = str(free // 2 + GiB)
            api.VM.set_memory_limits(vm, str(GiB), size, size, size)
        errors: list[list[str]] = []

        def start(vm: str) -> None:
            try:
                xapi_login(sim.url).xenapi.VM.start_on(vm, host, False, False)
            except XenAPI.Failure as e:
                errors.append(e.details)

        threads = [threading.Thread(target=start, args=(vm,)) for vm in vms]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [e[0] for e in errors] == ["HOST_NOT_ENOUGH_FREE_MEMORY"]
        assert sorted(api.VM.get_power_state(vm) for vm in vms) == ["Halted", "Running"]
        assert int(api.host_metrics.get_memory_free(api.host.get_metrics(host))) >= 0
    finally:
        sim.stop()


def test_operations_take_the_configured_time(make_sim):
    sim = make_sim(op_delay=0.3)
    try:
        api = xapi_login(sim.url).xenapi
        start = time.monotonic()
        api.VM.start(_vm(api, "backup-proxy"), False, False)
        assert time.monotonic() - start >= 0.3
    finally:
        sim.stop()
