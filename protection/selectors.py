"""Reads of protection: states for the tree, the failover plan, the wizard's preflight, lists."""
from __future__ import annotations

from collections.abc import Iterable

from django.db import models
from django.db.models import Case, Count, Exists, F, OuterRef, Q, QuerySet, Value, When

from inventory.models import SR, VBD, VIF, VM, Host, Pool

from . import planner
from .choices import AVAILABLE_LEVELS, UNAVAILABLE_REASON, AuditAction, Level, RestartPriority, RunState
from .models import AuditEntry, FailoverEvent, Protection, WorkflowRun

GIB = 2**30
RUNNING_STATES = ("Running", "Paused")


# -- the tree's icons ---------------------------------------------------------------------------


def protection_states_for(vm_ids: Iterable[int]) -> dict[int, tuple[int | None, str]]:
    """(level, health) for each VM id: health is good, degraded, failed, unprotected or candidate.

    An unprotected VM is a *candidate* when every one of its disks is on a shared SR (it could be
    protected at Level 1 as it is). Read from ``vm_annotate_protection``, the one definition of
    those states, in one query whatever the number of VMs.
    """
    ids = list(vm_ids)
    if not ids:
        return {}
    rows = vm_annotate_protection(VM.objects.filter(pk__in=ids)).values_list("pk", "prot_level", "prot_health",
                                                                             "prot_status")
    return {pk: (level, "candidate" if status == "candidate" else health) for pk, level, health, status in rows}


def _pinned_to_a_host() -> Exists:
    """A disk (or a CD with a disc in) on storage only one host reaches: XAPI would not call the VM agile."""
    return Exists(
        VBD.objects.filter(vm=OuterRef("pk"), vdi__isnull=False).filter(
            Q(vdi__sr__isnull=True) | Q(vdi__sr__shared=False)
        )
    )


def vm_annotate_protection(qs: QuerySet[VM]) -> QuerySet[VM]:
    """Annotate ``prot_level``, ``prot_health``, ``prot_status``, ``prot_secondary`` in the database.

    The one definition of a VM's protection state, for the console's tree, table, marks and Protected
    VM Summary (``inventory.ui_selectors`` delegates here) and for ``protection_states_for``.
    ``prot_status`` is level1/level2/level3 when protected and healthy (or being unprotected: XAPI
    still restarts it), candidate while being protected, degraded for any other protection state, and
    candidate or unprotected without protection (a candidate is an ordinary VM
    whose disks are all on shared storage); ``prot_health`` is good, degraded, failed or unprotected.
    """
    p = "protection__"
    return qs.annotate(
        prot_level=F(f"{p}level"),
        prot_health=Case(
            When(**{f"{p}isnull": True}, then=Value("unprotected")),
            # Being set up is not a loss of redundancy: not protected yet, not degraded.
            When(**{f"{p}status": "protecting"}, then=Value("unprotected")),
            # Until unprotect has run, XAPI still restarts the VM.
            When(**{f"{p}status__in": ["protected", "unprotecting"]}, then=Value("good")),
            When(**{f"{p}status": "failed"}, then=Value("failed")),
            default=Value("degraded"),
            output_field=models.CharField(),
        ),
        prot_status=Case(
            When(**{f"{p}status__in": ["protected", "unprotecting"], f"{p}level": 1}, then=Value("level1")),
            When(**{f"{p}status__in": ["protected", "unprotecting"], f"{p}level": 2}, then=Value("level2")),
            When(**{f"{p}status__in": ["protected", "unprotecting"], f"{p}level": 3}, then=Value("level3")),
            When(**{f"{p}status": "protecting"}, then=Value("candidate")),
            When(**{f"{p}isnull": False}, then=Value("degraded")),
            When(Q(is_a_template=True) | Q(is_control_domain=True) | Q(is_a_snapshot=True),
                 then=Value("unprotected")),
            When(_pinned_to_a_host(), then=Value("unprotected")),
            default=Value("candidate"),
            output_field=models.CharField(),
        ),
        # Level 1 has no secondary host (Level 2/3 will fill this in).
        prot_secondary=Value("", output_field=models.CharField()),
    )


def protection_for_vm(vm: VM) -> Protection | None:
    return Protection.objects.filter(vm=vm).first()


def vm_active_run(vm: VM) -> WorkflowRun | None:
    """The workflow changing the VM's protection now, if any (at most one runs per VM)."""
    return (WorkflowRun.objects.filter(vm=vm, state__in=[RunState.PENDING, RunState.RUNNING])
            .order_by("-created_at", "-pk").first())


def protection_list(*, pool: Pool | None = None) -> QuerySet[Protection]:
    qs = Protection.objects.select_related("vm", "pool", "vm__resident_on")
    return qs.filter(pool=pool) if pool is not None else qs


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
        VM.objects.filter(pool=pool, is_a_template=False, is_control_domain=False, is_a_snapshot=False)
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
        "pool_name": pool.name_label or pool.name,
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


# -- the wizard's preflight ---------------------------------------------------------------------


def vm_agility_problems(vm: VM) -> list[str]:
    """Why XAPI would not call the VM agile, from the inventory: local disks, networks not on every host."""
    problems = []
    for sr_name in (
        SR.objects.filter(vdis__vbds__vm=vm, shared=False).values_list("name_label", flat=True).distinct()
    ):
        problems.append(
            f"A disk is on “{sr_name}”, a storage repository only one host can reach: move it to shared storage."
        )
    hosts = Host.objects.filter(pool=vm.pool).count()
    networks = (
        VIF.objects.filter(vm=vm, network__isnull=False)
        .values("network__name_label")
        .annotate(hosts=Count("network__pifs__host", distinct=True))
    )
    for net in networks:
        if net["hosts"] and net["hosts"] < hosts:
            problems.append(
                f"Network “{net['network__name_label']}” exists on {net['hosts']} of the {hosts} hosts only."
            )
    return problems


def heartbeat_sr_candidates(pool: Pool) -> QuerySet[SR]:
    """Shared SRs attached on every host: where XAPI HA can keep its heartbeat (statefile)."""
    hosts = Host.objects.filter(pool=pool).count()
    return (
        SR.objects.filter(pool=pool, shared=True)
        .exclude(content_type="iso")
        .annotate(attached=Count("pbds", filter=Q(pbds__currently_attached=True), distinct=True))
        .filter(attached__gte=max(hosts, 1))
        .order_by("name_label")
    )


def protection_preflight(*, vm: VM, level: int, settings: dict | None = None) -> dict:
    """What the wizard shows before it can go on: level, agility, capacity and plan, HA state."""
    settings = settings or {}
    pool = vm.pool
    checks = []

    titles = {"level": "Level", "vm": "VM", "agility": "Agility", "plan": "Failover plan", "capacity": "Capacity",
              "ha": "High availability", "busy": "Workflow"}

    def check(name: str, ok: bool, message: str, blocking: bool = True) -> None:
        checks.append({"name": name, "title": titles[name], "ok": ok, "message": message,
                       "blocking": blocking and not ok})

    if level not in AVAILABLE_LEVELS:
        check("level", False, UNAVAILABLE_REASON.get(Level(level), "This level is not available."))
    else:
        check("level", True, "Level 1: XAPI HA restarts the VM on a surviving host when its host fails.")
    if vm.is_a_template or vm.is_control_domain or vm.is_a_snapshot:
        check("vm", False, "Only ordinary VMs can be protected (not templates, snapshots or control domains).")
    problems = vm_agility_problems(vm)
    check("agility", not problems, " ".join(problems) or "Every disk and network of the VM is shared by all hosts.")

    ha_enabled = pool.ha_enabled
    target = pool.ha_host_failures_to_tolerate if ha_enabled else int(settings.get("failures_to_tolerate", 1) or 1)
    priority = settings.get("restart_priority", RestartPriority.RESTART)
    plan = pool_planner(pool, add_vm=vm if priority == RestartPriority.RESTART else None)
    best = plan.max_failures()
    if priority != RestartPriority.RESTART:
        check("plan", True, "Best-effort restart does not enter the failover plan.")
    elif plan.overcommitted or best < target:
        check("plan", False, f"With this VM the plan would not hold for {target} host failure(s). "
              + plan_blockers_text(plan, target))
    else:
        check("plan", True, f"With this VM the pool can tolerate {best} host failure(s); {target} needed.")
    capacity_free = sum(h.capacity for h in plan.hosts)
    check("capacity", vm.memory_static_max <= capacity_free or vm.power_state in RUNNING_STATES,
          f"{capacity_free / GIB:.1f} GiB free on the live hosts; the VM needs {vm.memory_static_max / GIB:.1f} GiB.")

    candidates = list(heartbeat_sr_candidates(pool).values("uuid", "name_label"))
    if ha_enabled:
        check("ha", True, f"High availability is on, tolerating {pool.ha_host_failures_to_tolerate} host failure(s).")
    elif not candidates:
        check("ha", False, "High availability is off and no shared SR is attached to every host for its heartbeat.")
    elif settings.get("heartbeat_sr") and settings["heartbeat_sr"] not in {c["uuid"] for c in candidates}:
        check("ha", False, "The chosen heartbeat SR is not shared by every host of the pool.")
    else:
        check("ha", True, "High availability is off: it will be turned on with the heartbeat SR you choose.",
              blocking=False)
    active = WorkflowRun.objects.filter(vm=vm, state__in=[RunState.PENDING, RunState.RUNNING]).first()
    if active:
        check("busy", False, f"A {active.get_kind_display().lower()} workflow is already running for this VM.")
    return {
        "vm": vm.pk,
        "level": level,
        "can_proceed": not any(c["blocking"] for c in checks),
        "checks": checks,
        "ha_enabled": ha_enabled,
        "failures_to_tolerate": target,
        "max_failures_with_vm": best,
        "heartbeat_srs": candidates,
    }


# -- lists --------------------------------------------------------------------------------------


def run_list(*, user=None) -> QuerySet[WorkflowRun]:
    return WorkflowRun.objects.select_related("pool", "vm", "created_by").prefetch_related("steps")


def failover_event_list(*, pool: Pool | None = None) -> QuerySet[FailoverEvent]:
    qs = FailoverEvent.objects.select_related("pool")
    return qs.filter(pool=pool) if pool is not None else qs


def audit_list() -> QuerySet[AuditEntry]:
    return AuditEntry.objects.select_related("pool", "vm", "user")


def protected_vm_refs(pool: Pool, *, exclude_vm_id: int | None = None) -> dict[str, str]:
    """{VM ref: restart priority} of the pool's protected VMs, as the inventory mirrors them."""
    qs = VM.objects.filter(pool=pool, is_a_template=False, is_control_domain=False).exclude(ha_restart_priority="")
    if exclude_vm_id is not None:
        qs = qs.exclude(pk=exclude_vm_id)
    return dict(qs.values_list("ref", "ha_restart_priority"))




# -- for the VM page (inventory.ui_selectors calls these) ------------------------------------------


def vm_components(vm: VM) -> list[dict]:
    """The parts a Level 1 protection depends on, with their health: the host, and the pool's plan."""
    protection = Protection.objects.filter(vm=vm).select_related("pool").first()
    if protection is None:
        return []
    out = []
    host = vm.resident_on
    if host is not None:
        out.append({"kind": "Host", "name": host.name_label, "health": "good" if host.live else "failed",
                    "since": None, "detail": "XAPI HA restarts the VM elsewhere if it fails"})
    pool = protection.pool
    plan_ok = pool.ha_enabled and not pool.ha_overcommitted and (
        pool.ha_plan_exists_for >= pool.ha_host_failures_to_tolerate)
    if pool.ha_enabled:
        detail = (f"covers {pool.ha_plan_exists_for} of the {pool.ha_host_failures_to_tolerate} host failure(s) "
                  f"to tolerate" + ("; overcommitted" if pool.ha_overcommitted else ""))
    else:
        detail = "high availability is off on the pool"
    out.append({"kind": "Failover plan", "name": pool.name_label or pool.name,
                "health": "good" if plan_ok else "degraded", "since": None, "detail": detail})
    return out


def vm_events(vm: VM, *, limit: int = 20) -> list[dict]:
    """What happened to the VM's protection, newest first: failovers and protection changes."""
    events = []
    for e in FailoverEvent.objects.filter(vm_uuid=vm.uuid, pool=vm.pool).order_by("-detected_at")[:limit]:
        if e.state == FailoverEvent.State.RESTARTED:
            text = (f"Restarted by HA on {e.to_host_name} after {e.from_host_name} was lost "
                    f"({e.downtime_seconds or 0:.1f} s down)")
        elif e.state == FailoverEvent.State.FAILED:
            text = f"Not restarted after {e.from_host_name} was lost"
        else:
            text = f"Down with {e.from_host_name}; waiting for HA to restart it"
        events.append({"at": e.restarted_at or e.detected_at, "text": text,
                       "severity": "critical" if e.state != FailoverEvent.State.RESTARTED else "warning"})
    for a in AuditEntry.objects.filter(vm=vm).order_by("-at")[:limit]:
        who = a.username or "the console"
        text = f"{a.get_action_display()} ({who})"
        # A refusal carries XAPI's reason as a sentence (protection.xapi_errors): the page shows it.
        reason = a.detail.get("message") if isinstance(a.detail, dict) else None
        if reason:
            text += f": {reason}"
        severity = "critical" if a.action == AuditAction.VM_POWER_REFUSED else "info"
        events.append({"at": a.at, "text": text, "severity": severity})
    events.sort(key=lambda e: e["at"], reverse=True)
    return events[:limit]
