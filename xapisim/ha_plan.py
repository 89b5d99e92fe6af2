"""HA's plan: what the pool could survive, read from the store and never written.

The glue between the store and ``planner`` (the pure, xapi-faithful planning
functions), following ``xapi_ha_vm_failover.ml``:

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

Nothing here changes the engine: ``ha_status`` writes the pool's HA fields,
``ha_calls`` serves the HA calls and ``ha_restart`` restarts VMs, all from
these computations.  Call with the engine lock held.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import planner
from .datamodel import NULL_REF, Record
from .errors import XapiError
from .vmstate import Agility, assert_agile, host_free, need, sees_sr, vm_srs

if TYPE_CHECKING:
    from .engine import Engine

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


def ha_timeout(engine: Engine) -> float:
    """Seconds before a failed host is declared dead: HA's "timeout", else the default."""
    pool = engine.pool_record()
    if pool["ha_enabled"]:
        try:
            return float(pool["ha_configuration"].get("timeout", engine.config.ha_timeout))
        except ValueError:
            pass
    return engine.config.ha_timeout


@dataclass
class PlanConfig:
    hosts: list[planner.PlanHost]
    vms: list[planner.PlanVM]
    non_agile: bool
    total_hosts: int
    # Offline non-agile protected VMs whose pinned host cannot take them.
    unplaceable: bool = False


def build_config(engine: Engine, change: Change | None = None) -> PlanConfig:
    """The planner's view of the pool now, or after ``change``."""
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
    return PlanConfig(plan_hosts, vms, non_agile, len(hosts), unplaceable)


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
        pool = engine.pool_record()
        if not pool["ha_enabled"] or pool["ha_allow_overcommit"]:
            return
        n = pool["ha_plan_exists_for"]
        if plan_status(engine, n) != ALL:
            return  # no plan now: an operation cannot make it worse
        after = n if change.num_failures is None else change.num_failures
        if plan_status(engine, after, change) != ALL:
            raise XapiError("HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN")


def failover_plan(engine: Engine, failed_hosts: list[str], failed_vms: list[str]) -> dict[str, Any]:
    """Where the given VMs would restart if the given hosts failed (biggest-fit-decreasing).

    xapi's ``pool.ha_compute_vm_failover_plan``: ``{vm: {"host": h}}``, or
    ``{vm: {"error_code": code}}`` for a VM that is not agile or fits nowhere.
    """
    cfg = build_config(engine, Change(hosts_to_disable=list(failed_hosts)))
    vms = []
    errors: dict[str, dict[str, str]] = {}
    for vm_ref in failed_vms:
        vm = engine.store.rec("VM", vm_ref)
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


@dataclass(frozen=True)
class RestartPlan:
    """The protected VMs that are down, in the order HA restarts them, and where."""

    groups: list[list[str]]  # one ``order`` group after the other
    hosts: dict[str, str | None]  # the planner's host for each agile one (None: fits nowhere)


def _order_key(vm: Record) -> int:
    # xapi starts negative orders last.
    order = int(vm["order"])
    return order if order >= 0 else 1 << 62


def restart_plan(engine: Engine) -> RestartPlan:
    s = engine.store
    all_vms = s.tables["VM"]
    down = [v for v, r in all_vms.items() if is_protected(r) and r["power_state"] == "Halted"]
    cfg = build_config(engine)
    agility = Agility(engine)
    plan_vms = [planner.PlanVM(v, need(all_vms[v]), DOWN) for v in down if agility.agile(engine, all_vms[v])]
    hosts = planner.place_failed(cfg.hosts, plan_vms, {DOWN})
    groups: dict[int, list[str]] = {}
    for v in down:
        groups.setdefault(_order_key(all_vms[v]), []).append(v)
    return RestartPlan([groups[key] for key in sorted(groups)], hosts)
