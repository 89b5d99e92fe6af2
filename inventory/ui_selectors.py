"""Reads for the console's pages and live updates: who sees which pools, the treeview,
the Virtual Machine Status table and the detail pages.

Everything a fragment template shows is a small frozen dataclass built here (never a
queryset or a model instance), so the same template renders the full page in a view
and the pushed fragment in the WebSocket consumer without touching the database.

A VM's protection (level, health, status in the Protected VM Summary, and which VMs are
"candidates") is defined once, by ``protection.selectors.vm_annotate_protection``, as query
annotations: the table sorts and filters on them in the database, and the summary counts and
the tree's marks are read from the same annotations, so they always agree.
"""
from __future__ import annotations

import datetime as dt
import uuid as uuidlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import models
from django.db.models import Case, Count, Exists, F, IntegerField, OuterRef, QuerySet, Value, When

from protection import selectors as protection_selectors
from protection.permissions import user_can_change_protection, user_can_view

from .choices import ConnectionState, PowerState
from .models import PBD, PIF, VBD, VIF, VM, Host, Pool

# -- who sees what ------------------------------------------------------------------------------

# There is no per-pool permission model yet: a user sees every pool, or none. Superusers see
# all; anyone else needs this permission (directly or through a group). An authenticated user
# without it gets an empty console that says why, and no WebSocket.
VIEW_PERMISSION = "inventory.view_pool"


def user_can_view_inventory(user: AbstractBaseUser | AnonymousUser | None) -> bool:
    if user is None or not user.is_authenticated or not user.is_active:
        return False
    return bool(user.is_superuser or user.has_perm(VIEW_PERMISSION))


def pools_visible_to(user: AbstractBaseUser | AnonymousUser | None) -> QuerySet[Pool]:
    """The one place that decides which pools a user may see (views and consumer both use it)."""
    if not user_can_view_inventory(user):
        return Pool.objects.none()
    return Pool.objects.all()


def vms_visible_to(user: AbstractBaseUser | AnonymousUser | None) -> QuerySet[VM]:
    """VMs as a user thinks of them (no templates, dom0s or snapshots) in the pools they may see."""
    return user_vm_base().filter(pool__in=pools_visible_to(user))


def user_vm_base() -> QuerySet[VM]:
    return VM.objects.filter(is_a_template=False, is_control_domain=False, is_a_snapshot=False)


def open_alerts_count(user: AbstractBaseUser | AnonymousUser | None) -> int:
    """Open alerts the user may see (alerts belong to pools: a user who sees no pool sees none)."""
    if not user_can_view_inventory(user):
        return 0
    from alerts.selectors import alert_open_count  # alerts depends on inventory, not the reverse

    return alert_open_count()


# -- states, health and protection status -------------------------------------------------------


class Health(models.TextChoices):
    GOOD = "good", "Good"
    DEGRADED = "degraded", "Degraded"
    FAILED = "failed", "Failed"
    UNPROTECTED = "unprotected", "Unprotected"


class ProtectionStatus(models.TextChoices):
    """The groups of the original console's "Protected VM Summary", in its order."""

    LEVEL1 = "level1", "Protected at Level 1"
    LEVEL2 = "level2", "Protected at Level 2"
    LEVEL3 = "level3", "Protected at Level 3"
    DEGRADED = "degraded", "Degraded"
    CANDIDATE = "candidate", "Candidate"
    UNPROTECTED = "unprotected", "Unprotected"


STATUS_ORDER = {status.value: i for i, status in enumerate(ProtectionStatus)}

# How bad a state is, for marks ("a degraded or failed component somewhere below").
SEVERITY = {"good": 0, "unprotected": 0, "degraded": 1, "failed": 2}
MARK_FOR_SEVERITY = {0: "", 1: "degraded", 2: "failed"}


def worst(*marks: str) -> str:
    return MARK_FOR_SEVERITY[max((SEVERITY.get(m, 0) for m in marks), default=0)]


class ProtectionState(NamedTuple):
    level: int | None
    health: str  # Health
    status: str  # ProtectionStatus
    secondary_host: str = ""  # name of the secondary host (Level 2/3), for the "Hosts" column
    protection_pk: int | None = None  # for the "Unprotect" action


def vm_annotate_protection(qs: QuerySet[VM]) -> QuerySet[VM]:
    """Annotate ``prot_level`` (int or None), ``prot_health``, ``prot_status``, ``prot_secondary``
    (the protection app's definition) and ``prot_pk`` (the Protection's id, for its actions)."""
    return protection_selectors.vm_annotate_protection(qs).annotate(prot_pk=F("protection__pk"))


def _state_of(vm: VM) -> ProtectionState:
    return ProtectionState(vm.prot_level, vm.prot_health, vm.prot_status, vm.prot_secondary or "",
                           getattr(vm, "prot_pk", None))


def vm_protection_states(vms: Iterable[VM]) -> dict[int, ProtectionState]:
    """{vm id: ProtectionState} for the given VMs, in one query (none if they come annotated).

    The same annotations as ``protection.selectors.protection_states_for`` reads, with the summary
    status and the secondary host that the console shows besides level and health.
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
        vm_annotate_protection(user_vm_base().filter(pool_id__in=pool_ids))
        .values_list("pool_id", "prot_status")
        .annotate(n=Count("pk"))
        .order_by()
    )
    for pool_id, status, n in rows:
        counts[pool_id][status] = n
    return counts


def batch_moves_status(classes: dict[str, dict[str, str]]) -> bool:
    """Can this batch of changes ({cls: {uuid: op}}) move VMs between the summary's groups?

    A VM or a disk added or removed, an SR or a VDI changed (shared flag, SR of a VDI), or any
    protection change (the protection app sends its changes to the pool's group with cls
    "protection"). A VBD's attach state or a VM's power state does not: those are most events.
    """
    if classes.get("protection") or classes.get("sr") or classes.get("vdi"):
        return True
    return any(op != "mod" for cls in ("vm", "vbd") for op in classes.get(cls, {}).values())


def vm_health_marks(pool_ids: Iterable[int]) -> dict[tuple[int, int | None], str]:
    """{(pool id, host id or None for not running): worst health} of VMs whose protection is not well."""
    marks: dict[tuple[int, int | None], str] = defaultdict(str)
    rows = (
        vm_annotate_protection(user_vm_base().filter(pool_id__in=list(pool_ids)))
        # Only a protection can be unwell: the inner join keeps this cheap when few VMs are protected
        # (it runs for every batch of live changes).
        .filter(protection__isnull=False)
        .filter(prot_health__in=[Health.DEGRADED, Health.FAILED])
        .values_list("pool_id", "resident_on_id", "prot_health")
        .distinct()
        .order_by()
    )
    for pool_id, host_id, health in rows:
        marks[pool_id, host_id] = worst(marks[pool_id, host_id], health)
    return marks


@dataclass(frozen=True)
class Component:
    """One part of a protected VM (primary or secondary host, a disk, a NIC, an availability link)."""

    kind: str
    name: str
    health: str
    since: dt.datetime | None = None
    detail: str = ""


def vm_protection_components(vm: VM) -> list[Component]:
    """The protected VM's components and their state (none when it is not protected)."""
    return [Component(**c) for c in protection_selectors.vm_components(vm)]


@dataclass(frozen=True)
class VMEvent:
    at: dt.datetime
    text: str
    severity: str = "info"


def vm_events(vm: VM, *, limit: int = 20) -> list[VMEvent]:
    """What happened to the VM's protection, newest first: failovers and protection changes."""
    return [VMEvent(**e) for e in protection_selectors.vm_events(vm, limit=limit)]


@dataclass(frozen=True)
class ProtectionInfo:
    """The VM page's protection panel: what was dialled, where it stands, and a run in progress."""

    pk: int
    level: int
    status: str  # protection.choices.ProtectionStatus
    status_label: str
    reason: str
    restart_priority: str  # protection.choices.RestartPriority
    restart_priority_label: str
    order: int
    start_delay: int
    active_run: int | None
    active_run_label: str

    @property
    def can_unprotect(self) -> bool:
        return self.active_run is None


def vm_protection_info(vm: VM) -> ProtectionInfo | None:
    protection = protection_selectors.protection_for_vm(vm)
    if protection is None:
        return None
    run = protection_selectors.vm_active_run(vm)
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
    )


# -- tree and table nodes -------------------------------------------------------------------------

POWER_ICON = {
    PowerState.RUNNING: "running",
    PowerState.HALTED: "halted",
    PowerState.PAUSED: "paused",
    PowerState.SUSPENDED: "suspended",
}


@dataclass(frozen=True)
class VMNode:
    """A VM as the tree, the table and the live push show it."""

    pk: int
    uuid: str
    name: str
    power_state: str
    pool_pk: int
    pool_uuid: str
    pool_name: str
    host_uuid: str
    host_name: str
    level: int | None
    health: str
    status: str
    secondary_host: str = ""
    protection_pk: int | None = None

    @property
    def power_label(self) -> str:
        return PowerState(self.power_state).label if self.power_state in PowerState.values else self.power_state

    @property
    def power_icon(self) -> str:
        return POWER_ICON.get(self.power_state, "halted")

    @property
    def status_label(self) -> str:
        return ProtectionStatus(self.status).label

    @property
    def health_label(self) -> str:
        return Health(self.health).label

    @property
    def type_label(self) -> str:
        return "Protected VM" if self.level else "Unprotected VM"

    @property
    def parent_key(self) -> str:
        """Where the VM hangs in the host tree: under its host, or under the pool's halted VMs."""
        return f"host-{self.host_uuid}" if self.host_uuid else f"halted-{self.pool_uuid}"

    @property
    def status_key(self) -> str:
        return f"pvs-{self.status}"

    @property
    def hosts_label(self) -> str:
        names = [n for n in (self.host_name, self.secondary_host) if n]
        return " / ".join(names)

    @property
    def state_text(self) -> str:
        """The icon's text alternative."""
        level = f"Level {self.level}, {self.health_label.lower()}" if self.level else self.status_label.lower()
        return f"{self.power_label}, {level}"


def vm_node_queryset(qs: QuerySet[VM]) -> QuerySet[VM]:
    return vm_annotate_protection(qs.select_related("pool", "resident_on")).only(
        "pk", "uuid", "name_label", "power_state", "pool__uuid", "pool__name", "resident_on__uuid",
        "resident_on__name_label",
    )  # fmt: skip


def vm_node(vm: VM) -> VMNode:
    """A node of a VM that comes from ``vm_node_queryset`` (or any VM with its pool and host loaded)."""
    state = _state_of(vm) if hasattr(vm, "prot_status") else vm_protection_states([vm])[vm.pk]
    host = vm.resident_on
    return VMNode(
        pk=vm.pk,
        uuid=vm.uuid,
        name=vm.name_label or vm.uuid,
        power_state=vm.power_state,
        pool_pk=vm.pool_id,
        pool_uuid=vm.pool.uuid,
        pool_name=vm.pool.name,
        host_uuid=host.uuid if host else "",
        host_name=(host.name_label or host.uuid) if host else "",
        level=state.level,
        health=state.health,
        status=state.status,
        secondary_host=state.secondary_host,
        protection_pk=state.protection_pk,
    )


def vm_nodes(qs: QuerySet[VM]) -> list[VMNode]:
    return [vm_node(vm) for vm in vm_node_queryset(qs)]


def vm_nodes_by_uuid(*, pool_id: int, uuids: Iterable[str]) -> dict[str, VMNode]:
    """The named VMs of one pool, in one query (the ones that no longer exist are left out)."""
    qs = user_vm_base().filter(pool_id=pool_id, uuid__in=list(uuids))
    return {node.uuid: node for node in vm_nodes(qs)}


@dataclass(frozen=True)
class HostLabel:
    uuid: str
    name: str
    pool_uuid: str
    state: str  # live, dead, disabled
    is_master: bool
    vm_count: int
    mark: str  # "", degraded, failed: the worst state below the host

    @property
    def key(self) -> str:
        return f"host-{self.uuid}"

    @property
    def state_label(self) -> str:
        return {"live": "Live", "dead": "Dead", "disabled": "Disabled (maintenance)"}[self.state]

    @property
    def own_severity(self) -> str:
        return {"live": "", "dead": "failed", "disabled": "degraded"}[self.state]

    @property
    def state_text(self) -> str:
        below = f"; {self.mark} component below" if self.mark else ""
        return f"Host {self.state_label.lower()}{below}"


@dataclass(frozen=True)
class GroupLabel:
    """A grouping node: a pool's halted VMs, or a status group of the Protected VM Summary."""

    key: str
    name: str
    count: int
    mark: str = ""
    icon: str = "group"


@dataclass(frozen=True)
class PoolLabel:
    pk: int
    uuid: str
    name: str
    state: str  # ConnectionState
    mark: str
    hosts_total: int
    hosts_live: int
    vms_total: int
    vms_running: int
    ha_enabled: bool

    @property
    def key(self) -> str:
        return f"pool-{self.uuid or f'p{self.pk}'}"

    @property
    def state_label(self) -> str:
        return ConnectionState(self.state).label if self.state in ConnectionState.values else self.state

    @property
    def icon(self) -> str:
        return {"connected": "connected", "unreachable": "disconnected"}.get(self.state, "connecting")

    @property
    def state_text(self) -> str:
        below = f"; {self.mark} component below" if self.mark else ""
        return f"Pool {self.state_label.lower()}{below}"


@dataclass(frozen=True)
class PoolOverview:
    """All a pool's tree labels (and its header chip) at one moment, from a handful of queries."""

    pool: PoolLabel
    hosts: tuple[HostLabel, ...]
    halted: GroupLabel


def host_state(host: Host) -> str:
    if not host.live:
        return "dead"
    return "live" if host.enabled else "disabled"


def pool_overviews(pool_ids: Iterable[int]) -> dict[int, PoolOverview]:
    """{pool id: PoolOverview}: pools, hosts, VM counts and marks, in four queries whatever the size
    (about 10 ms at 10,000 VMs: it runs for every batch of live changes)."""
    pool_ids = list(pool_ids)
    pools = list(Pool.objects.filter(pk__in=pool_ids).order_by("name"))
    # Components below a host that are not well: a NIC in use without carrier, storage not plugged.
    nic_down = PIF.objects.filter(host=OuterRef("pk"), currently_attached=True, carrier=False)
    storage_down = PBD.objects.filter(host=OuterRef("pk"), currently_attached=False)
    hosts = list(
        Host.objects.filter(pool_id__in=pool_ids)
        .annotate(nic_down=Exists(nic_down), storage_down=Exists(storage_down))
        .order_by("name_label", "uuid")
        .only("pk", "uuid", "name_label", "pool_id", "live", "enabled", "is_master")
    )
    base = user_vm_base().filter(pool_id__in=pool_ids)

    # VM counts by where they hang in the tree.
    per_host: dict[int, int] = defaultdict(int)
    halted: dict[int, int] = defaultdict(int)
    total: dict[int, int] = defaultdict(int)
    running: dict[int, int] = defaultdict(int)
    for pool_id, host_id, power, n in base.values_list("pool_id", "resident_on_id", "power_state").annotate(
        n=Count("pk")
    ).order_by():
        total[pool_id] += n
        if power == PowerState.RUNNING:
            running[pool_id] += n
        if host_id is None:
            halted[pool_id] += n
        else:
            per_host[host_id] += n

    host_marks: dict[int, str] = {host.pk: "degraded" for host in hosts if host.nic_down or host.storage_down}

    # VMs whose protection is degraded or failed mark their host (or the pool's halted group).
    halted_marks: dict[int, str] = defaultdict(str)
    vm_marks: dict[int, str] = defaultdict(str)
    for (pool_id, host_id), health in vm_health_marks(pool_ids).items():
        if host_id is None:
            halted_marks[pool_id] = worst(halted_marks[pool_id], health)
        else:
            vm_marks[host_id] = worst(vm_marks[host_id], health)

    by_pool: dict[int, list[HostLabel]] = defaultdict(list)
    pool_uuid = {p.pk: p.uuid for p in pools}
    for host in hosts:
        by_pool[host.pool_id].append(
            HostLabel(
                uuid=host.uuid,
                name=host.name_label or host.uuid,
                pool_uuid=pool_uuid.get(host.pool_id, ""),
                state=host_state(host),
                is_master=host.is_master,
                vm_count=per_host.get(host.pk, 0),
                mark=worst(host_marks.get(host.pk, ""), vm_marks.get(host.pk, "")),
            )
        )

    result = {}
    for pool in pools:
        pool_hosts = tuple(by_pool[pool.pk])
        halted_group = GroupLabel(
            key=f"halted-{pool.uuid or f'p{pool.pk}'}",
            name="Halted VMs",
            count=halted.get(pool.pk, 0),
            mark=halted_marks.get(pool.pk, ""),
            icon="halted",
        )
        below = worst(
            *(h.own_severity for h in pool_hosts), *(h.mark for h in pool_hosts), halted_group.mark
        )
        label = PoolLabel(
            pk=pool.pk,
            uuid=pool.uuid,
            name=pool.name_label or pool.name,
            state=pool.connection_state,
            mark=below,
            hosts_total=len(pool_hosts),
            hosts_live=sum(1 for h in pool_hosts if h.state != "dead"),
            vms_total=total.get(pool.pk, 0),
            vms_running=running.get(pool.pk, 0),
            ha_enabled=pool.ha_enabled,
        )
        result[pool.pk] = PoolOverview(label, pool_hosts, halted_group)
    return result


def summary_groups(counts: Iterable[dict[str, int]]) -> list[GroupLabel]:
    """The Protected VM Summary's groups, from the status counts of the pools shown."""
    totals: dict[str, int] = defaultdict(int)
    for pool_counts in counts:
        for status, n in pool_counts.items():
            totals[status] += n
    marks = {ProtectionStatus.DEGRADED: "degraded"}
    return [
        GroupLabel(key=f"pvs-{s.value}", name=s.label, count=totals.get(s.value, 0), mark=marks.get(s, ""),
                   icon=f"status-{s.value}")
        for s in ProtectionStatus
    ]  # fmt: skip


# -- tree children, loaded on demand ---------------------------------------------------------------

TREE_PAGE = 200  # VMs per page of a tree node's children


@dataclass(frozen=True)
class Children:
    key: str
    nodes: tuple[VMNode, ...]
    offset: int
    total: int

    @property
    def next_offset(self) -> int | None:
        end = self.offset + len(self.nodes)
        return end if end < self.total else None

    @property
    def remaining(self) -> int:
        return self.total - self.offset - len(self.nodes)


def _key_queryset(key: str, pools: QuerySet[Pool]) -> QuerySet[VM] | None:
    """The VMs under a tree node, or None when the key names nothing this user may see."""
    kind, _, ident = key.partition("-")
    base = user_vm_base().filter(pool__in=pools)
    if kind == "host" and _is_uuid(ident):
        return base.filter(resident_on__uuid=ident)
    if kind == "halted":
        if ident.startswith("p") and ident[1:].isdigit():
            return base.filter(pool_id=int(ident[1:]), resident_on__isnull=True)
        if _is_uuid(ident):
            return base.filter(pool__uuid=ident, resident_on__isnull=True)
    if kind == "pvs" and ident in ProtectionStatus.values:
        return vm_annotate_protection(base).filter(prot_status=ident)
    return None


def tree_children(*, user, key: str, offset: int = 0, limit: int = TREE_PAGE) -> Children | None:
    qs = _key_queryset(key, pools_visible_to(user))
    if qs is None:
        return None
    offset = max(0, offset)
    qs = qs.order_by("name_label", "uuid")
    total = qs.count()
    nodes = tuple(vm_nodes(qs[offset : offset + limit]))
    return Children(key=key, nodes=nodes, offset=offset, total=total)


def _is_uuid(text: str) -> bool:
    try:
        uuidlib.UUID(text)
    except ValueError:
        return False
    return True


# -- detail pages -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Disk:
    device: str
    kind: str  # Disk or CD
    vdi_name: str
    sr_name: str
    size: int
    shared: bool | None
    attached: bool


@dataclass(frozen=True)
class Nic:
    device: str
    network: str
    mac: str
    attached: bool
    carrier: bool | None  # of the host PIF on the VIF's network; None when not running or no PIF
    pif_device: str


@dataclass
class VMDetail:
    vm: VM
    node: VMNode
    disks: list[Disk]
    nics: list[Nic]
    events: list[VMEvent]
    components: list[Component]
    pool_reachable: bool
    protection: ProtectionInfo | None = None
    can_change: bool = False  # may this user protect and unprotect (the panel's buttons)

    @property
    def protection_empty_reason(self) -> str:
        if not self.pool_reachable:
            return "Pool unreachable: the console cannot tell the state of this VM's protection."
        if self.node.level is None:
            if self.node.status == ProtectionStatus.CANDIDATE:
                return "Not protected. All its disks are on shared storage: it is a candidate for Level 1."
            return "Not protected. A disk is on storage only one host reaches: Level 1 needs shared storage."
        if not self.components:
            return "No component reported yet."
        return ""


def vm_detail(*, user, uuid: str) -> VMDetail | None:
    if not _is_uuid(uuid):
        return None
    vm = (
        vm_annotate_protection(vms_visible_to(user).filter(uuid=uuid))
        .select_related("pool", "resident_on")
        .order_by("pool__name")
        .first()
    )
    if vm is None:
        return None
    node = vm_node(vm)
    disks = [
        Disk(
            device=vbd.device or vbd.userdevice,
            kind=vbd.type or "Disk",
            vdi_name=(vbd.vdi.name_label or vbd.vdi.uuid) if vbd.vdi else "(empty)",
            sr_name=(vbd.vdi.sr.name_label if vbd.vdi and vbd.vdi.sr else ""),
            size=vbd.vdi.virtual_size if vbd.vdi else 0,
            shared=vbd.vdi.sr.shared if vbd.vdi and vbd.vdi.sr else None,
            attached=vbd.currently_attached,
        )
        for vbd in VBD.objects.filter(vm=vm).select_related("vdi__sr").order_by("userdevice", "uuid")
    ]
    vifs = list(VIF.objects.filter(vm=vm).select_related("network").order_by("device", "uuid"))
    pifs = {}
    if vm.resident_on_id:
        pifs = {
            pif.network_id: pif
            for pif in PIF.objects.filter(host_id=vm.resident_on_id, network_id__in=[v.network_id for v in vifs])
        }
    nics = []
    for vif in vifs:
        pif = pifs.get(vif.network_id)
        nics.append(
            Nic(
                device=vif.device,
                network=vif.network.name_label if vif.network else "",
                mac=vif.mac,
                attached=vif.currently_attached,
                carrier=pif.carrier if pif else None,
                pif_device=pif.device if pif else "",
            )
        )
    return VMDetail(
        vm=vm,
        node=node,
        disks=disks,
        nics=nics,
        events=vm_events(vm),
        components=vm_protection_components(vm),
        pool_reachable=vm.pool.connection_state == ConnectionState.CONNECTED,
        protection=vm_protection_info(vm),
        can_change=user_can_change_protection(user),
    )


@dataclass
class HostDetail:
    host: Host
    label: HostLabel
    pifs: list[PIF]
    pbds: list[PBD]
    vms: list[VMNode]
    vm_total: int

    @property
    def memory_used(self) -> int:
        return max(0, self.host.memory_total - self.host.memory_free)

    @property
    def memory_percent(self) -> int:
        total = self.host.memory_total
        return round(100 * self.memory_used / total) if total else 0


HOST_VMS_SHOWN = 100


def host_detail(*, user, uuid: str) -> HostDetail | None:
    if not _is_uuid(uuid):
        return None
    host = (
        Host.objects.filter(pool__in=pools_visible_to(user), uuid=uuid)
        .select_related("pool")
        .order_by("pool__name")
        .first()
    )
    if host is None:
        return None
    overview = pool_overviews([host.pool_id])[host.pool_id]
    label = next(h for h in overview.hosts if h.uuid == host.uuid)
    vms_qs = user_vm_base().filter(resident_on=host).order_by("name_label", "uuid")
    return HostDetail(
        host=host,
        label=label,
        pifs=list(PIF.objects.filter(host=host).select_related("network").order_by("device")),
        pbds=list(PBD.objects.filter(host=host).select_related("sr").order_by("sr__name_label")),
        vms=vm_nodes(vms_qs[:HOST_VMS_SHOWN]),
        vm_total=label.vm_count,
    )


@dataclass
class PoolDetail:
    pool: Pool
    overview: PoolOverview
    by_level: list[tuple[str, int]]
    by_health: list[tuple[str, int]]
    can_view_protection: bool = False  # links to the failover plan

    @property
    def master(self) -> HostLabel | None:
        return next((h for h in self.overview.hosts if h.is_master), None)


def pool_detail(*, user, pk: int) -> PoolDetail | None:
    pool = pools_visible_to(user).filter(pk=pk).first()
    if pool is None:
        return None
    overview = pool_overviews([pool.pk])[pool.pk]
    levels: dict = defaultdict(int)
    healths: dict = defaultdict(int)
    rows = vm_annotate_protection(user_vm_base().filter(pool=pool)).values_list("prot_level", "prot_health")
    for level, health, n in rows.annotate(n=Count("pk")).order_by():
        levels[level] += n
        healths[health] += n
    by_level = [(f"Level {lv}", levels.get(lv, 0)) for lv in (1, 2, 3)] + [("Not protected", levels.get(None, 0))]
    by_health = [(h.label, healths.get(h.value, 0)) for h in Health]
    return PoolDetail(pool=pool, overview=overview, by_level=by_level, by_health=by_health,
                      can_view_protection=user_can_view(user))


# -- the Virtual Machine Status table ----------------------------------------------------------------

TABLE_SORTS = {
    "status": ("prot_status_order",),
    "name": ("name_label",),
    "type": ("prot_level",),
    "power": ("power_state",),
    "hosts": ("resident_on__name_label",),
    "pool": ("pool__name",),
    "level": ("prot_level",),
    "health": ("prot_health_order",),
}
TABLE_PAGE_SIZES = (25, 50, 100, 200)


def vm_table_queryset(*, user) -> QuerySet[VM]:
    """The table's rows before filters: annotated so status, level and health sort in the database."""
    status_order = Case(
        *(When(prot_status=s, then=Value(i)) for s, i in STATUS_ORDER.items()), output_field=IntegerField()
    )
    health_order = Case(
        *(When(prot_health=h.value, then=Value(i)) for i, h in enumerate(Health)), output_field=IntegerField()
    )
    return vm_node_queryset(vms_visible_to(user)).annotate(
        prot_status_order=status_order, prot_health_order=health_order
    )


def vm_table_ordering(sort: str | None) -> tuple[str, list]:
    """(the sort actually applied, order_by arguments); an unknown sort falls back to the name."""
    sort = sort or "name"
    descending = sort.startswith("-")
    name = sort.lstrip("-")
    if name not in TABLE_SORTS:
        sort, name, descending = "name", "name", False
    fields = []
    for f in TABLE_SORTS[name]:
        expr = models.F(f)
        fields.append(expr.desc(nulls_last=True) if descending else expr.asc(nulls_last=True))
    return sort, [*fields, "name_label", "uuid"]
