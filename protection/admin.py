from django.contrib import admin

from .models import FailoverEvent, Protection, WorkflowRun, WorkflowStep


@admin.register(Protection)
class ProtectionAdmin(admin.ModelAdmin):
    list_display = ["vm", "pool", "level", "status", "restart_priority", "order", "start_delay", "updated_at"]
    list_filter = ["level", "status", "pool"]
    search_fields = ["vm__name_label", "vm__uuid"]
    raw_id_fields = ["vm", "observed_host", "created_by"]


class WorkflowStepInline(admin.TabularInline):
    model = WorkflowStep
    extra = 0
    readonly_fields = ["position", "name", "label", "state", "progress", "message", "attempts", "error_code",
                       "started_at", "finished_at"]


@admin.register(WorkflowRun)
class WorkflowRunAdmin(admin.ModelAdmin):
    list_display = ["pk", "kind", "vm_name", "pool", "state", "progress", "claims", "created_at"]
    list_filter = ["kind", "state"]
    inlines = [WorkflowStepInline]
    raw_id_fields = ["vm", "protection", "created_by"]


@admin.register(FailoverEvent)
class FailoverEventAdmin(admin.ModelAdmin):
    list_display = ["vm_name", "from_host_name", "to_host_name", "state", "detected_at", "downtime_seconds"]
    list_filter = ["state", "pool"]
