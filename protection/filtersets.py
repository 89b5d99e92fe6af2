"""One FilterSet per protection model, shared by the REST API and the UI lists."""
import django_filters

from eac.audit import AuditAction, AuditEntry
from eac.filters import IdFilter

from .choices import Level, ProtectionStatus, RunKind, RunState
from .models import FailoverEvent, Protection, WorkflowRun


class ProtectionFilterSet(django_filters.FilterSet):
    pool = IdFilter(field_name="pool_id", help_text="Pool id")
    vm = IdFilter(field_name="vm_id", help_text="VM id")
    level = django_filters.ChoiceFilter(choices=Level.choices)
    status = django_filters.MultipleChoiceFilter(choices=ProtectionStatus.choices)

    class Meta:
        model = Protection
        fields = ["pool", "vm", "level", "status"]


class WorkflowRunFilterSet(django_filters.FilterSet):
    pool = IdFilter(field_name="pool_id", help_text="Pool id")
    vm = IdFilter(field_name="vm_id", help_text="VM id")
    kind = django_filters.ChoiceFilter(choices=RunKind.choices)
    state = django_filters.MultipleChoiceFilter(choices=RunState.choices)

    class Meta:
        model = WorkflowRun
        fields = ["pool", "vm", "kind", "state"]


class FailoverEventFilterSet(django_filters.FilterSet):
    pool = IdFilter(field_name="pool_id", help_text="Pool id")
    vm = IdFilter(field_name="vm_id", help_text="VM id")
    state = django_filters.ChoiceFilter(choices=FailoverEvent.State.choices)

    class Meta:
        model = FailoverEvent
        fields = ["pool", "vm", "state"]


class AuditEntryFilterSet(django_filters.FilterSet):
    pool = IdFilter(field_name="pool_id", help_text="Pool id")
    vm = IdFilter(field_name="vm_id", help_text="VM id")
    action = django_filters.MultipleChoiceFilter(choices=AuditAction.choices)
    username = django_filters.CharFilter(lookup_expr="iexact")

    class Meta:
        model = AuditEntry
        fields = ["pool", "vm", "action", "username"]
