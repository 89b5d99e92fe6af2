"""Alerts raised and cleared, who gets them, and each mail as an outbox row.

A ``Delivery`` row is written in the same transaction as the alert change it
reports: the mail is then sent by a Celery task and retried until the SMTP
server takes it, and a periodic sweeper re-enqueues any row still pending, so
a lost task message or a dead worker never loses a mail.
"""
from django.conf import settings
from django.db import models

from inventory.models import Pool

from .choices import SUBSCRIBABLE, AlertState, Condition, DeliveryKind, DeliveryState


class Alert(models.Model):
    """One condition on one object (a host, a VM, a pool), open until it clears."""

    condition = models.CharField(max_length=32, choices=Condition.choices)
    state = models.CharField(max_length=16, choices=AlertState.choices, default=AlertState.OPEN)
    # What the alert is about, e.g. "host:<uuid>"; duplicates fold on (condition, object_key).
    object_key = models.CharField(max_length=200)
    pool = models.ForeignKey(Pool, null=True, blank=True, on_delete=models.SET_NULL, related_name="alerts")
    pool_name = models.CharField(max_length=255, blank=True)
    host_name = models.CharField(max_length=255, blank=True)
    vm_name = models.CharField(max_length=255, blank=True)
    old_state = models.CharField(max_length=100, blank=True)
    new_state = models.CharField(max_length=100, blank=True)
    message = models.TextField()
    clear_message = models.TextField(blank=True)
    downtime_seconds = models.FloatField(null=True, blank=True)
    details = models.JSONField(default=dict, blank=True)

    raised_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField(auto_now_add=True)
    occurrences = models.PositiveIntegerField(default=1, help_text="Duplicates folded into this alert")
    cleared_at = models.DateTimeField(null=True, blank=True)
    acknowledged_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    acknowledged_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-raised_at", "-id"]
        constraints = [
            # Raised once: at most one open alert per object and condition.
            models.UniqueConstraint(
                fields=["condition", "object_key"], condition=models.Q(state="open"), name="alert_one_open"
            )
        ]
        indexes = [models.Index(fields=["state", "raised_at"])]

    def __str__(self) -> str:
        return f"{self.get_condition_display()}: {self.message}"


def all_conditions() -> list[str]:
    return [c.value for c in SUBSCRIBABLE]


class Recipient(models.Model):
    """An address that gets the mails of the conditions it subscribes to."""

    email = models.EmailField(unique=True)
    name = models.CharField(max_length=200, blank=True)
    conditions = models.JSONField(default=all_conditions, help_text="Condition codes this recipient gets")
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["email"]

    def __str__(self) -> str:
        return self.email


class Delivery(models.Model):
    """One mail to one recipient about one alert being raised, cleared or tested."""

    alert = models.ForeignKey(Alert, on_delete=models.CASCADE, related_name="deliveries")
    recipient = models.ForeignKey(Recipient, null=True, on_delete=models.SET_NULL, related_name="deliveries")
    email = models.EmailField()
    kind = models.CharField(max_length=16, choices=DeliveryKind.choices)
    state = models.CharField(max_length=16, choices=DeliveryState.choices, default=DeliveryState.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            # Each mail once: one row per alert, address and kind.
            models.UniqueConstraint(fields=["alert", "email", "kind"], name="delivery_once"),
        ]
        indexes = [models.Index(fields=["state", "next_attempt_at"])]
        verbose_name_plural = "deliveries"

    def __str__(self) -> str:
        return f"{self.get_kind_display()} {self.alert_id} → {self.email} ({self.state})"
