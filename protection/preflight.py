"""The wizard's preflight: what must hold before a VM can be protected, each check in words."""
from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Count, F, Q, QuerySet

from inventory.models import SR, VDI, VIF, VM, Host, Pool

from .choices import (
    ACTIVE_RUN_STATES,
    AVAILABLE_LEVELS,
    EPOCH_MS_DEFAULT,
    EPOCH_MS_MAX,
    EPOCH_MS_MIN,
    LEVEL3_MAX_NICS,
    LEVEL3_VCPUS,
    RUNNING_STATES,
    UNAVAILABLE_REASON,
    Level,
    RestartPriority,
    uses_ams,
)
from .models import WorkflowRun
from .selectors import plan_blockers_text, pool_planner

GIB = 2**30
MIB = 2**20


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


# -- Level 2 ----------------------------------------------------------------------------------------


def vm_disk_vdis(vm: VM) -> QuerySet[VDI]:
    """The VDIs of the VM's disks (not CDs): what Level 2 mirrors, one AM resource each."""
    return VDI.objects.filter(vbds__vm=vm, vbds__type="Disk").distinct().order_by("uuid")


def secondary_sr_candidates(host: Host) -> QuerySet[SR]:
    """Local SRs attached to ``host`` (where the secondary VM's replicas go), the most free space first."""
    return (
        SR.objects.filter(pool=host.pool, shared=False, pbds__host=host, pbds__currently_attached=True)
        .exclude(content_type="iso")
        .annotate(free=F("physical_size") - F("physical_utilisation"))
        .order_by("-free", "name_label")
    )


def vm_default_footprint(vm: VM) -> int:
    """The memory the secondary reserves unless told otherwise: what the VM runs with."""
    return vm.memory_dynamic_max or vm.memory_static_max


def vm_minimum_footprint(vm: VM) -> int:
    return vm.memory_dynamic_min or vm_default_footprint(vm)


@dataclass(frozen=True)
class Level2Choice:
    """The Level 2 settings of one VM, defaults filled in: the pair of hosts, the footprint, the SR."""

    primary: Host | None
    secondary: Host | None
    secondary_given: str  # what was asked for ("" = the suggestion)
    footprint: int
    sr: SR | None


def level2_choice(vm: VM, settings: dict) -> Level2Choice:
    primary = vm.resident_on
    given = str(settings.get("secondary_host") or "")
    uuid = given or (primary.am_peer if primary else "")
    secondary = Host.objects.filter(pool=vm.pool, uuid=uuid).first() if uuid else None
    footprint = settings.get("secondary_memory")
    footprint = int(footprint) if footprint not in (None, "") else vm_default_footprint(vm)
    sr = secondary_sr_candidates(secondary).first() if secondary else None
    return Level2Choice(primary, secondary, given, footprint, sr)


def level2_setting_problems(vm: VM, choice: Level2Choice) -> dict[str, str]:
    """What is wrong with the chosen secondary and footprint themselves ({field: sentence}): bad input,
    refused with a 400 by the service, shown by the wizard's preflight."""
    problems: dict[str, str] = {}
    primary, secondary = choice.primary, choice.secondary
    if choice.secondary_given and secondary is None:
        problems["secondary_host"] = "No host of the VM's pool has this uuid."
    elif secondary is not None and primary is not None:
        if secondary.pk == primary.pk:
            problems["secondary_host"] = f"The secondary must be another host than the one the VM runs on ({primary})."
        elif not secondary.am_url:
            problems["secondary_host"] = f"{secondary} has no Availability Manager (no eac_am_url in its other_config)."
        elif primary.am_url and primary.am_peer != secondary.uuid:
            peer = Host.objects.filter(pool=vm.pool, uuid=primary.am_peer).first()
            problems["secondary_host"] = (f"{secondary} is not the AM peer of {primary}"
                                          + (f" (its peer is {peer})." if peer else "."))
    low, high = vm_minimum_footprint(vm), max(vm.memory_static_max, vm_default_footprint(vm))
    if choice.footprint < low:
        problems["secondary_memory"] = (f"{choice.footprint // MIB} MiB is below the VM's dynamic minimum "
                                        f"({low // MIB} MiB).")
    elif choice.footprint > high:
        problems["secondary_memory"] = (f"{choice.footprint // MIB} MiB is more than the VM's memory "
                                        f"({high // MIB} MiB).")
    return problems


def level2_secondary_candidates(vm: VM) -> list[dict]:
    """The pool's other hosts with an AM, for the wizard's choice; the primary's AM peer is suggested."""
    primary = vm.resident_on
    out = []
    for host in Host.objects.filter(pool=vm.pool).exclude(am_url="").order_by("name_label"):
        if primary is not None and host.pk == primary.pk:
            continue
        out.append({"uuid": host.uuid, "name_label": host.name_label, "memory_free": host.memory_free,
                    "suggested": bool(primary and primary.am_peer == host.uuid)})
    out.sort(key=lambda h: (not h["suggested"], h["name_label"]))
    return out


def level3_vm_problems(vm: VM) -> dict[str, str]:
    """Why the VM itself cannot be checkpointed ({check name: sentence}): more than one vCPU (a checkpoint
    captures one vCPU's state: XAPI's VM.VCPUs_max), more than one disk, or no NIC or too many (the AM holds the
    output of 1 to LEVEL3_MAX_NICS MACs)."""
    problems = {}
    if vm.vcpus_max != LEVEL3_VCPUS:
        problems["vcpus"] = (f"The VM has {vm.vcpus_max} vCPUs (VM.VCPUs_max): Level 3 needs exactly "
                             f"{LEVEL3_VCPUS}, because checkpointing captures one vCPU's state. Halt the VM, set "
                             "its VCPUs_max to 1, and protect it again.")
    disks = vm_disk_vdis(vm).count()
    if disks > 1:
        # Each disk is its own AM resource with its own replication stream: their epochs would commit apart, and a
        # restored VM could find one disk at its checkpoint and another past it.
        problems["disks"] = (f"The VM has {disks} disks: Level 3 checkpoints a VM with one disk (its epochs are "
                             "committed per disk, not yet across several). Protect it at Level 2.")
    nics = VIF.objects.filter(vm=vm).count()
    if not 1 <= nics <= LEVEL3_MAX_NICS:
        problems["nics"] = (f"The VM has {nics} network interface(s): Level 3 holds the VM's network output until "
                            f"each checkpoint is safe, for 1 to {LEVEL3_MAX_NICS} interfaces.")
    return problems


def _level3_checks(vm: VM, settings: dict, check) -> dict:
    problems = level3_vm_problems(vm)
    check("vcpus", "vcpus" not in problems, problems.get("vcpus") or
          "The VM has 1 vCPU (VM.VCPUs_max): its state can be checkpointed.")
    if "disks" in problems:
        check("level3-disks", False, problems["disks"])
    check("nics", "nics" not in problems, problems.get("nics") or
          "The VM's network output is held until each checkpoint is acknowledged: its clients never see what a "
          "failover would undo.")
    epoch = settings.get("epoch_ms")
    try:
        epoch = EPOCH_MS_DEFAULT if epoch in (None, "") else int(epoch)
    except (TypeError, ValueError):
        epoch = None
    if epoch is None or not EPOCH_MS_MIN <= epoch <= EPOCH_MS_MAX:
        check("epoch", False, f"The epoch length must be a whole number of milliseconds from {EPOCH_MS_MIN} to "
                              f"{EPOCH_MS_MAX}.")
    else:
        check("epoch", True, f"A checkpoint every {epoch} ms: after a host failure the VM continues from the last "
                             f"one; each packet it sends is held up to {epoch} ms and the time to commit the "
                             "checkpoint.")
    return {"epoch_ms": epoch, "epoch_min": EPOCH_MS_MIN, "epoch_max": EPOCH_MS_MAX, "vcpus_max": vm.vcpus_max}


def _level2_checks(vm: VM, settings: dict, check, level: int = Level.COMPONENT_FT) -> dict:
    choice = level2_choice(vm, settings)
    primary, secondary = choice.primary, choice.secondary
    problems = level2_setting_problems(vm, choice)
    if level == Level.SYSTEM_FT:
        check("level", True, "Level 3: as Level 2, the AMs of two hosts mirror every disk of the VM, and the VM is "
                             "checkpointed to its paused copy on the secondary host, which continues from the last "
                             "checkpoint if the VM or its host fails: clients keep their sessions.")
    else:
        check("level", True, "Level 2: the AMs of two hosts mirror every disk of the VM; a paused copy of it on "
                             "the secondary host takes over if the VM, its host, a disk or a NIC fails.")
    running = vm.power_state == "Running"
    check("power", running, "The VM is running." if running else
          f"The VM is {vm.get_power_state_display().lower()}: Level {level} protects a running VM (start it first).")
    disks = list(vm_disk_vdis(vm))
    check("disks", bool(disks), f"{len(disks)} disk(s) to mirror: "
          + ", ".join(f"{d.name_label or d.uuid} ({d.virtual_size / GIB:.1f} GiB)" for d in disks) + "."
          if disks else "The VM has no disk: there is nothing for Level 2 to mirror.")
    if primary is None:
        check("am", False, "The VM runs on no host: its host's Availability Manager cannot be found.")
    elif not primary.am_url:
        check("am", False, f"{primary} has no Availability Manager (no eac_am_url in its other_config).")
    else:
        check("am", True, f"{primary} has an Availability Manager at {primary.am_url}.")
    if "secondary_host" in problems:
        check("secondary", False, problems["secondary_host"])
    elif secondary is None:
        check("secondary", False, "Choose the secondary host: the VM's host has no AM peer to suggest.")
    elif not (secondary.live and secondary.enabled):
        check("secondary", False, f"{secondary} is {'not live' if not secondary.live else 'disabled'}.")
    else:
        check("secondary", True, f"{secondary}, the AM peer of {primary}, holds the replicas and the paused "
                                 f"secondary VM{'' if choice.secondary_given else ' (suggested)'}.")
    default = vm_default_footprint(vm)
    if "secondary_memory" in problems:
        check("footprint", False, problems["secondary_memory"])
    elif choice.footprint < default:
        check("footprint", False, f"The secondary reserves {choice.footprint // MIB} MiB, less than the VM's "
              f"{default // MIB} MiB: after a failover the VM restarts with less memory.", blocking=False)
    else:
        check("footprint", True, f"The secondary reserves the VM's memory, {choice.footprint // MIB} MiB.")
    if secondary is not None:
        need = choice.footprint + vm.memory_overhead
        check("memory", secondary.memory_free >= need,
              f"{secondary} has {secondary.memory_free / GIB:.1f} GiB free; the secondary VM needs "
              f"{need / GIB:.1f} GiB (its footprint and overhead).")
        size = sum(d.virtual_size for d in disks)
        if choice.sr is None:
            check("storage", False, f"{secondary} has no local SR for the replicas.")
        else:
            free = choice.sr.physical_size - choice.sr.physical_utilisation
            check("storage", free >= size, f"Local SR “{choice.sr.name_label}” of {secondary} has "
                  f"{free / GIB:.1f} GiB free; the replicas need {size / GIB:.1f} GiB.")
    check("links", True, "Both AMs, both availability links and the witness are checked by the first step "
                         "(the console talks to the AMs from its workers only).", blocking=False)
    return {
        "secondary_host": secondary.uuid if secondary else "",
        "secondary_hosts": level2_secondary_candidates(vm),
        "secondary_memory": choice.footprint,
        "memory_default": default,
        "memory_minimum": vm_minimum_footprint(vm),
        "secondary_sr": choice.sr.uuid if choice.sr else "",
    }


def protection_preflight(*, vm: VM, level: int, settings: dict | None = None) -> dict:
    """What the wizard shows before it can go on: level, agility, capacity and plan, HA state (Level 1);
    the pair of hosts, the VM's state and disks, memory and storage on the secondary (Level 2)."""
    settings = settings or {}
    pool = vm.pool
    checks = []

    titles = {"level": "Level", "vm": "VM", "agility": "Agility", "plan": "Failover plan", "capacity": "Capacity",
              "ha": "High availability", "busy": "Workflow", "power": "Power state", "disks": "Disks",
              "am": "Availability Manager", "secondary": "Secondary host", "footprint": "Secondary memory",
              "memory": "Memory on the secondary", "storage": "Storage on the secondary", "links": "AM links",
              "vcpus": "vCPUs", "nics": "Network output", "epoch": "Epoch length", "level3-disks": "Disks at Level 3"}

    def check(name: str, ok: bool, message: str, blocking: bool = True) -> None:
        checks.append({"name": name, "title": titles[name], "ok": ok, "message": message,
                       "blocking": blocking and not ok})

    if uses_ams(level):
        if not vm.is_ordinary:
            check("vm", False, "Only ordinary VMs can be protected (not templates, snapshots or control domains).")
        level2 = _level2_checks(vm, settings, check, level)
        level3 = _level3_checks(vm, settings, check) if level == Level.SYSTEM_FT else None
        _busy(vm, check)
        return {"vm": vm.pk, "level": level, "can_proceed": not any(c["blocking"] for c in checks),
                "checks": checks, "ha_enabled": pool.ha_enabled, "failures_to_tolerate":
                pool.ha_host_failures_to_tolerate, "max_failures_with_vm": 0, "heartbeat_srs": [],
                "level2": level2, "level3": level3}

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
    _busy(vm, check)
    return {
        "vm": vm.pk,
        "level": level,
        "can_proceed": not any(c["blocking"] for c in checks),
        "checks": checks,
        "ha_enabled": ha_enabled,
        "failures_to_tolerate": target,
        "max_failures_with_vm": best,
        "heartbeat_srs": candidates,
        "level2": None,
        "level3": None,
    }


def _busy(vm: VM, check) -> None:
    active = WorkflowRun.objects.filter(vm=vm, state__in=ACTIVE_RUN_STATES).first()
    if active:
        check("busy", False, f"A {active.get_kind_display().lower()} workflow is already running for this VM.")
