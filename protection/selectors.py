"""Reads of protection: a VM's protection state (the one definition), the failover plan, lists,
and what a VM's page shows of its protection.

A VM's protection state (level, health, and its group in the Protected VM Summary) is defined once,
by ``vm_annotate_protection``, as query annotations: the console's table sorts and filters on them
in the database, and the summary counts and the tree's marks read the same annotations, so they
always agree.
"""
from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from django.db import models
from django.db.models import Case, Count, Exists, F, OuterRef, Q, QuerySet, Subquery, Value, When
from django.db.models.functions import Coalesce
from django.template.defaultfilters import filesizeformat
from django.utils.dateparse import parse_datetime

from eac.audit import AuditAction, AuditEntry
from inventory.models import VBD, VM, Host, Pool

from . import planner
from .choices import (
    ACTIVE_RUN_STATES,
    AM_LEVELS,
    RUNNING_STATES,
    ComponentState,
    Health,
    ProtectionStatus,
    RestartPriority,
    SummaryGroup,
    uses_ams,
)
from .models import FailoverEvent, Protection, WorkflowRun

# -- a VM's protection state -------------------------------------------------------------------------

def _pinned_to_a_host() -> Exists:
    """A disk (or a CD with a disc in) on storage only one host reaches: XAPI would not call the VM agile."""
    return Exists(
        VBD.objects.filter(vm=OuterRef("pk"), vdi__isnull=False).filter(
            Q(vdi__sr__isnull=True) | Q(vdi__sr__shared=False)
        )
    )


def vm_annotate_protection(qs: QuerySet[VM]) -> QuerySet[VM]:
    """Annotate ``prot_level`` (int or None), ``prot_health`` (Health), ``prot_status`` (SummaryGroup),
    ``prot_secondary`` (the secondary host's name, Level 2/3) and ``prot_pk`` (the Protection's id).

    ``prot_status`` is level1/level2/level3 when protected and healthy (or being unprotected: XAPI
    still restarts it), candidate while being protected, degraded for any other protection state, and
    candidate or unprotected without protection (a candidate is an ordinary VM whose disks are all on
    shared storage).
    """
    p = "protection__"
    well = {f"{p}status__in": [ProtectionStatus.PROTECTED, ProtectionStatus.UNPROTECTING]}
    return qs.annotate(
        prot_pk=F(f"{p}pk"),
        prot_level=F(f"{p}level"),
        prot_health=Case(
            When(**{f"{p}isnull": True}, then=Value(Health.UNPROTECTED)),
            # Being set up is not a loss of redundancy: not protected yet, not degraded.
            When(**{f"{p}status": ProtectionStatus.PROTECTING}, then=Value(Health.UNPROTECTED)),
            # Until unprotect has run, XAPI still restarts the VM.
            When(**well, then=Value(Health.GOOD)),
            When(**{f"{p}status": ProtectionStatus.FAILED}, then=Value(Health.FAILED)),
            default=Value(Health.DEGRADED),
            output_field=models.CharField(),
        ),
        prot_status=Case(
            When(**well, **{f"{p}level": 1}, then=Value(SummaryGroup.LEVEL1)),
            When(**well, **{f"{p}level": 2}, then=Value(SummaryGroup.LEVEL2)),
            When(**well, **{f"{p}level": 3}, then=Value(SummaryGroup.LEVEL3)),
            When(**{f"{p}status": ProtectionStatus.PROTECTING}, then=Value(SummaryGroup.CANDIDATE)),
            When(**{f"{p}isnull": False}, then=Value(SummaryGroup.DEGRADED)),
            When(Q(is_a_template=True) | Q(is_control_domain=True) | Q(is_a_snapshot=True),
                 then=Value(SummaryGroup.UNPROTECTED)),
            When(_pinned_to_a_host(), then=Value(SummaryGroup.UNPROTECTED)),
            default=Value(SummaryGroup.CANDIDATE),
            output_field=models.CharField(),
        ),
        # Level 1 has no secondary host: "".
        prot_secondary=Coalesce(F(f"{p}secondary_host__name_label"), Value(""), output_field=models.CharField()),
    )


# -- where a VM runs, as the console shows it -------------------------------------------------------------


def _running_copy() -> QuerySet[VM]:
    """Of a VM (the outer query) whose Level 2 protection failed over: its secondary VM, when it runs on a host."""
    return VM.objects.filter(pool=OuterRef("pool"), uuid=OuterRef("protection__secondary_vm_uuid"),
                             power_state="Running", resident_on__isnull=False)


def vm_annotate_placement(qs: QuerySet[VM]) -> QuerySet[VM]:
    """Annotate ``shown_host_id`` and ``shown_power_state``: where and how the console shows the VM running.

    After a Level 2 failover the VM's service is its secondary VM, running on the secondary host from the
    mirrored disks with the VM's MACs and address: the protected VM is shown there, running, under its own name
    (and its copy is left out of the lists, ``vm_exclude_stand_ins``). Otherwise XAPI's ``resident_on`` and
    ``power_state``."""
    # The protection's own columns before the subquery: PostgreSQL evaluates the condition left to right and stops
    # at the first false, so a VM that did not fail over (nearly all of them) costs no subquery. With the subquery
    # first, a pool of 2,500 VMs ran it twice per VM: 0.8 s per read of one pool's tree labels (0.15 s for twenty
    # pools, where the planner hashes it instead), on every live batch of that pool.
    copy = _running_copy()
    failed_over = Q(protection__failed_over_to__isnull=False, protection__level__in=AM_LEVELS) & Exists(copy)
    return qs.annotate(
        shown_host_id=Case(
            When(failed_over, then=Subquery(copy.values("resident_on")[:1])),
            default=F("resident_on"),
            output_field=models.BigIntegerField(),
        ),
        shown_power_state=Case(
            When(failed_over, then=Value("Running")),
            default=F("power_state"),
            output_field=models.CharField(),
        ),
    )


def _failed_over() -> QuerySet[Protection]:
    """The Level 2/3 protections whose VM runs as its secondary VM now."""
    return Protection.objects.filter(level__in=AM_LEVELS, failed_over_to__isnull=False)


def pools_failed_over(pool_ids: Iterable[int]) -> set[int]:
    """The pools, of ``pool_ids``, with a Level 2/3 protection failed over: only there may a VM be shown elsewhere
    than XAPI says (``vm_annotate_placement``) or stand in for another (``vm_exclude_stand_ins``)."""
    return set(_failed_over().filter(pool_id__in=list(pool_ids)).values_list("pool_id", flat=True).distinct())


def vm_exclude_stand_ins(qs: QuerySet[VM]) -> QuerySet[VM]:
    """Without the secondary VMs that stand in for their protected VM after a Level 2 failover: the protected
    VM is shown in their place (``vm_annotate_placement``)."""
    return qs.exclude(Exists(_failed_over().filter(pool=OuterRef("pool"), secondary_vm_uuid=OuterRef("uuid"))))


class ProtectionState(NamedTuple):
    level: int | None
    health: str  # Health
    status: str  # SummaryGroup
    secondary_host: str = ""  # name of the secondary host (Level 2/3), for the "Hosts" column
    protection_pk: int | None = None  # for the "Unprotect" action


def _state_of(vm: VM) -> ProtectionState:
    return ProtectionState(vm.prot_level, vm.prot_health, vm.prot_status, vm.prot_secondary or "",
                           getattr(vm, "prot_pk", None))


def vm_protection_states(vms: Iterable[VM]) -> dict[int, ProtectionState]:
    """{vm id: ProtectionState} for the given VMs, in one query (none if they come annotated).

    """
    vms = list(vms)
    if all(hasattr(vm, "prot_status") for vm in vms):
        return {vm.pk: _state_of(vm) for vm in vms}
    rows = vm_annotate_protection(VM.objects.filter(pk__in=[vm.pk for vm in vms]))
    return {vm.pk: _state_of(vm) for vm in rows}


def vm_status_counts(pool_ids: Iterable[int]) -> dict[int, dict[str, int]]:
    """{pool id: {ProtectionStatus: VMs}} for the Protected VM Summary, in one query.

    Counted on the annotations the table filters on, so a group's count is the number of rows
    the table shows for that status.
    """
    pool_ids = list(pool_ids)
    counts: dict[int, dict[str, int]] = {pk: {} for pk in pool_ids}
    rows = (
        vm_annotate_protection(vm_exclude_stand_ins(VM.objects.ordinary().filter(pool_id__in=pool_ids)))
        .values_list("pool_id", "prot_status")
        .annotate(n=Count("pk"))
        .order_by()
    )
    for pool_id, status, n in rows:
        counts[pool_id][status] = n
    return counts


def vm_health_marks(pool_ids: Iterable[int]) -> dict[tuple[int, int | None], str]:
    """{(pool id, host id or None for not running): worst health (degraded or failed)} of the VMs whose
    protection is not well, for the marks of the tree."""
    marks: dict[tuple[int, int | None], str] = defaultdict(str)
    rows = (
        vm_annotate_placement(vm_annotate_protection(VM.objects.ordinary().filter(pool_id__in=list(pool_ids))))
        # Only a protection can be unwell: the inner join keeps this cheap when few VMs are protected
        # (it runs for every batch of live changes).
        .filter(protection__isnull=False)
        .filter(prot_health__in=[Health.DEGRADED, Health.FAILED])
        .values_list("pool_id", "shown_host_id", "prot_health")
        .distinct()
        .order_by()
    )
    for pool_id, host_id, health in rows:
        if marks[pool_id, host_id] != Health.FAILED:
            marks[pool_id, host_id] = health
    return marks


# -- protections and runs ----------------------------------------------------------------------


def vm_active_run(vm: VM) -> WorkflowRun | None:
    """The workflow changing the VM's protection now, if any (at most one runs per VM)."""
    return WorkflowRun.objects.filter(vm=vm, state__in=ACTIVE_RUN_STATES).order_by("-created_at", "-pk").first()


def protection_list(*, pool: Pool | None = None) -> QuerySet[Protection]:
    qs = Protection.objects.select_related("vm", "pool", "vm__resident_on", "secondary_host").prefetch_related(
        "disks__primary_host", "disks__secondary_host")
    return qs.filter(pool=pool) if pool is not None else qs


def run_list() -> QuerySet[WorkflowRun]:
    return WorkflowRun.objects.select_related("pool", "vm", "created_by").prefetch_related("steps")


def failover_event_list(*, pool: Pool | None = None) -> QuerySet[FailoverEvent]:
    qs = FailoverEvent.objects.select_related("pool")
    return qs.filter(pool=pool) if pool is not None else qs


def protected_vm_refs(pool: Pool, *, exclude_vm_id: int | None = None) -> dict[str, str]:
    """{VM ref: restart priority} of the pool's protected VMs, as the inventory mirrors them."""
    qs = VM.objects.ordinary().filter(pool=pool).exclude(ha_restart_priority="")
    if exclude_vm_id is not None:
        qs = qs.exclude(pk=exclude_vm_id)
    return dict(qs.values_list("ref", "ha_restart_priority"))


# -- the failover plan --------------------------------------------------------------------------


def plan_inputs(
    pool: Pool, *, add_vm: VM | None = None, remove_vm: VM | None = None
) -> tuple[list[planner.Host], list[planner.ProtectedVM], int]:
    """Live hosts and protected VMs of ``pool`` as the planner wants them, from the inventory.

    Like XAPI: hosts that are live and enabled; a host offers its free memory; protected VMs are those
    with restart priority "restart" that run (on a live host) or that should run (lost with a host,
    an open failover event); they need their static maximum memory.
    """
    hosts = list(Host.objects.filter(pool=pool).order_by("uuid").values("pk", "uuid", "name_label", "live",
                                                                         "enabled", "memory_free"))
    live = {h["pk"]: h for h in hosts if h["live"] and h["enabled"]}
    plan_hosts = [planner.Host(key=h["uuid"], capacity=h["memory_free"], name=h["name_label"] or h["uuid"])
                  for h in live.values()]
    down_uuids = set(FailoverEvent.objects.filter(pool=pool, state=FailoverEvent.State.DOWN)
                     .values_list("vm_uuid", flat=True))
    candidates = (
        VM.objects.ordinary().filter(pool=pool)
        .filter(Q(ha_restart_priority=RestartPriority.RESTART) | Q(uuid__in=down_uuids))
        .order_by("uuid")
        .values("pk", "uuid", "name_label", "power_state", "resident_on_id", "memory_static_max",
                "memory_overhead")
    )
    vms = []
    for vm in candidates:
        if remove_vm is not None and vm["pk"] == remove_vm.pk:
            continue
        if add_vm is not None and vm["pk"] == add_vm.pk:
            continue
        vms.append(_plan_vm(vm, live, down_uuids))
    if add_vm is not None:
        vms.append(_plan_vm({"pk": add_vm.pk, "uuid": add_vm.uuid, "name_label": add_vm.name_label,
                             "power_state": add_vm.power_state, "resident_on_id": add_vm.resident_on_id,
                             "memory_static_max": add_vm.memory_static_max,
                             "memory_overhead": add_vm.memory_overhead}, live, down_uuids))
    vms = [vm for vm in vms if vm is not None]
    vms.sort(key=lambda vm: vm.key)
    return plan_hosts, vms, len(hosts)


def _plan_vm(vm: dict, live: dict, down_uuids: set[str]) -> planner.ProtectedVM | None:
    running = vm["power_state"] in RUNNING_STATES
    if not running and vm["uuid"] not in down_uuids:
        return None  # shut down on purpose: XAPI does not plan for it
    host = live.get(vm["resident_on_id"]) if running else None
    # XAPI reserves memory_static_max + memory_overhead for a VM.
    return planner.ProtectedVM(key=vm["uuid"], memory=vm["memory_static_max"] + vm["memory_overhead"],
                               host=host["uuid"] if host else None, name=vm["name_label"] or vm["uuid"])


def pool_planner(pool: Pool, *, add_vm: VM | None = None, remove_vm: VM | None = None) -> planner.Planner:
    hosts, vms, total = plan_inputs(pool, add_vm=add_vm, remove_vm=remove_vm)
    return planner.Planner(hosts, vms, total_hosts=total)


def pool_failover_plan(pool: Pool, *, failures_to_tolerate: int | None = None) -> dict:
    """The plan as the pool page and the API show it: configured, tolerable now, and what would not restart."""
    configured = pool.ha_host_failures_to_tolerate if failures_to_tolerate is None else failures_to_tolerate
    plan = pool_planner(pool)
    report = plan.report(configured)
    return {
        "pool": pool.pk,
        "pool_name": pool.name,
        "ha_enabled": pool.ha_enabled,
        "configured_failures_to_tolerate": configured,
        "max_failures_to_tolerate": report.max_tolerable,
        "xapi_plan_exists_for": pool.ha_plan_exists_for,
        "xapi_overcommitted": pool.ha_overcommitted,
        "holds": report.holds,
        "overcommitted": report.overcommitted,
        "exact": report.exact,
        "live_hosts": len(plan.hosts),
        "total_hosts": plan.total_hosts,
        "protected_vms": len(plan.vms),
        "protected_memory": sum(vm.memory for vm in plan.vms),
        "free_memory": sum(h.capacity for h in plan.hosts),
        "not_restartable_now": [{"key": k, "name": n, "memory": m} for k, n, m in report.down_unplaced],
        "shortfalls": [s.as_dict() | {"text": planner.shortfall_text(s)} for s in report.shortfalls],
    }


def pool_plan_holds(pool: Pool) -> bool:
    """Does the pool's failover plan hold as XAPI reports it: HA on, not overcommitted, a plan for the
    configured number of host failures?"""
    return (pool.ha_enabled and not pool.ha_overcommitted
            and pool.ha_plan_exists_for >= pool.ha_host_failures_to_tolerate)


def plan_refusal_reason(pool: Pool, failures_to_tolerate: int) -> str | None:
    """Why the pool cannot tolerate ``failures_to_tolerate`` host failures, or None if it can."""
    plan = pool_planner(pool)
    if failures_to_tolerate <= plan.max_failures() and not plan.overcommitted:
        return None
    return plan_blockers_text(plan, failures_to_tolerate)


def plan_blockers_text(plan: planner.Planner, failures: int) -> str:
    best = plan.max_failures()
    if plan.overcommitted:
        names = ", ".join(plan.vms[v].name for v in plan.down_unplaced)
        return f"The pool cannot even restart the protected VMs that are down now ({names})."
    if failures > len(plan.hosts):
        return f"The pool has only {len(plan.hosts)} live host(s)."
    lines = [planner.shortfall_text(s) for s in plan.explain(failures, limit=3)]
    head = f"The pool can tolerate at most {best} host failure(s)."
    return " ".join([head, *lines]) if lines else head


# -- what a VM's page shows of its protection ----------------------------------------------------


@dataclass(frozen=True)
class Component:
    """One part of a protected VM (primary or secondary host, a disk, a NIC, an availability link)."""

    kind: str
    name: str
    health: str
    since: dt.datetime | None = None
    detail: str = ""
    host: str = ""  # Level 2: the host the component belongs to (its name)
    repair: str = ""  # Level 2: what to do when it is not well
    progress: float | None = None  # Level 2: a disk being synced, 0..1
    id: str = ""  # Level 2: the component's id in ``Protection.components`` (``link:a``, ``disk:0@<host>``…)
    # Level 3 checkpointing: its figures as the AM last reported them, in words ((label, value) pairs: hashable)
    figures: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class VMEvent:
    at: dt.datetime
    text: str
    severity: str = "info"


@dataclass(frozen=True)
class ProtectionInfo:
    """The VM page's protection panel: what was dialled, where it stands, and a run in progress."""

    pk: int
    level: int
    status: str  # ProtectionStatus
    status_label: str
    reason: str
    restart_priority: str  # RestartPriority
    restart_priority_label: str
    order: int
    start_delay: int
    active_run: int | None
    active_run_label: str
    # Level 2
    secondary_host: str = ""
    runs_on: str = ""  # after a failover: the host the VM runs on now
    failed_over_at: dt.datetime | None = None
    components_checked_at: dt.datetime | None = None
    last_verify: dict | None = None
    last_verify_at: dt.datetime | None = None
    failed_disks: tuple[str, ...] = ()
    epoch_ms: int | None = None  # Level 3

    @property
    def can_unprotect(self) -> bool:
        return self.active_run is None


def vm_protection_info(vm: VM) -> ProtectionInfo | None:
    protection = Protection.objects.filter(vm=vm).select_related("secondary_host", "failed_over_to").first()
    if protection is None:
        return None
    run = vm_active_run(vm)
    return ProtectionInfo(
        pk=protection.pk,
        level=protection.level,
        status=protection.status,
        status_label=protection.get_status_display(),
        reason=protection.status_reason,
        restart_priority=protection.restart_priority,
        restart_priority_label=protection.get_restart_priority_display(),
        order=protection.order,
        start_delay=protection.start_delay,
        active_run=run.pk if run else None,
        active_run_label=run.get_kind_display() if run else "",
        secondary_host=protection.secondary_host.name_label if protection.secondary_host else "",
        runs_on=protection.failed_over_to.name_label if protection.failed_over_to else "",
        failed_over_at=protection.failed_over_at,
        components_checked_at=protection.components_checked_at,
        last_verify=protection.last_verify or None,
        last_verify_at=parse_datetime(protection.last_verify["at"]) if protection.last_verify.get("at") else None,
        failed_disks=tuple(c["name"] for c in protection.components or []
                           if c.get("kind") == "Disk replica" and c.get("state") == ComponentState.FAILED),
        epoch_ms=protection.epoch_ms,
    )


def vm_protection_components(vm: VM) -> list[Component]:
    """The parts a Level 1 protection depends on, with their health: the host, and the pool's plan."""
    protection = Protection.objects.filter(vm=vm).select_related("pool").first()
    if protection is None:
        return []  # not protected: no component to show
    if uses_ams(protection.level):
        return level2_components(protection)
    out = []
    host = vm.resident_on
    if host is not None:
        out.append(Component(kind="Host", name=host.name_label, health=Health.GOOD if host.live else Health.FAILED,
                             detail="XAPI HA restarts the VM elsewhere if it fails"))
    pool = protection.pool
    plan_ok = pool_plan_holds(pool)
    if pool.ha_enabled:
        detail = (f"covers {pool.ha_plan_exists_for} of the {pool.ha_host_failures_to_tolerate} host failure(s) "
                  f"to tolerate" + ("; overcommitted" if pool.ha_overcommitted else ""))
    else:
        detail = "high availability is off on the pool"
    out.append(Component(kind="Failover plan", name=pool.name,
                         health=Health.GOOD if plan_ok else Health.DEGRADED, detail=detail))
    return out


_COMPONENT_HEALTH = {ComponentState.OK: Health.GOOD, ComponentState.DEGRADED: Health.DEGRADED,
                     ComponentState.FAILED: Health.FAILED, ComponentState.UNKNOWN: "unknown"}


def level2_components(protection: Protection) -> list[Component]:
    """A Level 2 protection's components as its AMs were last read (``Protection.components``), each with
    the health class of its icon: the drill-down list of the VM page."""
    return level2_component_list(protection.components)


def level2_component_list(components: list | None) -> list[Component]:
    """``Protection.components`` as read (a JSON list, possibly empty or odd) turned into Components."""
    out = []
    for c in components or []:
        if not isinstance(c, dict):
            continue
        out.append(Component(
            kind=c.get("kind", ""), name=c.get("name", ""),
            health=_COMPONENT_HEALTH.get(c.get("state"), "unknown"),
            since=parse_datetime(c["since"]) if c.get("since") else None,
            detail=c.get("detail", ""), host=c.get("host_name", ""), repair=c.get("repair", ""),
            progress=c.get("progress"), id=str(c.get("id", "")), figures=checkpoint_figures(c.get("checkpoint")),
        ))
    return out


def _ms_words(value) -> str:
    return f"{value:.1f} ms" if isinstance(value, int | float) and not isinstance(value, bool) else "—"


def checkpoint_figures(figures) -> tuple[tuple[str, str], ...]:
    """A checkpoint component's figures (``health._checkpoint_component``: the AM's checkpoint as read) in words,
    in the order the VM page shows them; () when there are none (or they are not a dict: an old record)."""
    if not isinstance(figures, dict):
        return ()

    def count(key: str) -> str:
        value = figures.get(key)
        return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "—"

    size = figures.get("size_bytes")
    age = figures.get("last_commit_age_ms")
    committed = count("last_committed")
    if committed != "—" and isinstance(age, int | float) and not isinstance(age, bool):
        committed += f" ({age:.0f} ms before the AMs were read)"
    return (
        ("Epoch length", f"{figures['epoch_ms']} ms" if isinstance(figures.get("epoch_ms"), int) else "—"),
        ("Last committed epoch", committed),
        ("Checkpoint size", filesizeformat(size) if isinstance(size, int) and not isinstance(size, bool) else "—"),
        ("Capture (pause to resume)", _ms_words(figures.get("capture_ms"))),
        ("Commit (capture to acknowledged)", _ms_words(figures.get("commit_ms"))),
        ("Output hold (mean)", _ms_words(figures.get("output_hold_ms"))),
        ("Packets held now", count("held_packets")),
    )


def vm_events(vm: VM, *, limit: int = 20) -> list[VMEvent]:
    """What happened to the VM's protection, newest first: failovers and protection changes."""
    events = []
    level2 = Protection.objects.filter(vm=vm, level__in=AM_LEVELS).exists()
    for e in FailoverEvent.objects.filter(vm_uuid=vm.uuid, pool=vm.pool).order_by("-detected_at")[:limit]:
        if level2 and e.state == FailoverEvent.State.RESTARTED:
            text = (f"Failed over to {e.to_host_name} (its AM took over the disks) after {e.from_host_name} was "
                    f"lost ({e.downtime_seconds or 0:.1f} s)")
        elif level2 and e.state == FailoverEvent.State.FAILED:
            text = f"Not failed over after {e.from_host_name} was lost"
        elif level2:
            text = f"Down with {e.from_host_name}; waiting for the secondary's AM to take over"
        elif e.state == FailoverEvent.State.RESTARTED:
            text = (f"Restarted by HA on {e.to_host_name} after {e.from_host_name} was lost "
                    f"({e.downtime_seconds or 0:.1f} s down)")
        elif e.state == FailoverEvent.State.FAILED:
            text = f"Not restarted after {e.from_host_name} was lost"
        else:
            text = f"Down with {e.from_host_name}; waiting for HA to restart it"
        events.append(VMEvent(at=e.restarted_at or e.detected_at, text=text,
                              severity="critical" if e.state != FailoverEvent.State.RESTARTED else "warning"))
    for a in AuditEntry.objects.filter(vm=vm).order_by("-at")[:limit]:
        who = a.username or "the console"
        text = f"{a.get_action_display()} ({who})"
        # A refusal carries XAPI's reason as a sentence (inventory.xapi_errors): the page shows it.
        reason = a.detail.get("message") if isinstance(a.detail, dict) else None
        if reason:
            text += f": {reason}"
        severity = "critical" if a.action == AuditAction.VM_POWER_REFUSED else "info"
        events.append(VMEvent(at=a.at, text=text, severity=severity))
    events.sort(key=lambda e: e.at, reverse=True)
    return events[:limit]
