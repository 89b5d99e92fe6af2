"""Reads of alerts."""
from django.db.models import QuerySet

from .choices import AlertState
from .models import Alert, Recipient


def alert_list() -> QuerySet[Alert]:
    return Alert.objects.select_related("pool", "acknowledged_by")


def alert_open_count() -> int:
    return Alert.objects.filter(state=AlertState.OPEN).count()


def recipient_list() -> QuerySet[Recipient]:
    return Recipient.objects.all()
