"""High availability: the failover plan, the pool's HA fields, and VM restarts.

This is the glue between the store and ``planner`` (the pure, xapi-faithful
planning functions), following ``xapi_ha_vm_failover.ml``:

* protected VMs are those with ``ha_restart_priority = "restart"`` and
  ``ha_always_run`` (set when such a VM is started, cleared when its owner
  shuts it down or suspends it; a crash leaves it set);
* only live, enabled hosts take part; a host's capacity is its free memory
  with everything resident counted (``vmstate``);
* protected VMs that are not agile (local disk, unshared network) are fixed
  overhead on the host they are pinned to, and while any exists the pool can
  at best have a plan "excluding non-agile VMs", which xapi treats as
  overcommitted;
* ``assert_change_preserves_plan`` refuses an operation only if a plan exists
  now for ``ha_plan_exists_for`` failures and would not after it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import planner
from .datamodel import NULL_REF, Record
from .engine import Ctx
from .errors import XapiError
from .vmstate import Agility, assert_agile, host_free, need, sees_sr, vm_srs

if TYPE_CHECKING:
    from .api import Registry
    from .engine import Engine

log = logging.getLogger("xapisim.ha")

ALL, EXCLUDING_NON_AGILE, NONE = "all", "excluding_non_agile", "none"
# The sentinel host of protected VMs that are down: the planner restarts them first.
DOWN = ""


@dataclass
class Change:
    """A hypothetical change, as xapi's ``configuration_change``."""

    arriving: list[tuple[str, str]] = field(default_factory=list)  # (host, vm)
    leaving: list[tuple[str, str]] = field(default_factory=list)  # (host, vm)
    new_protected: list[str] = field(default_factory=list)
    hosts_to_disable: list[str] = field(default_factory=list)
    protected_override: dict[str, str] | None = None  # vm -> priority (hypothetical)
    num_failures: int | None = None  # plan for this many failures instead


def is_protected(vm: Record) -> bool:
    return (
        vm["ha_restart_priority"] == "restart"
        and vm["ha_always_run"]
        and not vm["is_a_template"]
        and not vm["is_control_domain"]
    )


def _pool(engine: Engine) -> Record:
    return engine.store.tables["pool"][engine.pool_ref]


@dataclass
class Config:
    hosts: list[planner.PlanHost]
    vms: list[planner.PlanVM]
    non_agile: bool
    total_hosts: int
    # Offline non-agile protected VMs whose pinned host cannot take them.
    unplaceable: bool = False


def build_config(engine: Engine, change: Change | None = None) -> Config:
    """The planner's view of the pool now, or after ``change``. Call with the lock held."""
    change = change or Change()
    s = engine.store
    hosts = s.tables["host"]
    live = sorted(
        (h for h, r in hosts.items() if r["enabled"] and engine.is_live(h) and h not in change.hosts_to_disable),
        key=lambda h: hosts[h]["uuid"],
    )
    capacity = {h: host_free(engine, h) for h in live}
    leaving = {vm: h for h, vm in change.leaving}
    arriving = {vm: h for h, vm in change.arriving}
    for vm, h in leaving.items():
        if h in capacity:
            capacity[h] += need(s.tables["VM"][vm])
    for vm, h in arriving.items():
        if h in capacity:
            capacity[h] -= need(s.tables["VM"][vm])

    vms: list[planner.PlanVM] = []
    non_agile = False
    unplaceable = False
    all_vms = s.tables["VM"]
    agility = Agility(engine)
    if change.protected_override is not None:
        candidates = [v for v, prio in change.protected_override.items() if prio == "restart" and v in all_vms]
    else:
        candidates = [v for v, r in all_vms.items() if is_protected(r)] + [
            v for v in change.new_protected if v in all_vms and not is_protected(all_vms[v])
        ]
    for vm_ref in sorted(candidates, key=lambda v: all_vms[v]["uuid"]):
        vm = all_vms[vm_ref]
        if vm["is_a_template"] or vm["is_control_domain"]:
            continue
        where = arriving.get(vm_ref)
        if where is None and vm_ref not in leaving:
            where = vm["resident_on"] if vm["resident_on"] != NULL_REF else engine.reserved.get(vm_ref)
        accounted = where if where in capacity else None
        if agility.agile(engine, vm):
            vms.append(planner.PlanVM(vm_ref, need(vm), accounted or DOWN))
            continue
        non_agile = True
        if accounted is None:
            # Pinned to a host that can see its local disks; down now, so count it there.
            pinned = next((h for h in live if all(sees_sr(engine, h, sr) for sr in vm_srs(engine, vm))), None)
            if pinned is None:
                unplaceable = True
            else:
                capacity[pinned] -= need(vm)
    plan_hosts = [planner.PlanHost(h, max(0, capacity[h])) for h in live]
    return Config(plan_hosts, vms, non_agile, len(hosts), unplaceable)


def plan_status(engine: Engine, n: int, change: Change | None = None) -> str:
    cfg = build_config(engine, change)
    if cfg.unplaceable:
        return NONE
    if not planner.plan_exists_for(cfg.hosts, cfg.vms, n, total_hosts=cfg.total_hosts):
        return NONE
    return EXCLUDING_NON_AGILE if cfg.non_agile else ALL


def max_failures(engine: Engine, change: Change | None = None) -> int:
    cfg = build_config(engine, change)
    if cfg.non_agile or cfg.unplaceable:
        return 0  # xapi bisects on "a plan for all VMs", which never holds then
    return planner.max_failures_tolerated(cfg.hosts, cfg.vms, total_hosts=cfg.total_hosts)


def assert_change_preserves_plan(engine: Engine, change: Change) -> None:
    """HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN if ``change`` would lose a plan that exists now."""
    with engine.lock:
        pool = _pool(engine)
        if not pool["ha_enabled"] or pool["ha_allow_overcommit"]:
            return
        n = pool["ha_plan_exists_for"]
        if plan_status(engine, n) != ALL:
            return  # no plan now: an operation cannot make it worse
        after = n if change.num_failures is None else change.num_failures
        if plan_status(engine, after, change) != ALL:
            raise XapiError("HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN")


def update_pool_status(engine: Engine) -> None:
    """Keep ha_plan_exists_for and ha_overcommitted current, with xapi's messages."""
    with engine.lock:
        pool = _pool(engine)
        if not pool["ha_enabled"]:
            return
        s = engine.store
        to_tolerate = pool["ha_host_failures_to_tolerate"]
        planned_for = pool["ha_plan_exists_for"]
        if plan_status(engine, to_tolerate) == ALL:
            s.update(engine.pool_ref, {"ha_overcommitted": False, "ha_plan_exists_for": to_tolerate})
            return
        most = max_failures(engine)
        if planned_for != most:
            s.update(engine.pool_ref, {"ha_plan_exists_for": min(to_tolerate, most)})
            if most < planned_for:
                engine.message("HA_POOL_DROP_IN_PLAN_EXISTS_FOR", "Pool", pool["uuid"], str(most))
        if not pool["ha_overcommitted"]:
            s.update(engine.pool_ref, {"ha_overcommitted": True})
            engine.message(
                "HA_POOL_OVERCOMMITTED",
                "Pool",
                pool["uuid"],
                f"The failover tolerance for pool '{pool['name_label']}' has dropped and the initially "
                "specified number of host failures to tolerate can no longer be guaranteed",
            )


# -- pool calls ------------------------------------------------------------------


def ha_timeout(engine: Engine) -> float:
    """Seconds before a failed host is declared dead: HA's "timeout", else the default."""
    pool = _pool(engine)
    if pool["ha_enabled"]:
        try:
            return float(pool["ha_configuration"].get("timeout", engine.config.ha_timeout))
        except ValueError:
            pass
    return engine.config.ha_timeout


def pool_enable_ha(ctx: Ctx, heartbeat_srs: list[str], configuration: dict[str, str]) -> None:
    engine = ctx.engine
    s = ctx.store
    with engine.lock:
        pool = _pool(engine)
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
        from .ops_vm import _new_vdi

        statefiles = [_new_vdi(engine, sr, "Statefile for HA", 4 << 20, vtype="ha_statefile") for sr in srs]
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
        pool = _pool(engine)
        if not pool["ha_enabled"]:
            raise XapiError("HA_NOT_ENABLED")
        for vdi in pool["ha_statefiles"]:
            if s.exists("VDI", vdi):
                from .ops_vm import _destroy_vdi

                _destroy_vdi(engine, vdi)
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
    """Where the given VMs would restart if the given hosts failed (biggest-fit-decreasing)."""
    engine = ctx.engine
    with engine.lock:
        cfg = build_config(engine, Change(hosts_to_disable=list(failed_hosts)))
        vms = []
        errors: dict[str, dict[str, str]] = {}
        for vm_ref in failed_vms:
            vm = ctx.store.rec("VM", vm_ref)
            try:
                assert_agile(engine, vm)
            except XapiError as e:
                errors[vm_ref] = {"error_code": e.code}
                continue
            vms.append(planner.PlanVM(vm_ref, need(vm), DOWN))
        placed = planner.place_failed(cfg.hosts, vms, {DOWN})
        out: dict[str, Any] = dict(errors)
        for vm_ref, host in placed.items():
            out[vm_ref] = {"host": host} if host else {"error_code": "HOST_NOT_ENOUGH_FREE_MEMORY"}
        return out


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


# -- restarts ----------------------------------------------------------------------


def _order_key(vm: Record) -> int:
    # xapi starts negative orders last.
    order = int(vm["order"])
    return order if order >= 0 else 1 << 62


def restart_vms(engine: Engine, best_effort: list[str]) -> None:
    """HA's restart pass: protected VMs that are down, then ``best_effort`` ones.

    Protected VMs go where the planner puts them, an ``order`` group at a time
    (in parallel within a group), waiting the group's longest ``start_delay``
    before the next; one that cannot go there is tried anywhere, and if that
    fails too gets HA_PROTECTED_VM_RESTART_FAILED.  Best-effort VMs start
    where capacity allows.  Each start produces xapi's VM_STARTED message.
    """
    from .ops_vm import start_vm

    with engine.ha_restart_lock:
        with engine.lock:
            s = engine.store
            if not _pool(engine)["ha_enabled"]:
                return
            down = [v for v, r in s.tables["VM"].items() if is_protected(r) and r["power_state"] == "Halted"]
            cfg = build_config(engine)
            agility = Agility(engine)
            plan_vms = [
                planner.PlanVM(v, need(s.tables["VM"][v]), DOWN)
                for v in down
                if agility.agile(engine, s.tables["VM"][v])
            ]
            plan = planner.place_failed(cfg.hosts, plan_vms, {DOWN})
            groups: dict[int, list[str]] = {}
            for v in down:
                groups.setdefault(_order_key(s.tables["VM"][v]), []).append(v)

        def restart(vm_ref: str, host: str | None) -> None:
            ok = _try_start(engine, start_vm, vm_ref, host) or (
                host is not None and _try_start(engine, start_vm, vm_ref, None)
            )
            if not ok:
                with engine.lock:
                    vm = engine.store.get(vm_ref)
                    if vm is not None and vm["power_state"] == "Halted":
                        engine.message("HA_PROTECTED_VM_RESTART_FAILED", "VM", vm["uuid"], "")

        keys = sorted(groups)
        for i, key in enumerate(keys):
            if engine.stopped.is_set():
                return
            threads = [engine.spawn(restart, v, plan.get(v), name="ha-restart") for v in groups[key]]
            for t in threads:
                t.join()
            if i + 1 < len(keys):
                with engine.lock:
                    delay = max(
                        (int(s.tables["VM"][v]["start_delay"]) for v in groups[key] if v in s.tables["VM"]), default=0
                    )
                if delay > 0:
                    engine.stopped.wait(delay)
        for vm_ref in best_effort:
            with engine.lock:
                vm = s.get(vm_ref)
                if vm is None or vm["power_state"] != "Halted" or vm["ha_restart_priority"] != "best-effort":
                    continue
            _try_start(engine, start_vm, vm_ref, None, ha_check=True)
        update_pool_status(engine)


def _try_start(engine: Engine, start_vm: Any, vm_ref: str, host: str | None, *, ha_check: bool = False) -> bool:
    task = engine.new_task("VM.start")
    try:
        start_vm(Ctx(engine, None, engine.master(), task), vm_ref, host, False, "start", ha_check=ha_check)
        return True
    except XapiError as e:
        log.info("HA could not start %s on %s: %s", vm_ref, host, e)
        return False
    finally:
        with engine.lock:
            engine.cancel_events.pop(task, None)
            engine.store.destroy(task)


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
