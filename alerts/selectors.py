"""Reads of alerts."""
from django.db.models import QuerySet

from inventory.models import Pool

from .choices import AlertState
from .models import Alert, Recipient


def alert_list() -> QuerySet[Alert]:
    return Alert.objects.select_related("pool", "acknowledged_by")


def alert_open_count() -> int:
    return Alert.objects.filter(state=AlertState.OPEN).count()


def recipient_list() -> QuerySet[Recipient]:
    return Recipient.objects.all()


# -- what is open (protection's observer asks before it raises or clears) ------------------------------


def alert_is_open(*, condition: str, object_key: str) -> bool:
    return Alert.objects.filter(condition=condition, object_key=object_key, state=AlertState.OPEN).exists()


def open_object_keys(*, condition: str, pool: Pool | None = None) -> set[str]:
    qs = Alert.objects.filter(condition=condition, state=AlertState.OPEN)
    if pool is not None:
        qs = qs.filter(pool=pool)
    return set(qs.values_list("object_key", flat=True))


def open_alerts(*, condition: str, pool: Pool | None = None, from_host: str | None = None) -> list[Alert]:
    qs = Alert.objects.filter(condition=condition, state=AlertState.OPEN)
    if pool is not None:
        qs = qs.filter(pool=pool)
    if from_host is not None:
        qs = qs.filter(details__from_host=from_host)
    return list(qs)


def open_alert_raised_at(*, condition: str, object_key: str):
    return (
        Alert.objects.filter(condition=condition, object_key=object_key, state=AlertState.OPEN)
        .values_list("raised_at", flat=True)
        .first()
    )
