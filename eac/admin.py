from django.contrib import admin

from .models import AuditEntry


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    list_display = ["at", "username", "action", "object_repr", "remote_addr", "via"]
    list_filter = ["action", "via"]
    search_fields = ["username", "object_repr"]

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # the audit log is written by the console only
