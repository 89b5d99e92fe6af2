"""Enumerations of the kernel: what the audit log records."""
from django.db import models


class AuditAction(models.TextChoices):
    PROTECT = "protect", "Protect requested"
    UNPROTECT = "unprotect", "Unprotect requested"
    PROTECTED = "protected", "Protection completed"
    UNPROTECTED = "unprotected", "Unprotection completed"
    WORKFLOW_FAILED = "workflow_failed", "Workflow failed"
    SET_FAILURES_TO_TOLERATE = "set_ftt", "Host failures to tolerate set"
    SET_FAILURES_TO_TOLERATE_REFUSED = "set_ftt_refused", "Host failures to tolerate refused"
    ALERT_ACKNOWLEDGED = "alert_ack", "Alert acknowledged"
    RECIPIENT_CHANGED = "recipient", "Alert recipient changed"
    TEST_ALERT = "test_alert", "Test alert sent"
    VM_START = "vm_start", "Start requested"
    VM_SHUTDOWN = "vm_shutdown", "Shut down requested"
    VM_POWER_REFUSED = "vm_power_refused", "Power action refused"
    POOL_REMOVE = "pool_remove", "Pool removal requested"
    POOL_REMOVED = "pool_removed", "Pool removed"
    LEVEL2_ACTION = "level2_action", "Level 2 action requested"
