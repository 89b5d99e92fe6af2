"""VM lifecycle calls with xapi's power-state rules, errors, events and messages.

Every operation runs the same way (``_operate``): under the lock, xapi's
checks and the reservation of memory on the target host, with the operation
shown in ``VM.current_operations``; then the simulated work
(``Config.op_delay``, cancellable through the task); then, under the lock
again, the new state.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .datamodel import NULL_REF, Record, now
from .errors import XapiError
from .ha_plan import Change, assert_change_preserves_plan
from .ha_status import update_pool_status
from .storage import destroy_vdi, new_vdi
from .vmstate import (
    assert_can_boot_here,
    begin_op,
    check_op,
    choose_host,
    end_op,
    refresh_host_memory,
    set_paused,
    to_halted,
    to_running,
    update_vm,
    vm_message,
    vm_overhead,
    vm_srs,
)

if TYPE_CHECKING:
    from .api import Registry
    from .engine import Ctx, Engine


def _operate(
    ctx: Ctx,
    vm_ref: str,
    op: str,
    finish: Callable[[Record, Any], Any],
    prepare: Callable[[Record], Any] | None = None,
    *,
    reserve: bool = False,
    work: float = 1.0,
) -> Any:
    engine = ctx.engine
    task = ctx.task or ""
    with engine.lock:
        vm = ctx.store.rec("VM", vm_ref)
        check_op(vm_ref, vm, op)
        host = vm["resident_on"]
        if host != NULL_REF and not engine.is_up(host):
            # The VM's host has crashed but is not yet declared dead: xapi cannot reach it.
            raise XapiError("HOST_OFFLINE", host)
        target = prepare(vm) if prepare else None
        begin_op(engine, vm_ref, task, op, reserve_on=target if reserve else None)
    try:
        ctx.progress(0.1)
        ctx.sleep(engine.config.op_delay * work)
        with engine.lock:
            vm = ctx.store.rec("VM", vm_ref)
            if isinstance(target, str) and ctx.store.exists("host", target) and not engine.is_up(target):
                raise XapiError("HOST_OFFLINE", target)
            if host != NULL_REF and not engine.is_up(host):
                raise XapiError("HOST_OFFLINE", host)
            return finish(vm, target)
    finally:
        with engine.lock:
            end_op(engine, vm_ref, task)


def _host_desc(engine: Engine, host: str) -> str:
    h = engine.store.tables["host"][host]
    return f"{h['name_label']} (uuid: {h['uuid']})"


# -- start / resume -------------------------------------------------------------


def start_vm(ctx: Ctx, vm_ref: str, host: str | None, paused: bool, op: str, *, ha_check: bool = True) -> None:
    """VM.start / start_on / resume / resume_on; also how HA restarts VMs (``ha_check=False``)."""
    engine = ctx.engine
    resuming = op.startswith("resume")

    def prepare(vm: Record) -> str:
        if host is None:
            target = choose_host(engine, vm_ref, vm)
        else:
            assert_can_boot_here(engine, vm_ref, vm, host)
            target = host
        if ha_check:
            protect = [vm_ref] if vm["ha_restart_priority"] == "restart" else []
            assert_change_preserves_plan(engine, Change(arriving=[(target, vm_ref)], new_protected=protect))
        return target

    def finish(vm: Record, target: str) -> None:
        suspend_vdi = vm["suspend_VDI"]
        to_running(engine, vm_ref, target, paused=paused)
        update_vm(engine, vm_ref, {"ha_always_run": vm["ha_restart_priority"] == "restart"})
        if resuming and ctx.store.exists("VDI", suspend_vdi):
            destroy_vdi(engine, suspend_vdi)
        verb = "resumed" if resuming else "started"
        vm_message(
            engine, "VM_RESUMED" if resuming else "VM_STARTED", vm_ref, f"{verb} on host: {_host_desc(engine, target)}"
        )
        update_pool_status(engine)

    _operate(ctx, vm_ref, op, finish, prepare, reserve=True)


def vm_start(ctx: Ctx, vm: str, start_paused: bool, force: bool) -> None:
    start_vm(ctx, vm, None, start_paused, "start")


def vm_start_on(ctx: Ctx, vm: str, host: str, start_paused: bool, force: bool) -> None:
    start_vm(ctx, vm, host, start_paused, "start_on")


def vm_resume(ctx: Ctx, vm: str, start_paused: bool, force: bool) -> None:
    start_vm(ctx, vm, None, start_paused, "resume")


def vm_resume_on(ctx: Ctx, vm: str, host: str, start_paused: bool, force: bool) -> None:
    start_vm(ctx, vm, host, start_paused, "resume_on")


# -- stop / reboot / pause -------------------------------------------------------


def _stop(ctx: Ctx, vm_ref: str, op: str) -> None:
    engine = ctx.engine

    def finish(vm: Record, _: Any) -> None:
        suspend_vdi = vm["suspend_VDI"]
        to_halted(engine, vm_ref)
        # A VM its owner shut down is no longer one HA must keep running.
        update_vm(engine, vm_ref, {"ha_always_run": False})
        if ctx.store.exists("VDI", suspend_vdi):
            destroy_vdi(engine, suspend_vdi)
        vm_message(engine, "VM_SHUTDOWN", vm_ref, "shutdown")
        update_pool_status(engine)

    _operate(ctx, vm_ref, op, finish)


def vm_clean_shutdown(ctx: Ctx, vm: str) -> None:
    _stop(ctx, vm, "clean_shutdown")


def vm_hard_shutdown(ctx: Ctx, vm: str) -> None:
    _stop(ctx, vm, "hard_shutdown")


def vm_shutdown(ctx: Ctx, vm: str) -> None:
    _stop(ctx, vm, "shutdown")


def _reboot(ctx: Ctx, vm_ref: str, op: str) -> None:
    engine = ctx.engine

    def finish(vm: Record, _: Any) -> None:
        to_running(engine, vm_ref, vm["resident_on"])
        vm_message(engine, "VM_REBOOTED", vm_ref, "rebooted")

    _operate(ctx, vm_ref, op, finish, work=2.0)


def vm_clean_reboot(ctx: Ctx, vm: str) -> None:
    _reboot(ctx, vm, "clean_reboot")


def vm_hard_reboot(ctx: Ctx, vm: str) -> None:
    _reboot(ctx, vm, "hard_reboot")


def vm_pause(ctx: Ctx, vm_ref: str) -> None:
    def finish(vm: Record, _: Any) -> None:
        set_paused(ctx.engine, vm_ref, True)
        vm_message(ctx.engine, "VM_PAUSED", vm_ref, "paused")

    _operate(ctx, vm_ref, "pause", finish, work=0.2)


def vm_unpause(ctx: Ctx, vm_ref: str) -> None:
    def finish(vm: Record, _: Any) -> None:
        set_paused(ctx.engine, vm_ref, False)
        vm_message(ctx.engine, "VM_UNPAUSED", vm_ref, "unpaused")

    _operate(ctx, vm_ref, "unpause", finish, work=0.2)


def vm_suspend(ctx: Ctx, vm_ref: str) -> None:
    engine = ctx.engine
    s = ctx.store

    def prepare(vm: Record) -> str:
        sr = vm["suspend_SR"]
        if not s.exists("SR", sr):
            sr = s.tables["pool"][engine.pool_ref]["suspend_image_SR"]
        if not s.exists("SR", sr):
            srs = vm_srs(engine, vm)
            sr = srs[0] if srs else NULL_REF
        if not s.exists("SR", sr):
            raise XapiError("VM_NO_SUSPEND_SR", vm_ref)
        return sr

    def finish(vm: Record, sr: str) -> None:
        vdi = new_vdi(engine, sr, f"Suspend image for {vm['name_label']}", vm["memory_static_max"], vtype="suspend")
        to_halted(engine, vm_ref, suspended_vdi=vdi)
        update_vm(engine, vm_ref, {"ha_always_run": False})
        vm_message(engine, "VM_SUSPENDED", vm_ref, "suspended")
        update_pool_status(engine)

    _operate(ctx, vm_ref, "suspend", finish, prepare, work=2.0)


# -- migrate ------------------------------------------------------------------


def vm_pool_migrate(ctx: Ctx, vm_ref: str, host: str, options: dict[str, str]) -> None:
    engine = ctx.engine
    s = ctx.store

    def prepare(vm: Record) -> str:
        assert_can_boot_here(engine, vm_ref, vm, host, migrating=True)
        source = vm["resident_on"]
        assert_change_preserves_plan(engine, Change(leaving=[(source, vm_ref)], arriving=[(host, vm_ref)]))
        return host

    def finish(vm: Record, target: str) -> None:
        source = vm["resident_on"]
        engine.reserved.pop(vm_ref, None)
        domid = engine.next_domid
        engine.next_domid += 1
        if engine.migrate_hook is not None:
            engine.migrate_hook.migrating(vm_ref, source, int(vm["domid"]), target, domid)
        update_vm(engine, vm_ref, {"resident_on": target, "scheduled_to_be_resident_on": NULL_REF, "domid": domid})
        if source != target:
            s.set_remove(source, "resident_VMs", vm_ref)
            s.set_add(target, "resident_VMs", vm_ref)
        s.update(vm["metrics"], {"last_updated": now()})
        refresh_host_memory(engine, source, target)
        vm_message(
            engine, "VM_MIGRATED", vm_ref, f"migrated from {_host_desc(engine, source)} to {_host_desc(engine, target)}"
        )
        update_pool_status(engine)

    _operate(ctx, vm_ref, "pool_migrate", finish, prepare, reserve=True, work=3.0)
    if engine.migrate_hook is not None:
        engine.migrate_hook.migrated(vm_ref)


# -- disks and copies -----------------------------------------------------------


def _mac(engine: Engine) -> str:
    rng = engine.store.rng or random
    # 02: locally administered, as xapi's generated MACs.
    return "02:" + ":".join(f"{rng.randrange(256):02x}" for _ in range(5))


def _copy_vm(engine: Engine, vm_ref: str, name: str, *, sr: str = NULL_REF, snapshot: bool = False) -> str:
    """A new VM like ``vm_ref`` with its own disks and VIFs (clone, copy or snapshot)."""
    s = engine.store
    src = s.tables["VM"][vm_ref]
    metrics = s.create("VM_metrics", {"VCPUs_number": 0, "memory_actual": 0, "install_time": now()})
    skip = {"uuid", "VBDs", "VIFs", "metrics", "snapshots", "children", "current_operations", "allowed_operations"}
    values = {k: v for k, v in src.items() if k not in skip}
    values.update(
        name_label=name,
        power_state="Halted",
        resident_on=NULL_REF,
        scheduled_to_be_resident_on=NULL_REF,
        domid=-1,
        suspend_VDI=NULL_REF,
        metrics=metrics,
        ha_always_run=False,
        is_default_template=False,
        snapshot_of=NULL_REF,
        snapshot_time=src["snapshot_time"],
        # A copy of a snapshot is a template, not a snapshot (xapi: set is_a_template false to start it).
        is_a_snapshot=False,
    )
    if snapshot:
        values.update(is_a_snapshot=True, is_a_template=True, snapshot_of=vm_ref, snapshot_time=now(), parent=vm_ref)
    new = s.create("VM", values)
    for vbd in src["VBDs"]:
        b = s.tables["VBD"][vbd]
        disk = NULL_REF
        if not b["empty"] and s.exists("VDI", b["VDI"]):
            d = s.tables["VDI"][b["VDI"]]
            target_sr = sr if s.exists("SR", sr) else d["SR"]
            extra: dict[str, Any] = {"name_description": d["name_description"], "sm_config": d["sm_config"]}
            if snapshot:
                extra.update(is_a_snapshot=True, snapshot_of=b["VDI"], snapshot_time=now())
            disk = new_vdi(
                engine, target_sr, d["name_label"], d["virtual_size"], vtype=d["type"], copy_of=b["VDI"], **extra
            )
            if snapshot:
                s.set_add(b["VDI"], "snapshots", disk)
        skip_b = {"uuid", "VM", "VDI", "currently_attached", "current_operations", "allowed_operations", "metrics"}
        new_vbd = s.create("VBD", {**{k: v for k, v in b.items() if k not in skip_b}, "VM": new, "VDI": disk})
        if disk != NULL_REF:
            s.set_add(disk, "VBDs", new_vbd)
        s.set_add(new, "VBDs", new_vbd)
    for vif in src["VIFs"]:
        v = s.tables["VIF"][vif]
        skip_v = {"uuid", "VM", "MAC", "currently_attached", "current_operations", "allowed_operations", "metrics"}
        new_vif = s.create("VIF", {**{k: x for k, x in v.items() if k not in skip_v}, "VM": new, "MAC": _mac(engine)})
        s.set_add(v["network"], "VIFs", new_vif)
        s.set_add(new, "VIFs", new_vif)
    update_vm(engine, new, {})
    if snapshot:
        s.set_add(vm_ref, "snapshots", new)
        s.set_add(vm_ref, "children", new)
    return new


def vm_clone(ctx: Ctx, vm_ref: str, new_name: str) -> str:
    def finish(vm: Record, _: Any) -> str:
        new = _copy_vm(ctx.engine, vm_ref, new_name)
        vm_message(ctx.engine, "VM_CLONED", vm_ref, f"cloned to '{new_name}'")
        return new

    return _operate(ctx, vm_ref, "clone", finish)


def vm_copy(ctx: Ctx, vm_ref: str, new_name: str, sr: str) -> str:
    return _operate(ctx, vm_ref, "copy", lambda vm, _: _copy_vm(ctx.engine, vm_ref, new_name, sr=sr), work=3.0)


def vm_snapshot(ctx: Ctx, vm_ref: str, new_name: str, ignore_vdis: list[str] | None = None) -> str:
    def finish(vm: Record, _: Any) -> str:
        new = _copy_vm(ctx.engine, vm_ref, new_name, snapshot=True)
        vm_message(ctx.engine, "VM_SNAPSHOTTED", vm_ref, f"snapshotted as '{new_name}'")
        return new

    return _operate(ctx, vm_ref, "snapshot", finish)


def vm_destroy(ctx: Ctx, vm_ref: str) -> None:
    engine = ctx.engine
    s = ctx.store
    with engine.lock:
        vm = s.rec("VM", vm_ref)
        check_op(vm_ref, vm, "destroy")
        for vbd in vm["VBDs"]:
            vdi = s.tables["VBD"][vbd]["VDI"]
            if s.exists("VDI", vdi):
                s.set_remove(vdi, "VBDs", vbd)
            s.destroy(vbd)
        for vif in vm["VIFs"]:
            s.set_remove(s.tables["VIF"][vif]["network"], "VIFs", vif)
            s.destroy(vif)
        for field in ("snapshot_of", "parent"):
            if s.exists("VM", vm[field]):
                s.set_remove(vm[field], "snapshots", vm_ref)
                s.set_remove(vm[field], "children", vm_ref)
        if s.exists("VDI", vm["suspend_VDI"]):
            destroy_vdi(engine, vm["suspend_VDI"])
        if s.exists("VM_metrics", vm["metrics"]):
            s.destroy(vm["metrics"])
        s.destroy(vm_ref)
        update_pool_status(engine)


# -- memory and vCPUs --------------------------------------------------------------


def _memory_constraint() -> XapiError:
    return XapiError(
        "MEMORY_CONSTRAINT_VIOLATION",
        "Memory limits must satisfy: static_min <= dynamic_min <= dynamic_max <= static_max",
    )


def vm_set_memory_limits(
    ctx: Ctx, vm_ref: str, static_min: int, static_max: int, dynamic_min: int, dynamic_max: int
) -> None:
    with ctx.engine.lock:
        vm = ctx.store.rec("VM", vm_ref)
        check_op(vm_ref, vm, "changing_memory_limits")
        if not (0 <= static_min <= dynamic_min <= dynamic_max <= static_max):
            raise _memory_constraint()
        update_vm(
            ctx.engine,
            vm_ref,
            {
                "memory_static_min": static_min,
                "memory_static_max": static_max,
                "memory_dynamic_min": dynamic_min,
                "memory_dynamic_max": dynamic_max,
                "memory_overhead": vm_overhead(static_max, vm["VCPUs_max"]),
            },
        )
        update_pool_status(ctx.engine)


def vm_set_memory(ctx: Ctx, vm_ref: str, value: int) -> None:
    with ctx.engine.lock:
        vm = ctx.store.rec("VM", vm_ref)
        vm_set_memory_limits(ctx, vm_ref, min(vm["memory_static_min"], value), value, value, value)


def vm_set_memory_dynamic_range(ctx: Ctx, vm_ref: str, lo: int, hi: int) -> None:
    with ctx.engine.lock:
        vm = ctx.store.rec("VM", vm_ref)
        check_op(vm_ref, vm, "changing_dynamic_range")
        if not (vm["memory_static_min"] <= lo <= hi <= vm["memory_static_max"]):
            raise _memory_constraint()
        values: dict[str, Any] = {"memory_dynamic_min": lo, "memory_dynamic_max": hi}
        if vm["power_state"] == "Running":
            values["memory_target"] = hi
            ctx.store.update(vm["metrics"], {"memory_actual": hi, "last_updated": now()})
        update_vm(ctx.engine, vm_ref, values)


def vm_set_memory_static_range(ctx: Ctx, vm_ref: str, lo: int, hi: int) -> None:
    with ctx.engine.lock:
        vm = ctx.store.rec("VM", vm_ref)
        vm_set_memory_limits(
            ctx, vm_ref, lo, hi, max(lo, min(vm["memory_dynamic_min"], hi)), max(lo, min(vm["memory_dynamic_max"], hi))
        )


def vm_set_vcpus_max(ctx: Ctx, vm_ref: str, value: int) -> None:
    with ctx.engine.lock:
        vm = ctx.store.rec("VM", vm_ref)
        check_op(vm_ref, vm, "changing_VCPUs")
        if value < 1 or value < vm["VCPUs_at_startup"]:
            raise XapiError("INVALID_VALUE", "VCPU values must satisfy: 0 < VCPUs_at_startup <= VCPUs_max", value)
        update_vm(
            ctx.engine, vm_ref, {"VCPUs_max": value, "memory_overhead": vm_overhead(vm["memory_static_max"], value)}
        )


def vm_set_vcpus_at_startup(ctx: Ctx, vm_ref: str, value: int) -> None:
    with ctx.engine.lock:
        vm = ctx.store.rec("VM", vm_ref)
        check_op(vm_ref, vm, "changing_VCPUs")
        if not (0 < value <= vm["VCPUs_max"]):
            raise XapiError("INVALID_VALUE", "VCPU values must satisfy: 0 < VCPUs_at_startup <= VCPUs_max", value)
        update_vm(ctx.engine, vm_ref, {"VCPUs_at_startup": value})


def vm_set_is_a_template(ctx: Ctx, vm_ref: str, value: bool) -> None:
    with ctx.engine.lock:
        vm = ctx.store.rec("VM", vm_ref)
        if value and vm["power_state"] != "Halted":
            raise XapiError("VM_BAD_POWER_STATE", vm_ref, "halted", vm["power_state"].lower())
        # Through update_vm: what a client may do with it changes too.
        update_vm(ctx.engine, vm_ref, {"is_a_template": value})


# -- placement queries ----------------------------------------------------------------


def vm_assert_can_boot_here(ctx: Ctx, vm_ref: str, host: str) -> None:
    with ctx.engine.lock:
        assert_can_boot_here(ctx.engine, vm_ref, ctx.store.rec("VM", vm_ref), host)


def vm_get_possible_hosts(ctx: Ctx, vm_ref: str) -> list[str]:
    with ctx.engine.lock:
        vm = ctx.store.rec("VM", vm_ref)
        out = []
        for host in ctx.engine.hosts:
            try:
                assert_can_boot_here(ctx.engine, vm_ref, vm, host)
            except XapiError:
                continue
            out.append(host)
        return out


def register(reg: Registry) -> None:
    vm = ("vm", "ref:VM")
    op = {"op": True}
    b = [("start_paused", "bool"), ("force", "bool")]
    reg.add("VM.start", [vm, *b], vm_start, **op)
    reg.add("VM.start_on", [vm, ("host", "ref:host"), *b], vm_start_on, **op)
    reg.add("VM.resume", [vm, *b], vm_resume, **op)
    reg.add("VM.resume_on", [vm, ("host", "ref:host"), *b], vm_resume_on, **op)
    for name, fn in (
        ("clean_shutdown", vm_clean_shutdown),
        ("hard_shutdown", vm_hard_shutdown),
        ("shutdown", vm_shutdown),
        ("clean_reboot", vm_clean_reboot),
        ("hard_reboot", vm_hard_reboot),
        ("pause", vm_pause),
        ("unpause", vm_unpause),
        ("suspend", vm_suspend),
    ):
        reg.add(f"VM.{name}", [vm], fn, **op)
    reg.add("VM.pool_migrate", [vm, ("host", "ref:host"), ("options", "map")], vm_pool_migrate, **op)
    reg.add("VM.clone", [vm, ("new_name", "string")], vm_clone, **op)
    reg.add("VM.copy", [vm, ("new_name", "string"), ("sr", "ref?:SR")], vm_copy, **op)
    reg.add("VM.snapshot", [vm, ("new_name", "string"), ("ignore_vdis", "set")], vm_snapshot, optional=1, **op)
    reg.add("VM.destroy", [vm], vm_destroy)
    i = "int"
    reg.add(
        "VM.set_memory_limits",
        [vm, ("static_min", i), ("static_max", i), ("dynamic_min", i), ("dynamic_max", i)],
        vm_set_memory_limits,
    )
    reg.add("VM.set_memory", [vm, ("value", i)], vm_set_memory)
    reg.add("VM.set_memory_dynamic_range", [vm, ("min", i), ("max", i)], vm_set_memory_dynamic_range)
    reg.add("VM.set_memory_static_range", [vm, ("min", i), ("max", i)], vm_set_memory_static_range)
    reg.add("VM.set_VCPUs_max", [vm, ("value", i)], vm_set_vcpus_max)
    reg.add("VM.set_VCPUs_at_startup", [vm, ("value", i)], vm_set_vcpus_at_startup)
    reg.add("VM.set_is_a_template", [vm, ("value", "bool")], vm_set_is_a_template, async_ok=False)
    reg.add("VM.assert_can_boot_here", [vm, ("host", "ref:host")], vm_assert_can_boot_here)
    reg.add("VM.get_possible_hosts", [vm], vm_get_possible_hosts, async_ok=False)
