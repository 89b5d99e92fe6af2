"""The Virtual Machine Status table: its rows, filters, columns and sorts."""
from __future__ import annotations

import django_filters
from django.db import models
from django.db.models import Case, IntegerField, QuerySet, Value, When

from eac.permissions import pools_visible_to
from inventory.filtersets import VMFilterSet
from inventory.models import VM
from protection.choices import Health, SummaryGroup

from .nodes import vm_node_queryset

STATUS_ORDER = {status.value: i for i, status in enumerate(SummaryGroup)}
TABLE_COLUMNS = [
    ("status", "Status"),
    ("name", "Name"),
    ("type", "Type"),
    ("power", "Power"),
    ("hosts", "Hosts"),
    ("pool", "Pool"),
    ("level", "Level"),
    ("health", "Health"),
]
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
    return vm_node_queryset(VM.objects.ordinary().filter(pool__in=pools_visible_to(user))).annotate(
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


class VMTableFilterSet(VMFilterSet):
    """The REST API's VM filters, plus the protection status the table shows (an annotation)."""

    status = django_filters.ChoiceFilter(field_name="prot_status", choices=SummaryGroup.choices)

    class Meta(VMFilterSet.Meta):
        fields = [*VMFilterSet.Meta.fields, "status"]
