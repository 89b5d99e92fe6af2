"""The kernel's one table: the audit log every app writes to (``eac.audit``)."""
from django.conf import settings
from django.db import models

from .choices import AuditAction


class AuditEntry(models.Model):
    """Who changed what, when, and from where."""

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    username = models.CharField(max_length=150, blank=True, help_text="Kept when the user is deleted")
    action = models.CharField(max_length=32, choices=AuditAction.choices)
    via = models.CharField(max_length=16, blank=True, help_text="ui, api, websocket or system")
    remote_addr = models.GenericIPAddressField(null=True, blank=True)
    # By name, not by import: the kernel sits below the apps whose objects it names.
    pool = models.ForeignKey("inventory.Pool", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    vm = models.ForeignKey("inventory.VM", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    object_repr = models.CharField(max_length=255, blank=True)
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        # The table protection created before the audit log moved to the kernel (a state-only move).
        db_table = "protection_auditentry"
        ordering = ["-at", "-id"]
        verbose_name_plural = "audit entries"

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.username or 'system'} {self.get_action_display()} {self.object_repr}"
