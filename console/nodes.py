"""What the tree, the table and the live push show, as small frozen dataclasses built here.

Everything a fragment template shows is one of these (never a queryset or a model instance), so
the same template renders the full page in a view and the pushed fragment in the consumer, and a
fragment is a cached pure function of its dataclass (``tree.py``). A VM's protection state comes
from ``protection.selectors`` (its one definition).
"""
from __future__ import annotations

import uuid as uuidlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from django.db.models import Count, Exists, F, OuterRef, QuerySet

from inventory.choices import ConnectionState, PowerState
from inventory.models import PBD, PIF, VM, Host, Pool
from protection.choices import Health, ProtectionStatus, SummaryGroup, uses_ams
from protection.selectors import (
    Component,
    level2_component_list,
    pools_failed_over,
    vm_annotate_placement,
    vm_annotate_protection,
    vm_exclude_stand_ins,
    vm_health_marks,
    vm_protection_components,
    vm_protection_states,
)

# How bad a state is, for marks ("a degraded or failed component somewhere below").
SEVERITY = {Health.GOOD: 0, Health.UNPROTECTED: 0, Health.DEGRADED: 1, Health.FAILED: 2}
MARK_FOR_SEVERITY = {0: "", 1: "degraded", 2: "failed"}


def worst(*marks: str) -> str:
    return MARK_FOR_SEVERITY[max((SEVERITY.get(m, 0) for m in marks), default=0)]


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
    # Level 2: its components as the AMs were last read, each with its icon in the tree (a tuple: hashable)
    components: tuple[Component, ...] = ()

    @property
    def power_label(self) -> str:
        return PowerState(self.power_state).label if self.power_state in PowerState.values else self.power_state

    @property
    def power_icon(self) -> str:
        return POWER_ICON.get(self.power_state, "halted")

    @property
    def status_label(self) -> str:
        return SummaryGroup(self.status).label

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
        return " / ".join(dict.fromkeys(names))  # after a failover the VM runs on its secondary host

    @property
    def state_text(self) -> str:
        """The icon's text alternative."""
        level = f"Level {self.level}, {self.health_label.lower()}" if self.level else self.status_label.lower()
        return f"{self.power_label}, {level}"


def vm_node_queryset(qs: QuerySet[VM]) -> QuerySet[VM]:
    """What ``vm_node`` reads, in one query (and one more per VM shown on another host than XAPI's
    ``resident_on``: after a Level 2 failover)."""
    qs = vm_annotate_protection(qs.select_related("pool", "resident_on")).annotate(
        prot_components=F("protection__components"))
    return vm_annotate_placement(qs).only(
        "pk", "uuid", "name_label", "power_state", "pool__uuid", "pool__name", "resident_on__uuid",
        "resident_on__name_label",
    )  # fmt: skip


def vm_node(vm: VM) -> VMNode:
    """A node of a VM that comes from ``vm_node_queryset`` (or any VM with its pool and host loaded)."""
    state = vm_protection_states([vm])[vm.pk]
    host = vm.resident_on
    shown = getattr(vm, "shown_host_id", vm.resident_on_id)
    if shown != vm.resident_on_id:  # failed over: it runs as its secondary VM there
        host = Host.objects.filter(pk=shown).only("uuid", "name_label").first()
    components: tuple[Component, ...] = ()
    if uses_ams(state.level):
        components = tuple(level2_component_list(vm.prot_components) if hasattr(vm, "prot_components")
                           else vm_protection_components(vm))
    return VMNode(
        pk=vm.pk,
        uuid=vm.uuid,
        name=vm.name_label or vm.uuid,
        power_state=getattr(vm, "shown_power_state", vm.power_state),
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
        components=components,
    )


def vm_nodes(qs: QuerySet[VM]) -> list[VMNode]:
    return [vm_node(vm) for vm in vm_node_queryset(qs)]


def vm_nodes_by_uuid(*, pool_id: int, uuids: Iterable[str]) -> dict[str, VMNode]:
    """The named VMs of one pool, in one query (the ones that no longer exist are left out)."""
    qs = vm_exclude_stand_ins(VM.objects.ordinary().filter(pool_id=pool_id, uuid__in=list(uuids)))
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
    name: str  # the name the administrator gave (Pool.name): the pool's name everywhere in the console
    state: str  # ConnectionState
    mark: str
    hosts_total: int
    hosts_live: int
    vms_total: int
    vms_running: int
    ha_enabled: bool
    xapi_name: str = ""  # XAPI's own name label (Pool.name_label)
    vms_protected: int = 0  # VMs with a protection in place (the summary's protected and degraded groups)
    removing: bool = False  # being removed in the background (Pool.removing_since): no hosts, VMs or actions

    @property
    def key(self) -> str:
        return f"pool-{self.uuid or f'p{self.pk}'}"

    @property
    def xapi_name_shown(self) -> str:
        """XAPI's name, when it says something the given name does not (shown beside it, muted)."""
        return xapi_name_shown(self.name, self.xapi_name)

    @property
    def identity(self) -> tuple[str, str, bool]:
        """What the page shows of the pool outside its labels (crumbs, table cells, filter choices, its tree
        node's children): when it changes, the page is rebuilt rather than patched."""
        return self.name, self.xapi_name, self.removing

    @property
    def state_label(self) -> str:
        return ConnectionState(self.state).label if self.state in ConnectionState.values else self.state

    @property
    def icon(self) -> str:
        return {"connected": "connected", "unreachable": "disconnected"}.get(self.state, "connecting")

    @property
    def state_text(self) -> str:
        if self.removing:
            return f"Pool {self.state_label.lower()}, being removed"
        below = f"; {self.mark} component below" if self.mark else ""
        return f"Pool {self.state_label.lower()}{below}"

    @property
    def attention(self) -> bool:
        """Worth a look: not connected, or something failed or degraded below it (the header's menu counts)."""
        return not self.removing and (self.state != ConnectionState.CONNECTED or bool(self.mark))


def xapi_name_shown(name: str, xapi_name: str) -> str:
    """XAPI's name label of a pool, when there is one and it differs from the name the console was given."""
    return xapi_name if xapi_name and xapi_name != name else ""


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
    """{pool id: PoolOverview}: pools, hosts, VM counts and marks, in five queries whatever the size
    (about 10 ms at 10,000 VMs: it runs for every batch of live changes). A pool being removed shows no
    hosts and no counts: its rows are being deleted."""
    pool_ids = list(pool_ids)
    pools = list(Pool.objects.filter(pk__in=pool_ids).order_by("name"))
    pool_ids = [p.pk for p in pools if p.removing_since is None]
    # Components below a host that are not well: a NIC in use without carrier, storage not plugged.
    nic_down = PIF.objects.filter(host=OuterRef("pk"), currently_attached=True, carrier=False)
    storage_down = PBD.objects.filter(host=OuterRef("pk"), currently_attached=False)
    hosts = list(
        Host.objects.filter(pool_id__in=pool_ids)
        .annotate(nic_down=Exists(nic_down), storage_down=Exists(storage_down))
        .order_by("name_label", "uuid")
        .only("pk", "uuid", "name_label", "pool_id", "live", "enabled", "is_master")
    )
    base = vm_exclude_stand_ins(VM.objects.ordinary().filter(pool_id__in=pool_ids))

    # VM counts by where they hang in the tree.
    per_host: dict[int, int] = defaultdict(int)
    halted: dict[int, int] = defaultdict(int)
    total: dict[int, int] = defaultdict(int)
    running: dict[int, int] = defaultdict(int)
    # Where no Level 2/3 protection failed over (nearly every pool), a VM hangs where XAPI says: a plain count, 13 ms
    # against 33 ms with the placement rules for 19 pools of 2,500 VMs (the labels of the pools a page shows only by
    # their labels are read again whenever their VMs start or stop).
    failed_over = pools_failed_over(pool_ids)
    placed = [
        *vm_annotate_placement(base.filter(pool_id__in=failed_over))
        .values_list("pool_id", "shown_host_id", "shown_power_state").annotate(n=Count("pk")).order_by(),
        *VM.objects.ordinary().filter(pool_id__in=[pk for pk in pool_ids if pk not in failed_over])
        .values_list("pool_id", "resident_on_id", "power_state").annotate(n=Count("pk")).order_by(),
    ]
    for pool_id, host_id, power, n in placed:
        total[pool_id] += n
        if power == PowerState.RUNNING:
            running[pool_id] += n
        if host_id is None:
            halted[pool_id] += n
        else:
            per_host[host_id] += n
    # Protected: a protection in place, well or not (the summary's protected and degraded groups); an inner
    # join on the protections, cheap when few VMs are protected.
    protected = dict(
        base.filter(protection__isnull=False)
        .exclude(protection__status=ProtectionStatus.PROTECTING)
        .values_list("pool_id")
        .annotate(n=Count("pk"))
        .order_by()
    )

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
            name=pool.name,
            xapi_name=pool.name_label,
            state=pool.connection_state,
            mark=below,
            hosts_total=len(pool_hosts),
            hosts_live=sum(1 for h in pool_hosts if h.state != "dead"),
            vms_total=total.get(pool.pk, 0),
            vms_running=running.get(pool.pk, 0),
            vms_protected=protected.get(pool.pk, 0),
            ha_enabled=pool.ha_enabled,
            removing=pool.removing_since is not None,
        )
        result[pool.pk] = PoolOverview(label, pool_hosts, halted_group)
    return result


def summary_groups(counts: Iterable[dict[str, int]]) -> list[GroupLabel]:
    """The Protected VM Summary's groups, from the status counts of the pools shown."""
    totals: dict[str, int] = defaultdict(int)
    for pool_counts in counts:
        for status, n in pool_counts.items():
            totals[status] += n
    marks = {SummaryGroup.DEGRADED: "degraded"}
    return [
        GroupLabel(key=f"pvs-{s.value}", name=s.label, count=totals.get(s.value, 0), mark=marks.get(s, ""),
                   icon=f"status-{s.value}")
        for s in SummaryGroup
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
    base = vm_exclude_stand_ins(VM.objects.ordinary().filter(pool__in=pools.filter(removing_since__isnull=True)))
    if kind == "host" and is_uuid(ident):
        return vm_annotate_placement(base).filter(shown_host_id__in=Host.objects.filter(uuid=ident).values("pk"))
    if kind == "halted":
        if ident.startswith("p") and ident[1:].isdigit():
            return vm_annotate_placement(base).filter(pool_id=int(ident[1:]), shown_host_id__isnull=True)
        if is_uuid(ident):
            return vm_annotate_placement(base).filter(pool__uuid=ident, shown_host_id__isnull=True)
    if kind == "pvs" and ident in SummaryGroup.values:
        return vm_annotate_protection(base).filter(prot_status=ident)
    return None


def tree_children(*, pools: QuerySet[Pool], key: str, offset: int = 0, limit: int = TREE_PAGE) -> Children | None:
    qs = _key_queryset(key, pools)
    if qs is None:
        return None
    offset = max(0, offset)
    qs = qs.order_by("name_label", "uuid")
    total = qs.count()
    nodes = tuple(vm_nodes(qs[offset : offset + limit]))
    return Children(key=key, nodes=nodes, offset=offset, total=total)


def is_uuid(text: str) -> bool:
    try:
        uuidlib.UUID(text)
    except ValueError:
        return False
    return True


def batch_moves_status(classes: dict[str, dict[str, str]]) -> bool:
    """Can this batch of changes ({cls: {uuid: op}}) move VMs between the summary's groups?

    A VM or a disk added or removed, an SR or a VDI changed (shared flag, SR of a VDI), or any
    protection change (the consumer files ``protection.change`` events under cls "protection").
    A VBD's attach state or a VM's power state does not: those are most events.
    """
    if classes.get("protection") or classes.get("sr") or classes.get("vdi"):
        return True
    return any(op != "mod" for cls in ("vm", "vbd") for op in classes.get(cls, {}).values())
