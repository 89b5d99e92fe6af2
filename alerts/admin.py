from django.contrib import admin

from .models import Alert, Delivery, Recipient


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    list_display = ["condition", "object_key", "state", "pool_name", "host_name", "vm_name", "raised_at",
                    "cleared_at", "occurrences"]
    list_filter = ["condition", "state"]


@admin.register(Recipient)
class RecipientAdmin(admin.ModelAdmin):
    list_display = ["email", "name", "enabled"]


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    list_display = ["email", "kind", "state", "attempts", "created_at", "sent_at"]
    list_filter = ["state", "kind"]
