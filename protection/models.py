"""A VM's protection, the workflows that change it, and failover events.

A workflow is a run of named steps persisted here (see ``protection/workflows.py``):
the database, not the worker, is where a run stands, so a killed worker leaves
a run another worker can resume at its first unfinished step.
"""
from django.conf import settings
from django.db import models

from inventory.models import VM, Host, Pool

from .choices import Level, ProtectionStatus, RestartPriority, RunKind, RunState, StepState


class Protection(models.Model):
    """The availability level dialled for one VM, and where its protection stands."""

    vm = models.OneToOneField(VM, on_delete=models.CASCADE, related_name="protection")
    pool = models.ForeignKey(Pool, on_delete=models.CASCADE, related_name="protections")
    level = models.IntegerField(choices=Level.choices, default=Level.BASIC_RESTART)
    status = models.CharField(max_length=16, choices=ProtectionStatus.choices, default=ProtectionStatus.CANDIDATE)
    status_reason = models.TextField(blank=True, help_text="Why the protection is degraded or failed, in words")

    # Level 1 settings, as XAPI names them.
    restart_priority = models.CharField(
        max_length=16, choices=RestartPriority.choices, default=RestartPriority.RESTART
    )
    order = models.PositiveIntegerField(default=0, help_text="Restart order: lower starts first")
    start_delay = models.PositiveIntegerField(default=0, help_text="Seconds to wait before starting the next VM")
    # What the VM had before we changed it, so unprotect undoes exactly that.
    previous_settings = models.JSONField(default=dict, blank=True)
    ha_enabled_by_console = models.BooleanField(default=False)

    # Where the watcher last saw the VM run: a change of host while the old one is dead is a failover.
    observed_host = models.ForeignKey(Host, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    observed_power_state = models.CharField(max_length=16, blank=True)

    # Level 2 settings: the host whose AM holds the replicas and runs the secondary VM (paused), and the
    # memory reserved there for it; the secondary VM, once made (what unprotect destroys).
    secondary_host = models.ForeignKey(Host, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    secondary_memory = models.BigIntegerField(null=True, blank=True, help_text="Bytes reserved for the secondary VM")
    secondary_vm_uuid = models.CharField(max_length=64, blank=True)
    # Level 3 setting: the time between two checkpoints, in ms (choices.EPOCH_MS_MIN..EPOCH_MS_MAX); None below Level 3.
    epoch_ms = models.PositiveIntegerField(null=True, blank=True, help_text="Level 3: ms between two checkpoints")
    # Level 2 component health, as the last poll of both AMs found it (``protection/health.py``): a list of
    # {"id", "kind", "name", "host", "host_name", "state" (ComponentState), "detail", "repair", "since",
    # "progress"?}. A JSON list rather than a table: it is always read and written whole, by one poller, and
    # each component's alert (keyed by its id) is what keeps its history.
    components = models.JSONField(default=list, blank=True)
    components_checked_at = models.DateTimeField(null=True, blank=True)
    # The last active validation (POST …/verify on the primary AM, each disk): {"at", "ok", "mismatches",
    # "disks": {resource: {"ok", "mismatches", "chunks", "seconds"} | {"error"}}, "message"}.
    last_verify = models.JSONField(default=dict, blank=True)
    # After a Level 2 failover: the host the VM runs on now (the secondary's), and when the console saw it.
    failed_over_to = models.ForeignKey(Host, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    failed_over_at = models.DateTimeField(null=True, blank=True)
    # After a planned role swap (``RunKind.SWAP``): the VM runs on the host that was its secondary, from the
    # replicas there, and its copy waits on the former primary. A swap back clears it.
    swapped = models.BooleanField(default=False)

    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["vm__name_label"]
        indexes = [models.Index(fields=["pool", "status"])]

    def __str__(self) -> str:
        return f"{self.vm} (Level {self.level}, {self.get_status_display()})"


class ProtectedDisk(models.Model):
    """One disk of a Level 2 VM: its AM resource on both hosts, and how far each part of it was done.

    Written by the protect workflow before and after each thing it does, so that unprotect (or a failed
    protect's cleanup) undoes exactly what exists, and nothing else.
    """

    protection = models.ForeignKey(Protection, on_delete=models.CASCADE, related_name="disks")
    resource = models.CharField(max_length=80, help_text="AM resource name, vdi-<primary VDI uuid>")
    userdevice = models.CharField(max_length=16, blank=True)
    primary_vdi_uuid = models.CharField(max_length=64)
    replica_vdi_uuid = models.CharField(max_length=64, blank=True)
    primary_host = models.ForeignKey(Host, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    secondary_host = models.ForeignKey(Host, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # The AMs' addresses when the resources were made: where to delete them, even if a host row changed.
    primary_am_url = models.CharField(max_length=255, blank=True)
    secondary_am_url = models.CharField(max_length=255, blank=True)
    size = models.BigIntegerField(default=0, help_text="Bytes (the VDI's virtual size)")
    # What the workflow did (True) and has not undone yet.
    primary_resource = models.BooleanField(default=False)
    routed = models.BooleanField(default=False, help_text="eac_am_resource set on the primary VDI")
    replica_tagged = models.BooleanField(default=False, help_text="eac_am_resource set on the replica VDI")
    secondary_resource = models.BooleanField(default=False)
    sync_state = models.CharField(max_length=32, blank=True, help_text="The replica's disk state, as its AM says")
    sync_progress = models.FloatField(default=0.0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["protection", "userdevice", "resource"]
        constraints = [models.UniqueConstraint(fields=["protection", "resource"], name="protecteddisk_resource")]

    def __str__(self) -> str:
        return self.resource


class WorkflowRun(models.Model):
    """One run of a workflow (protect, unprotect): a list of steps and who holds it."""

    kind = models.CharField(max_length=16, choices=RunKind.choices)
    state = models.CharField(max_length=16, choices=RunState.choices, default=RunState.PENDING)
    pool = models.ForeignKey(Pool, on_delete=models.CASCADE, related_name="workflow_runs")
    vm = models.ForeignKey(VM, null=True, blank=True, on_delete=models.SET_NULL, related_name="workflow_runs")
    vm_name = models.CharField(max_length=255, blank=True)
    protection = models.ForeignKey(
        Protection, null=True, blank=True, on_delete=models.SET_NULL, related_name="workflow_runs"
    )
    params = models.JSONField(default=dict, blank=True)

    # Claiming: a worker takes a run with a conditional UPDATE and keeps a lease on it.
    claimed_by = models.CharField(max_length=200, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    claims = models.PositiveIntegerField(default=0, help_text="How many times a worker took the run")

    progress = models.FloatField(default=0.0)
    error_code = models.CharField(max_length=100, blank=True)
    error_message = models.TextField(blank=True)

    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    remote_addr = models.GenericIPAddressField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["state", "lease_until"])]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} {self.vm_name or self.pool} #{self.pk}"

    @property
    def finished(self) -> bool:
        return self.state in (RunState.SUCCEEDED, RunState.FAILED)


class WorkflowStep(models.Model):
    run = models.ForeignKey(WorkflowRun, on_delete=models.CASCADE, related_name="steps")
    position = models.PositiveIntegerField()
    name = models.CharField(max_length=64)
    label = models.CharField(max_length=200)
    state = models.CharField(max_length=16, choices=StepState.choices, default=StepState.PENDING)
    progress = models.FloatField(default=0.0)
    message = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(default=0)
    error_code = models.CharField(max_length=100, blank=True)
    error_params = models.JSONField(default=list, blank=True)
    result = models.JSONField(default=dict, blank=True, help_text="What the step found, for the steps after it")
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["run", "position"]
        constraints = [models.UniqueConstraint(fields=["run", "position"], name="workflowstep_run_position")]

    def __str__(self) -> str:
        return f"{self.label} ({self.state})"


class FailoverEvent(models.Model):
    """A protected VM lost with its host, and (hopefully) restarted elsewhere by XAPI HA."""

    class State(models.TextChoices):
        DOWN = "down", "Waiting for restart"
        RESTARTED = "restarted", "Restarted"
        FAILED = "failed", "Failed to restart"

    pool = models.ForeignKey(Pool, on_delete=models.CASCADE, related_name="failover_events")
    vm = models.ForeignKey(VM, null=True, blank=True, on_delete=models.SET_NULL, related_name="failover_events")
    vm_uuid = models.CharField(max_length=64)
    vm_name = models.CharField(max_length=255, blank=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.DOWN)
    from_host = models.ForeignKey(Host, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    from_host_name = models.CharField(max_length=255, blank=True)
    to_host = models.ForeignKey(Host, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    to_host_name = models.CharField(max_length=255, blank=True)
    detected_at = models.DateTimeField()
    restarted_at = models.DateTimeField(null=True, blank=True)
    downtime_seconds = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["-detected_at", "-id"]
        constraints = [
            # At most one failover of a VM in progress at a time.
            models.UniqueConstraint(
                fields=["vm_uuid", "pool"], condition=models.Q(state="down"), name="failoverevent_one_open_per_vm"
            )
        ]

    def __str__(self) -> str:
        return f"{self.vm_name}: {self.from_host_name} → {self.to_host_name or '?'}"
