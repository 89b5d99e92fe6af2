"""The Django admin of the inventory: pools are added, edited and removed here (connection tested first; a
removal is done by a worker, in bulk); mirrored objects are read-only, since the watcher is their only writer."""
from django.contrib import admin, messages
from django.http import HttpResponseRedirect
from django.urls import reverse

from eac.errors import client_ip

from .forms import PoolForm
from .models import PBD, PIF, SR, VBD, VDI, VIF, VM, Host, Network, Pool
from .services import pool_remove_request


@admin.register(Pool)
class PoolAdmin(admin.ModelAdmin):
    form = PoolForm
    list_display = ["name", "name_label", "url", "master_url", "connection_state", "last_event_at", "last_sync_at",
                    "removing_since"]
    list_filter = ["connection_state"]
    search_fields = ["name", "name_label", "uuid", "url"]
    readonly_fields = [
        "uuid", "name_label", "master_url", "connection_state", "last_error", "last_event_at", "last_sync_at",
        "ha_enabled", "ha_host_failures_to_tolerate", "ha_plan_exists_for", "ha_overcommitted", "ha_allow_overcommit",
        "created_at",
    ]
    fieldsets = [
        (None, {"fields": ["name", "url", "username", "password", "verify_tls"]}),
        ("Status", {"fields": ["connection_state", "last_error", "last_event_at", "last_sync_at", "master_url"]}),
        ("From XAPI", {"fields": ["uuid", "name_label", "ha_enabled", "ha_host_failures_to_tolerate",
                                  "ha_plan_exists_for", "ha_overcommitted", "ha_allow_overcommit", "created_at"]}),
    ]

    def get_fieldsets(self, request, obj=None):
        if obj is None:  # adding: only what the administrator types
            return [(None, {"fields": ["name", "url", "username", "password", "verify_tls"]})]
        return self.fieldsets

    def save_form(self, request, form, change):
        # The services write the pool, reusing the connection test form.clean() did.
        return form.save()

    def save_model(self, request, obj, form, change):
        pass  # saved by save_form, through the services

    def save_related(self, request, form, formsets, change):
        pass  # a pool has no many-to-many or inlines

    def has_change_permission(self, request, obj=None):
        # A pool being removed refuses changes (the service says so too): the admin shows it read-only.
        if obj is not None and obj.removing_since is not None:
            return False
        return super().has_change_permission(request, obj)

    def get_deleted_objects(self, objs, request):
        # Django's confirmation page lists every object the Collector would reach (every VM, disk and NIC) and asks
        # for the right to delete each kind; the removal is done in bulk by a worker instead: count them.
        pools = list(objs)
        counts = {}
        for model in (Host, VM, SR, Network, VDI, VBD, VIF, PBD, PIF):
            n = model.objects.filter(pool__in=pools).count()
            if n:
                counts[str(model._meta.verbose_name_plural)] = n
        listed = [f"{pool} (removed in the background by a worker, with everything mirrored from it)" for pool in pools]
        return listed, {"pools": len(pools), **counts}, set(), []

    def delete_model(self, request, obj):
        pool_remove_request(pool=obj, requested_by=request.user, via="ui", remote_addr=client_ip(request))

    def delete_queryset(self, request, queryset):
        for pool in queryset:
            self.delete_model(request, pool)

    def response_delete(self, request, obj_display, obj_id):
        self.message_user(request, f"The pool “{obj_display}” is being removed: a worker deletes it, and everything "
                                   "mirrored from it, in a moment.", messages.SUCCESS)
        return HttpResponseRedirect(reverse("admin:inventory_pool_changelist"))


class MirroredAdmin(admin.ModelAdmin):
    """Read-only: these rows mirror XAPI and are rewritten by the watcher."""

    list_select_related = ["pool"]
    search_fields = ["name_label", "uuid"]
    list_filter = ["pool"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Host)
class HostAdmin(MirroredAdmin):
    list_display = ["name_label", "pool", "address", "is_master", "live", "enabled", "memory_free", "memory_total"]
    list_filter = ["pool", "live", "is_master"]


@admin.register(VM)
class VMAdmin(MirroredAdmin):
    list_display = ["name_label", "pool", "power_state", "resident_on", "is_a_template", "is_control_domain",
                    "is_a_snapshot"]
    list_select_related = ["pool", "resident_on"]
    list_filter = ["pool", "power_state", "is_a_template", "is_control_domain", "is_a_snapshot"]


@admin.register(SR)
class SRAdmin(MirroredAdmin):
    list_display = ["name_label", "pool", "type", "shared", "physical_size", "physical_utilisation"]


@admin.register(Network)
class NetworkAdmin(MirroredAdmin):
    list_display = ["name_label", "pool", "bridge", "mtu"]


for model, columns in [
    (PBD, ["uuid", "pool", "host", "sr", "currently_attached"]),
    (PIF, ["device", "pool", "host", "network", "ip", "management", "carrier"]),
    (VDI, ["name_label", "pool", "sr", "virtual_size", "type"]),
    (VBD, ["uuid", "pool", "vm", "vdi", "userdevice", "type", "currently_attached"]),
    (VIF, ["device", "pool", "vm", "network", "mac", "currently_attached"]),
]:
    admin.site.register(model, type(f"{model.__name__}Admin", (MirroredAdmin,), {"list_display": columns}))
