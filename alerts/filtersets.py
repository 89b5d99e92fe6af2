"""One FilterSet for alerts, shared by the REST API and the alerts page."""
import django_filters

from .choices import AlertState, Condition
from .models import Alert


class AlertFilterSet(django_filters.FilterSet):
    state = django_filters.ChoiceFilter(choices=AlertState.choices)
    condition = django_filters.MultipleChoiceFilter(choices=Condition.choices)
    pool = django_filters.NumberFilter(field_name="pool_id")
    acknowledged = django_filters.BooleanFilter(field_name="acknowledged_at", lookup_expr="isnull", exclude=True)

    class Meta:
        model = Alert
        fields = ["state", "condition", "pool", "acknowledged"]
