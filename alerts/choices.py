"""Alert conditions, states and deliveries, with their labels in one place."""
from django.db import models


class Condition(models.TextChoices):
    HOST_LOST = "host_lost", "Host lost"
    VM_RESTARTED = "vm_restarted", "VM restarted by HA"
    VM_RESTART_FAILED = "vm_restart_failed", "VM failed to restart"
    PLAN_OVERCOMMITTED = "plan_overcommitted", "Failover plan overcommitted"
    WORKFLOW_FAILED = "workflow_failed", "Protection workflow failed"
    POOL_UNREACHABLE = "pool_unreachable", "Pool unreachable"
    # Level 2: one alert per component of a protection (a disk replica, a NIC, a link, the peer, the
    # witness, an AM), keyed by ``alerts.keys.component_key``.
    REDUNDANCY_LOST = "redundancy_lost", "Level 2 redundancy lost"
    VALIDATION_MISMATCH = "validation_mismatch", "Level 2 validation mismatch"
    FAILOVER_DONE = "failover_done", "Level 2 failover done"
    FAILOVER_FAILED = "failover_failed", "Level 2 failover failed"
    # Level 3: the primary AM's checkpoints are not acknowledged (its output held), keyed vm:<uuid>/checkpoint.
    CHECKPOINT_STALLED = "checkpoint_stalled", "Level 3 checkpointing stalled"
    TEST = "test", "Test alert"


# Conditions a recipient can subscribe to (the test alert goes to whoever asks for it).
SUBSCRIBABLE = [c for c in Condition if c != Condition.TEST]

SEVERITY = {
    Condition.HOST_LOST: "critical",
    Condition.VM_RESTARTED: "warning",
    Condition.VM_RESTART_FAILED: "critical",
    Condition.PLAN_OVERCOMMITTED: "warning",
    Condition.WORKFLOW_FAILED: "warning",
    Condition.POOL_UNREACHABLE: "critical",
    Condition.REDUNDANCY_LOST: "warning",
    Condition.VALIDATION_MISMATCH: "critical",
    Condition.FAILOVER_DONE: "warning",
    Condition.FAILOVER_FAILED: "critical",
    # The VM's network output is held while no checkpoint is acknowledged: its clients see it frozen.
    Condition.CHECKPOINT_STALLED: "critical",
    Condition.TEST: "info",
}


class AlertState(models.TextChoices):
    OPEN = "open", "Open"
    CLEARED = "cleared", "Cleared"


class DeliveryKind(models.TextChoices):
    RAISED = "raised", "Raised"
    CLEARED = "cleared", "Cleared"
    TEST = "test", "Test"


class DeliveryState(models.TextChoices):
    PENDING = "pending", "Pending"
    SENT = "sent", "Sent"
    FAILED = "failed", "Gave up"
