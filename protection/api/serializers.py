"""REST representations of protection, workflow runs, failover events, the plan and the audit log."""
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from eac.filters import id_schema
from eac.models import AuditEntry
from inventory.models import VM

from ..choices import ORDER_MAX, START_DELAY_MAX, Level, RestartPriority
from ..models import FailoverEvent, Protection, WorkflowRun, WorkflowStep


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


class ProtectionSerializer(serializers.ModelSerializer):
    vm_uuid = serializers.CharField(source="vm.uuid", read_only=True)
    vm_name = serializers.CharField(source="vm.name_label", read_only=True)
    status_label = serializers.CharField(source="get_status_display", read_only=True)
    last_run = serializers.SerializerMethodField()

    class Meta:
        model = Protection
        fields = ["id", "vm", "vm_uuid", "vm_name", "pool", "level", "status", "status_label", "status_reason",
                  "restart_priority", "order", "start_delay", "ha_enabled_by_console", "created_at", "updated_at",
                  "last_run"]
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


class PreflightSerializer(serializers.Serializer):
    vm = serializers.IntegerField()
    level = serializers.IntegerField()
    can_proceed = serializers.BooleanField()
    checks = PreflightCheckSerializer(many=True)
    ha_enabled = serializers.BooleanField()
    failures_to_tolerate = serializers.IntegerField()
    max_failures_with_vm = serializers.IntegerField()
    heartbeat_srs = serializers.ListField(child=serializers.DictField())


class PreflightQuerySerializer(serializers.Serializer):
    vm = VMField()
    level = serializers.ChoiceField(choices=Level.choices, default=Level.BASIC_RESTART)
    restart_priority = serializers.ChoiceField(choices=RestartPriority.choices, default=RestartPriority.RESTART)
    failures_to_tolerate = serializers.IntegerField(required=False, min_value=0)
    heartbeat_sr = serializers.CharField(required=False, allow_blank=True)


class ConflictSerializer(serializers.Serializer):
    detail = serializers.CharField()
    reasons = serializers.ListField(child=serializers.CharField())
