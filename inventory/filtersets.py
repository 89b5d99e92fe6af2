"""One FilterSet per inventory model, shared by the REST API and the UI's filter forms.

Give a FilterSet ``request.GET`` (bound, even when empty): the VM defaults below
(templates, control domains and snapshots left out) are applied when it filters.
"""

import django_filters
from django.db.models import Q, QuerySet

from eac.filters import BooleanFilter, IdChoiceFilter

from .choices import ConnectionState, PowerState
from .models import SR, VM, Host, Network, Pool


class CaseInsensitiveChoiceField(django_filters.fields.ChoiceField):
    """Accepts a choice in any case (``running`` for XAPI's ``Running``) and cleans it to the stored value."""

    def to_python(self, value):
        value = super().to_python(value)
        if isinstance(value, str):
            canonical = {str(key).lower(): key for key, _label in self.choices if key != ""}
            return canonical.get(value.lower(), value)
        return value


class CaseInsensitiveChoiceFilter(django_filters.ChoiceFilter):
    field_class = CaseInsensitiveChoiceField


def _pool_filter() -> IdChoiceFilter:
    return IdChoiceFilter(queryset=Pool.objects.all(), help_text="Pool id")


def _name_filter() -> django_filters.CharFilter:
    return django_filters.CharFilter(
        field_name="name_label", lookup_expr="icontains", help_text="Part of the name, any case"
    )


def _uuid_filter() -> django_filters.CharFilter:
    return django_filters.CharFilter(field_name="uuid", help_text="XAPI uuid")


class PoolFilterSet(django_filters.FilterSet):
    name = django_filters.CharFilter(lookup_expr="icontains", help_text="Part of the name, any case")
    uuid = _uuid_filter()
    connection_state = django_filters.ChoiceFilter(choices=ConnectionState.choices)

    class Meta:
        model = Pool
        fields = ["name", "uuid", "connection_state"]


class HostFilterSet(django_filters.FilterSet):
    pool = _pool_filter()
    live = BooleanFilter(help_text="true: hosts XAPI reports alive; false: the dead ones")
    enabled = BooleanFilter()
    name = _name_filter()
    uuid = _uuid_filter()

    class Meta:
        model = Host
        fields = ["pool", "live", "enabled", "name", "uuid"]


class VMFilterSet(django_filters.FilterSet):
    """Real VMs by default; ``templates``, ``control_domains`` and ``snapshots`` bring those in too."""

    # Which flags are left out unless their filter says true: {filter name: VM field}.
    HIDDEN_BY_DEFAULT = {
        "templates": "is_a_template",
        "control_domains": "is_control_domain",
        "snapshots": "is_a_snapshot",
    }

    pool = _pool_filter()
    host = IdChoiceFilter(
        field_name="resident_on", queryset=Host.objects.all(), help_text="Id of the host the VM is resident on"
    )
    power_state = CaseInsensitiveChoiceFilter(choices=PowerState.choices, help_text="Any case: running or Running")
    name = _name_filter()
    uuid = _uuid_filter()
    # Applied in filter_queryset, because "absent" must mean "leave them out" too.
    templates = BooleanFilter(method="_included", help_text="true: include templates")
    control_domains = BooleanFilter(method="_included", help_text="true: include control domains (dom0)")
    snapshots = BooleanFilter(method="_included", help_text="true: include snapshots")

    class Meta:
        model = VM
        fields = ["pool", "host", "power_state", "name", "uuid", "templates", "control_domains", "snapshots"]

    def _included(self, queryset: QuerySet, name: str, value: bool) -> QuerySet:
        return queryset

    def filter_queryset(self, queryset: QuerySet) -> QuerySet:
        queryset = super().filter_queryset(queryset)
        hidden = Q()
        for filter_name, field in self.HIDDEN_BY_DEFAULT.items():
            if self.form.cleaned_data.get(filter_name) is not True:
                hidden |= Q(**{field: True})
        return queryset.exclude(hidden) if hidden else queryset


class SRFilterSet(django_filters.FilterSet):
    pool = _pool_filter()
    shared = BooleanFilter()
    type = django_filters.CharFilter(help_text="SR type, e.g. lvmoiscsi, nfs, ext")
    name = _name_filter()
    uuid = _uuid_filter()

    class Meta:
        model = SR
        fields = ["pool", "shared", "type", "name", "uuid"]


class NetworkFilterSet(django_filters.FilterSet):
    pool = _pool_filter()
    name = _name_filter()
    uuid = _uuid_filter()

    class Meta:
        model = Network
        fields = ["pool", "name", "uuid"]
