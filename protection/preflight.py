"""The wizard's preflight: what must hold before a VM can be protected, each check in words."""
from __future__ import annotations

from django.db.models import Count, Q, QuerySet

from inventory.models import SR, VIF, VM, Host, Pool

from .choices import ACTIVE_RUN_STATES, AVAILABLE_LEVELS, RUNNING_STATES, UNAVAILABLE_REASON, Level, RestartPriority
from .models import WorkflowRun
from .selectors import plan_blockers_text, pool_planner

GIB = 2**30


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
    if not vm.is_ordinary:
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
    active = WorkflowRun.objects.filter(vm=vm, state__in=ACTIVE_RUN_STATES).first()
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
