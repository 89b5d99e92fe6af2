"""The VM, host and pool pages' panels: what each shows, read for one user, as one dataclass."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from django.db.models import Count

from eac.permissions import pools_visible_to, user_can_change_protection, user_can_view
from inventory.choices import ConnectionState
from inventory.models import PBD, PIF, VBD, VIF, VM, Host, Pool
from protection.choices import Health, SummaryGroup
from protection.selectors import (
    Component,
    ProtectionInfo,
    VMEvent,
    vm_annotate_placement,
    vm_annotate_protection,
    vm_events,
    vm_exclude_stand_ins,
    vm_protection_components,
    vm_protection_info,
)

from .nodes import HostLabel, PoolOverview, VMNode, host_state, is_uuid, pool_overviews, vm_node, vm_nodes


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
    pool_removing: bool = False  # its pool is being removed: no actions on it

    @property
    def protection_empty_reason(self) -> str:
        if not self.pool_reachable:
            return "Pool unreachable: the console cannot tell the state of this VM's protection."
        if self.node.level is None:
            if self.node.status == SummaryGroup.CANDIDATE:
                return "Not protected. All its disks are on shared storage: it is a candidate for Level 1."
            return "Not protected. A disk is on storage only one host reaches: Level 1 needs shared storage."
        if not self.components:
            return "No component reported yet."
        return ""


def vm_detail(*, user, uuid: str) -> VMDetail | None:
    if not is_uuid(uuid):
        return None
    vm = (
        vm_annotate_protection(VM.objects.ordinary().filter(pool__in=pools_visible_to(user)).filter(uuid=uuid))
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
        can_change=user_can_change_protection(user) and vm.pool.removing_since is None,
        pool_removing=vm.pool.removing_since is not None,
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
    if not is_uuid(uuid):
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
    label = next((h for h in overview.hosts if h.uuid == host.uuid), None)
    if label is None:  # its pool is being removed: the overview leaves its hosts out
        label = HostLabel(uuid=host.uuid, name=host.name_label or host.uuid, pool_uuid=host.pool.uuid,
                          state=host_state(host), is_master=host.is_master, vm_count=0, mark="")
    vms_qs = (vm_annotate_placement(vm_exclude_stand_ins(VM.objects.ordinary().filter(pool_id=host.pool_id)))
              .filter(shown_host_id=host.pk).order_by("name_label", "uuid"))
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
    vms = VM.objects.ordinary().filter(pool=pool) if pool.removing_since is None else VM.objects.none()
    rows = vm_annotate_protection(vms).values_list("prot_level", "prot_health")
    for level, health, n in rows.annotate(n=Count("pk")).order_by():
        levels[level] += n
        healths[health] += n
    by_level = [(f"Level {lv}", levels.get(lv, 0)) for lv in (1, 2, 3)] + [("Not protected", levels.get(None, 0))]
    by_health = [(h.label, healths.get(h.value, 0)) for h in Health]
    return PoolDetail(pool=pool, overview=overview, by_level=by_level, by_health=by_health,
                      can_view_protection=user_can_view(user))
