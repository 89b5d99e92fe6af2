"""Reads of the inventory: pools, hosts and VMs, for views, APIs and other apps."""
from __future__ import annotations

from django.db.models import QuerySet

from .models import VM, Host, Pool


def pool_list() -> QuerySet[Pool]:
    return Pool.objects.all()


def pool_get(*, name: str | None = None, uuid: str | None = None, pk: int | None = None) -> Pool:
    """One pool by name, uuid or primary key; raises Pool.DoesNotExist."""
    lookup = {k: v for k, v in {"name": name, "uuid": uuid, "pk": pk}.items() if v is not None}
    if not lookup:
        raise ValueError("pool_get needs name, uuid or pk")
    return Pool.objects.get(**lookup)


def host_list(*, pool: Pool | None = None) -> QuerySet[Host]:
    qs = Host.objects.select_related("pool")
    return qs.filter(pool=pool) if pool is not None else qs


def host_master(*, pool: Pool) -> Host | None:
    return Host.objects.filter(pool=pool, is_master=True).first()


def host_addresses(*, pool: Pool) -> list[str]:
    """Management addresses of the pool's known hosts, the best master candidates first
    (the current master, then live hosts): where to look when the master is unreachable."""
    rows = Host.objects.filter(pool=pool).exclude(address="").order_by("-is_master", "-live", "name_label")
    return list(dict.fromkeys(rows.values_list("address", flat=True)))


def vm_list(
    *,
    pool: Pool | None = None,
    include_templates: bool = False,
    include_control_domains: bool = False,
    include_snapshots: bool = False,
) -> QuerySet[VM]:
    """VMs as a user thinks of them: by default without templates, dom0s and snapshots
    (which the inventory keeps as rows too)."""
    qs = VM.objects.select_related("pool", "resident_on")
    if pool is not None:
        qs = qs.filter(pool=pool)
    if not include_templates:
        qs = qs.filter(is_a_template=False)
    if not include_control_domains:
        qs = qs.filter(is_control_domain=False)
    if not include_snapshots:
        qs = qs.filter(is_a_snapshot=False)
    return qs


def vm_get(*, pool: Pool, uuid: str) -> VM:
    return VM.objects.select_related("pool", "resident_on").get(pool=pool, uuid=uuid)
