"""One FilterSet for alerts, shared by the REST API and the alerts page."""
import django_filters

from eac.filters import BooleanFilter, IdFilter

from .choices import AlertState, Condition
from .models import Alert


class AlertFilterSet(django_filters.FilterSet):
    state = django_filters.ChoiceFilter(choices=AlertState.choices)
    condition = django_filters.MultipleChoiceFilter(choices=Condition.choices)
    pool = IdFilter(field_name="pool_id", help_text="Pool id")
    acknowledged = BooleanFilter(field_name="acknowledged_at", lookup_expr="isnull", exclude=True,
                                 help_text="true: acknowledged alerts only; false: those not acknowledged")

    class Meta:
        model = Alert
        fields = ["state", "condition", "pool", "acknowledged"]
