"""The Virtual Machine Status table: its rows, filters, columns and sorts."""
from __future__ import annotations

from dataclasses import dataclass

import django_filters
from django.core.exceptions import SuspiciousOperation
from django.db import OperationalError, connection, models, transaction
from django.db.models import Case, IntegerField, QuerySet, Value, When
from django.http import QueryDict

from eac.permissions import pools_visible_to
from inventory.filtersets import VMFilterSet
from inventory.models import VM, Host, Pool
from protection.choices import Health, SummaryGroup
from protection.selectors import vm_exclude_stand_ins

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
DEFAULT_PER_PAGE = 50
FILTER_FIELDS = ("name", "power_state", "host", "status", "pool")
# A page number past this is taken as this one (an OFFSET the database can compute quickly enough).
MAX_PAGE = 10_000
# What a page may send of its table's query string: the parameters the table reads, each value bounded.
TABLE_PARAMS = (*FILTER_FIELDS, "sort", "per_page", "page")
MAX_QUERY = 1000
MAX_VALUE = 200
QUERY_CANCELED = "57014"  # PostgreSQL's SQLSTATE of a statement stopped by statement_timeout


def table_pools(*, user) -> QuerySet[Pool]:
    """The pools whose VMs the table shows: those the user may see, but for pools being removed."""
    return pools_visible_to(user).filter(removing_since__isnull=True)


def vm_table_queryset(*, user) -> QuerySet[VM]:
    """The table's rows before filters: annotated so status, level and health sort in the database."""
    status_order = Case(
        *(When(prot_status=s, then=Value(i)) for s, i in STATUS_ORDER.items()), output_field=IntegerField()
    )
    health_order = Case(
        *(When(prot_health=h.value, then=Value(i)) for i, h in enumerate(Health)), output_field=IntegerField()
    )
    rows = vm_exclude_stand_ins(VM.objects.ordinary().filter(pool__in=table_pools(user=user)))
    return vm_node_queryset(rows).annotate(
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


@dataclass(frozen=True)
class TableQuery:
    """What a query string asks of the table, read one way for the page and for the live consumer."""

    filterset: VMTableFilterSet
    rows: QuerySet[VM]  # filtered (invalid filters left out) and ordered
    sort: str  # the sort applied
    per_page: int
    hosts: QuerySet[Host]  # the hosts the user may see, the host filter's choices
    pools: QuerySet[Pool]  # the pools the table shows, the pool filter's choices

    @property
    def ignored(self) -> list[str]:
        """The filters left out because their value is invalid."""
        return sorted(self.filterset.form.errors)


def vm_table_query(*, user, params: QueryDict) -> TableQuery:
    pools = table_pools(user=user)
    hosts = Host.objects.filter(pool__in=pools).select_related("pool")
    filterset = VMTableFilterSet(params, queryset=vm_table_queryset(user=user))
    filterset.filters["host"].queryset = hosts
    filterset.filters["pool"].queryset = pools
    filterset.form.is_valid()  # invalid filters are left out of the query
    sort, ordering = vm_table_ordering(params.get("sort"))
    try:
        per_page = int(params.get("per_page", DEFAULT_PER_PAGE))
    except ValueError:
        per_page = DEFAULT_PER_PAGE
    if per_page not in TABLE_PAGE_SIZES:
        per_page = DEFAULT_PER_PAGE
    return TableQuery(filterset=filterset, rows=filterset.qs.order_by(*ordering), sort=sort, per_page=per_page,
                      hosts=hosts, pools=pools)


def vm_table_page_rows(
    *, user, params: QueryDict, timeout_ms: int | None = None
) -> tuple[tuple[str, ...], int] | None:
    """(the uuids of the rows of the page ``params`` names, in table order; how many rows match the filters): what
    the live consumer compares with what an open table shows, in the two queries the page itself runs (a window
    count over the sorted rows costs more). ``params`` names the page the table shows (``page`` as the
    paginator settled it), so a page past the end here has no rows. None when PostgreSQL took longer than
    ``timeout_ms`` (the status sort and filter evaluate every VM's protection state: 0.5 s at 10,000 VMs)."""
    query = vm_table_query(user=user, params=params)
    try:
        number = min(MAX_PAGE, max(1, int(params.get("page") or 1)))
    except ValueError:
        number = 1
    start = (number - 1) * query.per_page
    try:
        with transaction.atomic():
            if timeout_ms and connection.vendor == "postgresql":
                # Without JIT: compiling the protection status's CASE (sort=status, 10,000 VMs) took 6 to 10 s of
                # the 11 s such a query took, and a statement timeout cannot stop the compiler; 0.5 s without.
                with connection.cursor() as cursor:
                    cursor.execute("SELECT set_config('statement_timeout', %s, true), set_config('jit', 'off', true)",
                                   [f"{timeout_ms}ms"])
            total = query.rows.count()
            rows = tuple(query.rows.values_list("uuid", flat=True)[start:start + query.per_page])
    except OperationalError as exc:
        if getattr(exc.__cause__, "sqlstate", None) == QUERY_CANCELED:
            return None
        raise
    return rows, total


def vm_table_params(query_string: str) -> QueryDict | None:
    """The table's parameters in a query string a page sent (the ``data-query`` it was rendered with): those the
    table reads, the first value of each, bounded; None for a string no rendered page has (too long)."""
    if len(query_string) > MAX_QUERY:
        return None
    try:
        sent = QueryDict(query_string)
    except SuspiciousOperation:  # too many fields
        return None
    params = QueryDict(mutable=True)
    for name in TABLE_PARAMS:
        if sent.get(name):
            params[name] = sent[name][:MAX_VALUE]
    return params

