"""REST representations of protection, workflow runs, failover events, the plan and the audit log."""
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from eac.filters import id_schema
from eac.models import AuditEntry
from inventory.models import VM

from ..choices import (
    EPOCH_MS_DEFAULT,
    EPOCH_MS_MAX,
    EPOCH_MS_MIN,
    ORDER_MAX,
    START_DELAY_MAX,
    ComponentState,
    Level,
    RestartPriority,
)
from ..models import FailoverEvent, ProtectedDisk, Protection, WorkflowRun, WorkflowStep


@extend_schema_field({"oneOf": [id_schema(), {"type": "string", "format": "uuid"}]})
class VMField(serializers.Field):
    """A VM by id or by uuid."""

    default_error_messages = {"missing": "No VM with this id or uuid.", "invalid": "Give a VM id or uuid."}

    def to_internal_value(self, data):
        if isinstance(data, bool):
            self.fail("invalid")
        if isinstance(data, int) or (isinstance(data, str) and data.isdigit()):
            vm = VM.objects.select_related("pool").filter(pk=int(data)).first()
        elif isinstance(data, str) and 8 <= len(data) <= 64:
            vm = VM.objects.select_related("pool").filter(uuid=data).first()
        else:
            self.fail("invalid")
        if vm is None:
            self.fail("missing")
        return vm

    def to_representation(self, value):
        return value.pk


class ProtectionSettingsSerializer(serializers.Serializer):
    restart_priority = serializers.ChoiceField(choices=RestartPriority.choices, default=RestartPriority.RESTART)
    order = serializers.IntegerField(min_value=0, max_value=ORDER_MAX, default=0)
    start_delay = serializers.IntegerField(min_value=0, max_value=START_DELAY_MAX, default=0, help_text="Seconds")
    heartbeat_sr = serializers.CharField(
        required=False, allow_blank=True, help_text="UUID of the shared SR for the HA heartbeat, when HA is off"
    )
    failures_to_tolerate = serializers.IntegerField(
        required=False, min_value=0, help_text="Host failures to tolerate, when this turns HA on (default 1)"
    )
    secondary_host = serializers.CharField(
        required=False, allow_blank=True, max_length=64,
        help_text="Level 2: UUID of the secondary host, the AM peer of the VM's host (default: that peer)",
    )
    secondary_memory = serializers.IntegerField(
        required=False, min_value=1, max_value=2**52,
        help_text="Level 2: bytes of memory reserved for the secondary VM (default: the VM's; not below its "
                  "dynamic minimum — after a failover the VM runs with this much)",
    )
    epoch_ms = serializers.IntegerField(
        required=False, min_value=EPOCH_MS_MIN, max_value=EPOCH_MS_MAX,
        help_text=f"Level 3: milliseconds between two checkpoints (default {EPOCH_MS_DEFAULT})",
    )


class ProtectionCreateSerializer(serializers.Serializer):
    vm = VMField(help_text="VM id or uuid")
    level = serializers.ChoiceField(choices=Level.choices)
    settings = ProtectionSettingsSerializer(required=False, default=dict)


class WorkflowStepSerializer(serializers.ModelSerializer):
    class Meta:
        model = WorkflowStep
        fields = ["position", "name", "label", "state", "progress", "message", "attempts", "error_code",
                  "error_params", "started_at", "finished_at"]
        read_only_fields = fields


class WorkflowRunSerializer(serializers.ModelSerializer):
    steps = WorkflowStepSerializer(many=True, read_only=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)

    class Meta:
        model = WorkflowRun
        fields = ["id", "kind", "state", "pool", "vm", "vm_name", "protection", "params", "progress",
                  "error_code", "error_message", "claims", "created_by", "created_at", "started_at",
                  "finished_at", "steps"]
        read_only_fields = fields


class ProtectedDiskSerializer(serializers.ModelSerializer):
    primary_host = serializers.SlugRelatedField(slug_field="uuid", read_only=True, allow_null=True)
    secondary_host = serializers.SlugRelatedField(slug_field="uuid", read_only=True, allow_null=True)

    class Meta:
        model = ProtectedDisk
        fields = ["resource", "userdevice", "primary_vdi_uuid", "replica_vdi_uuid", "primary_host",
                  "secondary_host", "size", "primary_resource", "routed", "replica_tagged", "secondary_resource",
                  "sync_state", "sync_progress", "updated_at"]
        read_only_fields = fields


class CheckpointFiguresSerializer(serializers.Serializer):
    """A Level 3 checkpoint as an AM last reported it (GET /v1/resources/{name}, docs/level3.md); null: not said."""

    epoch_ms = serializers.IntegerField()
    state = serializers.CharField(help_text="Checkpointing, Stalled, Unprotected, Standby or NoGuest")
    last_committed = serializers.IntegerField(allow_null=True, help_text="The last committed epoch's number")
    last_commit_age_ms = serializers.FloatField(allow_null=True)
    size_bytes = serializers.IntegerField(allow_null=True, help_text="The last checkpoint's size")
    capture_ms = serializers.FloatField(allow_null=True, help_text="The last checkpoint: pause to resume")
    commit_ms = serializers.FloatField(allow_null=True, help_text="The last checkpoint: capture to acknowledged")
    output_hold_ms = serializers.FloatField(allow_null=True, help_text="Mean hold of the last committed epoch's "
                                                                       "packets")
    held_packets = serializers.IntegerField(allow_null=True, help_text="Packets held now")


class ComponentSerializer(serializers.Serializer):
    """One Level 2 component as both AMs were last read (``protection/health.py``)."""

    id = serializers.CharField(help_text="disk:<device>@<host uuid>, nic:<device>@<host uuid>, link:a, link:b, "
                                         "peer, witness@<host uuid>, am@<host uuid>, checkpoint@<host uuid> "
                                         "(Level 3)")
    kind = serializers.CharField()
    name = serializers.CharField()
    host = serializers.CharField(allow_blank=True, help_text="UUID of the host it belongs to (blank: the pair)")
    host_name = serializers.CharField(allow_blank=True)
    state = serializers.ChoiceField(choices=ComponentState.choices)
    detail = serializers.CharField(allow_blank=True, help_text="What is degraded, in words")
    repair = serializers.CharField(allow_blank=True, help_text="What to repair, in words")
    since = serializers.DateTimeField(allow_null=True, required=False)
    progress = serializers.FloatField(required=False, help_text="A disk being synced: 0..1")
    checkpoint = CheckpointFiguresSerializer(
        required=False, help_text="Level 3, kind Checkpointing: the figures its AM last reported")


class Level2ActionSerializer(serializers.Serializer):
    disk = serializers.CharField(required=False, allow_blank=True, max_length=80,
                                 help_text="repair: the device (xvda) or resource of the repaired disk; "
                                           "default: every failed one")


class Level2ActionAnswerSerializer(serializers.Serializer):
    action = serializers.CharField()
    disk = serializers.CharField(allow_blank=True)
    queued = serializers.BooleanField()
    run = serializers.IntegerField(required=False, allow_null=True,
                                   help_text="swap: the workflow run that does it (/api/v1/workflow-runs/{id}/)")
    message = serializers.CharField()


class ProtectionSerializer(serializers.ModelSerializer):
    vm_uuid = serializers.CharField(source="vm.uuid", read_only=True)
    vm_name = serializers.CharField(source="vm.name_label", read_only=True)
    status_label = serializers.CharField(source="get_status_display", read_only=True)
    last_run = serializers.SerializerMethodField()
    secondary_host = serializers.SlugRelatedField(slug_field="uuid", read_only=True, allow_null=True,
                                                  help_text="Level 2: UUID of the secondary host")
    disks = ProtectedDiskSerializer(many=True, read_only=True, help_text="Level 2: the mirrored disks")
    components = ComponentSerializer(many=True, read_only=True,
                                     help_text="Level 2: each component's state as both AMs were last read")
    failed_over_to = serializers.SlugRelatedField(slug_field="uuid", read_only=True, allow_null=True,
                                                  help_text="Level 2: the host the VM runs on after a failover")

    class Meta:
        model = Protection
        fields = ["id", "vm", "vm_uuid", "vm_name", "pool", "level", "status", "status_label", "status_reason",
                  "restart_priority", "order", "start_delay", "ha_enabled_by_console", "secondary_host",
                  "secondary_memory", "secondary_vm_uuid", "epoch_ms", "disks", "components", "components_checked_at",
                  "last_verify", "failed_over_to", "failed_over_at", "created_at", "updated_at", "last_run"]
        read_only_fields = fields

    @extend_schema_field(serializers.IntegerField(allow_null=True))
    def get_last_run(self, obj) -> int | None:
        run = obj.workflow_runs.order_by("-created_at", "-id").values_list("pk", flat=True).first()
        return run


class FailoverEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = FailoverEvent
        fields = ["id", "pool", "vm", "vm_uuid", "vm_name", "state", "from_host", "from_host_name", "to_host",
                  "to_host_name", "detected_at", "restarted_at", "downtime_seconds"]
        read_only_fields = fields


class AuditEntrySerializer(serializers.ModelSerializer):
    action_label = serializers.CharField(source="get_action_display", read_only=True)

    class Meta:
        model = AuditEntry
        fields = ["id", "at", "username", "action", "action_label", "via", "remote_addr", "pool", "vm",
                  "object_repr", "detail"]
        read_only_fields = fields


class ShortfallVMSerializer(serializers.Serializer):
    key = serializers.CharField(help_text="VM uuid")
    name = serializers.CharField()
    memory = serializers.IntegerField(help_text="Bytes")


class ShortfallSerializer(serializers.Serializer):
    failed_hosts = serializers.ListField(child=serializers.CharField())
    failed_host_keys = serializers.ListField(child=serializers.CharField())
    vms = ShortfallVMSerializer(many=True)
    missing_memory = serializers.IntegerField(help_text="Bytes the VMs that would not restart need")
    approximate = serializers.BooleanField()
    reason = serializers.CharField()
    text = serializers.CharField()


class FailoverPlanSerializer(serializers.Serializer):
    pool = serializers.IntegerField()
    pool_name = serializers.CharField()
    ha_enabled = serializers.BooleanField()
    configured_failures_to_tolerate = serializers.IntegerField()
    max_failures_to_tolerate = serializers.IntegerField(help_text="The most host failures the pool can tolerate now")
    xapi_plan_exists_for = serializers.IntegerField()
    xapi_overcommitted = serializers.BooleanField()
    holds = serializers.BooleanField()
    overcommitted = serializers.BooleanField()
    exact = serializers.BooleanField()
    live_hosts = serializers.IntegerField()
    total_hosts = serializers.IntegerField()
    protected_vms = serializers.IntegerField()
    protected_memory = serializers.IntegerField()
    free_memory = serializers.IntegerField()
    not_restartable_now = ShortfallVMSerializer(many=True)
    shortfalls = ShortfallSerializer(many=True)


class FailuresToTolerateSerializer(serializers.Serializer):
    failures_to_tolerate = serializers.IntegerField(min_value=0)


class PreflightCheckSerializer(serializers.Serializer):
    name = serializers.CharField()
    title = serializers.CharField()
    ok = serializers.BooleanField()
    message = serializers.CharField()
    blocking = serializers.BooleanField()


class SecondaryHostSerializer(serializers.Serializer):
    uuid = serializers.CharField()
    name_label = serializers.CharField()
    memory_free = serializers.IntegerField(help_text="Bytes")
    suggested = serializers.BooleanField(help_text="The AM peer of the VM's host")


class Level2PreflightSerializer(serializers.Serializer):
    secondary_host = serializers.CharField(help_text="The secondary chosen or suggested (\"\" if none)")
    secondary_hosts = SecondaryHostSerializer(many=True)
    secondary_memory = serializers.IntegerField(help_text="Bytes the secondary reserves")
    memory_default = serializers.IntegerField(help_text="Bytes: the VM's memory")
    memory_minimum = serializers.IntegerField(help_text="Bytes: the VM's dynamic minimum")
    secondary_sr = serializers.CharField(help_text="The local SR of the secondary for the replicas")


class Level3PreflightSerializer(serializers.Serializer):
    epoch_ms = serializers.IntegerField(allow_null=True, help_text="The epoch length asked (null: not a number)")
    epoch_min = serializers.IntegerField()
    epoch_max = serializers.IntegerField()
    vcpus_max = serializers.IntegerField(help_text="The VM's VCPUs_max (Level 3 needs 1)")


class PreflightSerializer(serializers.Serializer):
    vm = serializers.IntegerField()
    level = serializers.IntegerField()
    can_proceed = serializers.BooleanField()
    checks = PreflightCheckSerializer(many=True)
    ha_enabled = serializers.BooleanField()
    failures_to_tolerate = serializers.IntegerField()
    max_failures_with_vm = serializers.IntegerField()
    heartbeat_srs = serializers.ListField(child=serializers.DictField())
    level2 = Level2PreflightSerializer(allow_null=True, help_text="Level 2's choices, Level 3's too (null at "
                                                                  "Level 1)")
    level3 = Level3PreflightSerializer(allow_null=True, help_text="Level 3's own choices (null at other levels)")


class PreflightQuerySerializer(serializers.Serializer):
    vm = VMField()
    level = serializers.ChoiceField(choices=Level.choices, default=Level.BASIC_RESTART)
    restart_priority = serializers.ChoiceField(choices=RestartPriority.choices, default=RestartPriority.RESTART)
    failures_to_tolerate = serializers.IntegerField(required=False, min_value=0)
    heartbeat_sr = serializers.CharField(required=False, allow_blank=True)
    secondary_host = serializers.CharField(required=False, allow_blank=True, max_length=64)
    secondary_memory = serializers.IntegerField(required=False, min_value=1, max_value=2**52)
    epoch_ms = serializers.IntegerField(required=False, min_value=EPOCH_MS_MIN, max_value=EPOCH_MS_MAX)


class ConflictSerializer(serializers.Serializer):
    detail = serializers.CharField()
    reasons = serializers.ListField(child=serializers.CharField())
