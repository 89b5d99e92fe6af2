"""The HA calls: pool.enable_ha, disable_ha, the tolerance settings and plan queries; VM HA settings.

Thin handlers: they check their arguments as xapi does, ask ``ha_plan`` and
write through ``ha_status`` (the pool's HA fields) and ``storage`` (the
statefiles).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import XapiError
from .ha_plan import ALL, Change, assert_change_preserves_plan, failover_plan, max_failures, plan_status
from .ha_status import update_pool_status
from .storage import destroy_vdi, new_vdi
from .vmstate import assert_agile

if TYPE_CHECKING:
    from .api import Registry
    from .engine import Ctx

# -- pool calls ------------------------------------------------------------------


def pool_enable_ha(ctx: Ctx, heartbeat_srs: list[str], configuration: dict[str, str]) -> None:
    engine = ctx.engine
    s = ctx.store
    with engine.lock:
        pool = engine.pool_record()
        if pool["ha_enabled"]:
            raise XapiError("HA_IS_ENABLED")
        if len(s.tables["host"]) < 2:
            raise XapiError("HA_TOO_FEW_HOSTS")
        if "timeout" in configuration:
            try:
                if float(configuration["timeout"]) <= 0:
                    raise ValueError
            except ValueError:
                raise XapiError("INVALID_VALUE", "timeout", configuration["timeout"]) from None
        srs = heartbeat_srs or [r for r, sr in s.tables["SR"].items() if sr["shared"]][:1]
        if not srs:
            raise XapiError("CANNOT_CREATE_STATE_FILE")
        for sr in srs:
            if not s.exists("SR", sr):
                raise XapiError("HANDLE_INVALID", "SR", sr)
            if not s.tables["SR"][sr]["shared"]:
                raise XapiError("HA_CONSTRAINT_VIOLATION_SR_NOT_SHARED", sr)
    ctx.sleep(engine.config.op_delay * 4)
    with engine.lock:
        statefiles = [new_vdi(engine, sr, "Statefile for HA", 4 << 20, vtype="ha_statefile") for sr in srs]
        addresses = [s.tables["host"][h]["address"] for h in engine.hosts]
        for h in engine.hosts:
            s.update(
                h,
                {
                    "ha_statefiles": list(statefiles),
                    "ha_network_peers": [a for a in addresses if a != s.tables["host"][h]["address"]],
                },
            )
        s.update(
            engine.pool_ref,
            {
                "ha_enabled": True,
                "ha_configuration": {str(k): str(v) for k, v in configuration.items()},
                "ha_statefiles": list(statefiles),
                "ha_plan_exists_for": 0,
                "ha_overcommitted": False,
            },
        )
        # Running VMs with priority "restart" are protected from now on.
        for vm_ref, vm in list(s.tables["VM"].items()):
            if vm["ha_restart_priority"] == "restart" and vm["power_state"] == "Running":
                s.update(vm_ref, {"ha_always_run": True})
        update_pool_status(engine)


def pool_disable_ha(ctx: Ctx) -> None:
    engine = ctx.engine
    s = ctx.store
    with engine.lock:
        pool = engine.pool_record()
        if not pool["ha_enabled"]:
            raise XapiError("HA_NOT_ENABLED")
        for vdi in pool["ha_statefiles"]:
            if s.exists("VDI", vdi):
                destroy_vdi(engine, vdi)
        for h in engine.hosts:
            s.update(h, {"ha_statefiles": [], "ha_network_peers": []})
        s.update(
            engine.pool_ref,
            {
                "ha_enabled": False,
                "ha_configuration": {},
                "ha_statefiles": [],
                "ha_plan_exists_for": 0,
                "ha_overcommitted": False,
            },
        )


def pool_set_ha_host_failures_to_tolerate(ctx: Ctx, pool: str, value: int) -> None:
    engine = ctx.engine
    with engine.lock:
        if value < 0:
            raise XapiError("INVALID_VALUE", "ha_host_failures_to_tolerate", value)
        assert_change_preserves_plan(engine, Change(num_failures=value))
        ctx.store.update(pool, {"ha_host_failures_to_tolerate": value})
        update_pool_status(engine)


def pool_set_ha_allow_overcommit(ctx: Ctx, pool: str, value: bool) -> None:
    with ctx.engine.lock:
        ctx.store.update(pool, {"ha_allow_overcommit": value})
        update_pool_status(ctx.engine)


def pool_ha_compute_max_host_failures_to_tolerate(ctx: Ctx) -> int:
    with ctx.engine.lock:
        return max_failures(ctx.engine)


def pool_ha_compute_hypothetical_max_host_failures_to_tolerate(ctx: Ctx, configuration: dict[str, str]) -> int:
    with ctx.engine.lock:
        for vm, prio in configuration.items():
            if not ctx.store.exists("VM", vm):
                raise XapiError("HANDLE_INVALID", "VM", vm)
            _validate_priority(prio)
        return max_failures(ctx.engine, Change(protected_override=dict(configuration)))


def pool_ha_failover_plan_exists(ctx: Ctx, n: int) -> bool:
    with ctx.engine.lock:
        return plan_status(ctx.engine, n) == ALL


def pool_ha_compute_vm_failover_plan(ctx: Ctx, failed_hosts: list[str], failed_vms: list[str]) -> dict[str, Any]:
    with ctx.engine.lock:
        return failover_plan(ctx.engine, failed_hosts, failed_vms)


# -- VM calls --------------------------------------------------------------------


def _validate_priority(value: str) -> None:
    if value not in ("restart", "best-effort", ""):
        raise XapiError("INVALID_VALUE", "ha_restart_priority", value)


def vm_set_ha_restart_priority(ctx: Ctx, vm_ref: str, value: str) -> None:
    engine = ctx.engine
    with engine.lock:
        vm = ctx.store.rec("VM", vm_ref)
        _validate_priority(value)
        current = vm["ha_restart_priority"]
        if current != "restart" and value == "restart" and vm["power_state"] != "Halted":
            assert_change_preserves_plan(engine, Change(new_protected=[vm_ref]))
        values: dict[str, Any] = {"ha_restart_priority": value}
        if vm["power_state"] == "Running":
            values["ha_always_run"] = value == "restart"
        ctx.store.update(vm_ref, values)
        update_pool_status(engine)


def vm_set_ha_always_run(ctx: Ctx, vm_ref: str, value: bool) -> None:
    """Deprecated since Boston; xapi maps it onto the restart priority."""
    vm_set_ha_restart_priority(ctx, vm_ref, "restart" if value else "")


def vm_set_order(ctx: Ctx, vm_ref: str, value: int) -> None:
    with ctx.engine.lock:
        ctx.store.rec("VM", vm_ref)
        ctx.store.update(vm_ref, {"order": value})


def vm_set_start_delay(ctx: Ctx, vm_ref: str, value: int) -> None:
    with ctx.engine.lock:
        ctx.store.rec("VM", vm_ref)
        ctx.store.update(vm_ref, {"start_delay": value})


def vm_assert_agile(ctx: Ctx, vm_ref: str) -> None:
    with ctx.engine.lock:
        assert_agile(ctx.engine, ctx.store.rec("VM", vm_ref))


def register(reg: Registry) -> None:
    p = ("self", "ref:pool")
    reg.add("pool.enable_ha", [("heartbeat_srs", "set:ref:SR"), ("configuration", "map")], pool_enable_ha)
    reg.add("pool.disable_ha", [], pool_disable_ha)
    reg.add("pool.set_ha_host_failures_to_tolerate", [p, ("value", "int")], pool_set_ha_host_failures_to_tolerate)
    reg.add("pool.set_ha_allow_overcommit", [p, ("value", "bool")], pool_set_ha_allow_overcommit)
    reg.add("pool.ha_compute_max_host_failures_to_tolerate", [], pool_ha_compute_max_host_failures_to_tolerate)
    reg.add(
        "pool.ha_compute_hypothetical_max_host_failures_to_tolerate",
        [("configuration", "map")],
        pool_ha_compute_hypothetical_max_host_failures_to_tolerate,
    )
    reg.add("pool.ha_failover_plan_exists", [("n", "int")], pool_ha_failover_plan_exists)
    reg.add(
        "pool.ha_compute_vm_failover_plan",
        [("failed_hosts", "set:ref:host"), ("failed_vms", "set:ref:VM")],
        pool_ha_compute_vm_failover_plan,
    )
    vm = ("self", "ref:VM")
    reg.add("VM.set_ha_restart_priority", [vm, ("value", "string")], vm_set_ha_restart_priority)
    reg.add("VM.set_ha_always_run", [vm, ("value", "bool")], vm_set_ha_always_run)
    reg.add("VM.set_order", [vm, ("value", "int")], vm_set_order)
    reg.add("VM.set_start_delay", [vm, ("value", "int")], vm_set_start_delay)
    reg.add("VM.assert_agile", [vm], vm_assert_agile)
