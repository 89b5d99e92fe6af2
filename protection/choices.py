"""Enumerations of protection, with their labels (and colours for the UI) in one place."""
from django.db import models


class Level(models.IntegerChoices):
    BASIC_RESTART = 1, "Level 1 — basic restart"
    COMPONENT_FT = 2, "Level 2 — component fault tolerance"
    SYSTEM_FT = 3, "Level 3 — system fault tolerance"


AVAILABLE_LEVELS = frozenset({Level.BASIC_RESTART, Level.COMPONENT_FT, Level.SYSTEM_FT})
# Why a level that is not in AVAILABLE_LEVELS cannot be chosen (the wizard shows it; the service refuses with it).
UNAVAILABLE_REASON: dict[Level, str] = {}

# The levels whose protection is a pair of Availability Managers (Level 2's machinery: replicas, a paused
# secondary VM, component health, failover). Level 3 is Level 2 plus checkpointing.
AM_LEVELS = frozenset({Level.COMPONENT_FT, Level.SYSTEM_FT})


def uses_ams(level: int | None) -> bool:
    return level in AM_LEVELS


# Level 3: the epoch length (ms) between two checkpoints, bounded as the AM's API bounds it; and the one vCPU
# a checkpoint captures (XAPI's VM.VCPUs_max), and the VM's NICs whose output the AM holds (1..8 MACs).
EPOCH_MS_MIN, EPOCH_MS_MAX, EPOCH_MS_DEFAULT = 20, 500, 50
LEVEL3_VCPUS = 1
LEVEL3_MAX_NICS = 8


class CheckpointState(models.TextChoices):
    """A Level 3 resource's checkpointing, as its AM names it (``GET /v1/resources/{name}`` ``checkpoint.state``)."""

    CHECKPOINTING = "Checkpointing", "Checkpointing"  # primary: its checkpoints acknowledged by the secondary
    STALLED = "Stalled", "Stalled"  # primary: no acknowledgement for max(10 epochs, 1 s), the peer connected
    UNPROTECTED = "Unprotected", "Unprotected"  # primary without a peer: runs on, output not held
    STANDBY = "Standby", "Standby"  # secondary: receiving checkpoints
    NO_GUEST = "NoGuest", "No guest"  # primary: the guest's checkpoint control is not reachable

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


class Health(models.TextChoices):
    """How a VM's protection is doing, as its icons show it (``selectors.vm_annotate_protection``)."""

    GOOD = "good", "Good"
    DEGRADED = "degraded", "Degraded"
    FAILED = "failed", "Failed"
    UNPROTECTED = "unprotected", "Unprotected"


class ComponentState(models.TextChoices):
    """The state of one Level 2 component (a disk replica, a NIC, a link, the peer, the witness, an AM)."""

    OK = "ok", "OK"
    DEGRADED = "degraded", "Degraded"
    FAILED = "failed", "Failed"
    UNKNOWN = "unknown", "Unknown"


class Level2Action(models.TextChoices):
    """What an administrator can ask of a Level 2 protection's AMs (REST actions, the VM page)."""

    VALIDATE = "validate", "Validate the replicas"
    SWAP = "swap", "Swap roles (planned)"
    REPAIR = "repair", "Disk repaired: resync it"


class SummaryGroup(models.TextChoices):
    """The groups of the original console's "Protected VM Summary", in its order: where a VM counts,
    derived from its ProtectionStatus (or its storage, when it has none)."""

    LEVEL1 = "level1", "Protected at Level 1"
    LEVEL2 = "level2", "Protected at Level 2"
    LEVEL3 = "level3", "Protected at Level 3"
    DEGRADED = "degraded", "Degraded"
    CANDIDATE = "candidate", "Candidate"
    UNPROTECTED = "unprotected", "Unprotected"


# XAPI power states in which a VM holds its host's memory (and HA must restart it if the host dies).
RUNNING_STATES = ("Running", "Paused")

# Bounds of the Level 1 settings, shared by the service, the wizard's form and the API's serializer.
ORDER_MAX = 10_000  # VM.order: XAPI restarts lower orders first
START_DELAY_MAX = 86_400  # seconds, VM.start_delay


class RestartPriority(models.TextChoices):
    # XAPI's values for VM.ha_restart_priority.
    RESTART = "restart", "Restart (guaranteed by the failover plan)"
    BEST_EFFORT = "best-effort", "Best effort (restarted if there is room)"


class RunKind(models.TextChoices):
    PROTECT = "protect", "Protect"
    UNPROTECT = "unprotect", "Unprotect"
    SET_FAILURES_TO_TOLERATE = "set_ftt", "Set host failures to tolerate"
    SWAP = "swap", "Planned role swap"


class RunState(models.TextChoices):
    PENDING = "pending", "Waiting for a worker"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


ACTIVE_RUN_STATES = (RunState.PENDING, RunState.RUNNING)


class StepState(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    DONE = "done", "Done"
    FAILED = "failed", "Failed"
