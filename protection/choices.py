"""Enumerations of protection, with their labels (and colours for the UI) in one place."""
from django.db import models


class Level(models.IntegerChoices):
    BASIC_RESTART = 1, "Level 1 — basic restart"
    COMPONENT_FT = 2, "Level 2 — component fault tolerance"
    SYSTEM_FT = 3, "Level 3 — system fault tolerance"


# Only Level 1 can be dialled until the Availability Manager agents exist.
AVAILABLE_LEVELS = frozenset({Level.BASIC_RESTART})
UNAVAILABLE_REASON = {
    Level.COMPONENT_FT: "Needs the Availability Manager agents on the hosts, which are not released yet.",
    Level.SYSTEM_FT: "Needs the Availability Manager agents and checkpointing, which are not released yet.",
}

# What each level protects against (the comparison table of the original product).
LEVEL_COMPARISON = [
    ("Mechanism", "XAPI's own HA (pool HA, restart priority)", "A pair of AM agents, primary + secondary host",
     "As Level 2, plus continuous checkpointing"),
    ("Host failure", "VM restarted on a surviving host", "VM restarted from the mirrored disk on the secondary",
     "VM continues from the last checkpoint; clients keep their sessions"),
    ("VM failure (crash)", "Not detected", "Restarted on the secondary", "Continues"),
    ("Disk / NIC failure", "Not handled", "I/O redirected to the peer's copy / NIC", "Same as Level 2"),
    ("Storage", "Shared SRs only (the VM must be agile)", "Any SR: local disks mirrored synchronously",
     "Same as Level 2"),
    ("Capacity", "Failover plan: host failures to tolerate; starts refused below the limit",
     "Secondary memory and devices reserved at start", "Same as Level 2"),
    ("Notification", "Email on host loss, restart, plan overcommitted",
     "Email on every loss and return of redundancy", "Same as Level 2"),
]


class ProtectionStatus(models.TextChoices):
    CANDIDATE = "candidate", "Candidate"
    PROTECTING = "protecting", "Protecting"
    PROTECTED = "protected", "Protected"
    DEGRADED = "degraded", "Degraded"
    FAILING_OVER = "failing_over", "Failing over"
    UNPROTECTING = "unprotecting", "Unprotecting"
    FAILED = "failed", "Failed"


# Colours of the health a VM's protection shows (protection.selectors.vm_annotate_protection).
HEALTH_COLOUR = {
    "good": "green",
    "degraded": "orange",
    "failed": "red",
    "unprotected": "grey",
    "candidate": "blue",
}


class RestartPriority(models.TextChoices):
    # XAPI's values for VM.ha_restart_priority.
    RESTART = "restart", "Restart (guaranteed by the failover plan)"
    BEST_EFFORT = "best-effort", "Best effort (restarted if there is room)"


class RunKind(models.TextChoices):
    PROTECT = "protect", "Protect"
    UNPROTECT = "unprotect", "Unprotect"
    SET_FAILURES_TO_TOLERATE = "set_ftt", "Set host failures to tolerate"


class RunState(models.TextChoices):
    PENDING = "pending", "Waiting for a worker"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


class StepState(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    DONE = "done", "Done"
    FAILED = "failed", "Failed"


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
