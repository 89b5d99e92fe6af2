"""What the console knows of each pool, mirrored from XAPI.

Every XAPI object row is keyed by (pool, uuid) and keeps its opaque ref, which
is how XAPI records point at each other. The watcher (``inventory.sync``, run by
``manage.py watch_pools``) is the only writer of these rows; Pool's own
configuration is written by ``services.pool_create`` / ``pool_update``.
"""
from __future__ import annotations

from django.db import models

from .choices import ConnectionState, PowerState
from .fields import EncryptedTextField


class Pool(models.Model):
    """A XAPI pool the console watches: how to reach it, and how that is going."""

    name = models.CharField(max_length=200, unique=True)
    url = models.URLField(help_text="URL of the pool master, e.g. https://xcp-master.example.org")
    username = models.CharField(max_length=200)
    password = EncryptedTextField()
    verify_tls = models.BooleanField(default=True)

    # Filled in from XAPI once connected.
    uuid = models.CharField(max_length=64, blank=True, db_index=True)
    ref = models.CharField(max_length=80, blank=True)
    name_label = models.CharField(max_length=255, blank=True)
    master_url = models.URLField(blank=True, help_text="Where the master was last found")
    ha_enabled = models.BooleanField(default=False)
    ha_host_failures_to_tolerate = models.IntegerField(default=0)
    ha_plan_exists_for = models.IntegerField(default=0)
    ha_overcommitted = models.BooleanField(default=False)
    ha_allow_overcommit = models.BooleanField(default=False)
    ha_configuration = models.JSONField(default=dict, blank=True)

    connection_state = models.CharField(
        max_length=20, choices=ConnectionState.choices, default=ConnectionState.NEW
    )
    # Which watch_pools process keeps this pool in sync, and since when (written by that process).
    watcher = models.CharField(max_length=200, blank=True)
    watched_since = models.DateTimeField(null=True, blank=True)
    # Set when an administrator removes the pool: its rows are deleted in bulk in the background.
    removing_since = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    last_event_at = models.DateTimeField(null=True, blank=True)
    last_sync_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # When the console last saved it (a rename, a new connection): an open page rendered before it resyncs.
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class XapiObject(models.Model):
    """Fields every mirrored XAPI object has."""

    pool = models.ForeignKey(Pool, on_delete=models.CASCADE, related_name="+")
    uuid = models.CharField(max_length=64)
    ref = models.CharField(max_length=80)
    name_label = models.CharField(max_length=255, blank=True)

    class Meta:
        abstract = True
        ordering = ["name_label"]

    def __str__(self) -> str:
        return self.name_label or self.uuid


def _keys(model: str) -> list:
    return [
        models.UniqueConstraint(fields=["pool", "uuid"], name=f"{model}_pool_uuid"),
        models.UniqueConstraint(fields=["pool", "ref"], name=f"{model}_pool_ref"),
    ]


class Host(XapiObject):
    pool = models.ForeignKey(Pool, on_delete=models.CASCADE, related_name="hosts")
    name_description = models.TextField(blank=True)
    address = models.CharField(max_length=255, blank=True)
    hostname = models.CharField(max_length=255, blank=True)
    enabled = models.BooleanField(default=True)
    live = models.BooleanField(default=False)
    # host_metrics.last_updated: for a host no longer live, when XAPI last heard from it (when it died).
    last_heard_at = models.DateTimeField(null=True, blank=True)
    is_master = models.BooleanField(default=False)
    memory_total = models.BigIntegerField(default=0)
    memory_free = models.BigIntegerField(default=0)
    cpu_count = models.IntegerField(default=0)
    metrics_ref = models.CharField(max_length=80, blank=True, db_index=True)
    # The host's Availability Manager, from its other_config (eac_am_url / eac_am_peer, docs/level2.md):
    # where its management API listens ("" = no AM), and the uuid of the host whose AM is its peer.
    am_url = models.CharField(max_length=255, blank=True)
    am_peer = models.CharField(max_length=64, blank=True)

    class Meta(XapiObject.Meta):
        constraints = _keys("host")


class SR(XapiObject):
    pool = models.ForeignKey(Pool, on_delete=models.CASCADE, related_name="srs")
    name_description = models.TextField(blank=True)
    type = models.CharField(max_length=64, blank=True)
    content_type = models.CharField(max_length=64, blank=True)
    shared = models.BooleanField(default=False)
    physical_size = models.BigIntegerField(default=0)
    physical_utilisation = models.BigIntegerField(default=0)

    class Meta(XapiObject.Meta):
        constraints = _keys("sr")
        verbose_name = "SR"


class PBD(XapiObject):
    """The attachment of an SR to a host. XAPI PBDs have no name; name_label stays empty."""

    pool = models.ForeignKey(Pool, on_delete=models.CASCADE, related_name="pbds")
    host = models.ForeignKey(Host, null=True, on_delete=models.SET_NULL, related_name="pbds")
    sr = models.ForeignKey(SR, null=True, on_delete=models.SET_NULL, related_name="pbds")
    currently_attached = models.BooleanField(default=False)

    class Meta(XapiObject.Meta):
        constraints = _keys("pbd")
        verbose_name = "PBD"


class Network(XapiObject):
    pool = models.ForeignKey(Pool, on_delete=models.CASCADE, related_name="networks")
    name_description = models.TextField(blank=True)
    bridge = models.CharField(max_length=64, blank=True)
    mtu = models.IntegerField(default=1500)

    class Meta(XapiObject.Meta):
        constraints = _keys("network")


class PIF(XapiObject):
    pool = models.ForeignKey(Pool, on_delete=models.CASCADE, related_name="pifs")
    host = models.ForeignKey(Host, null=True, on_delete=models.SET_NULL, related_name="pifs")
    network = models.ForeignKey(Network, null=True, on_delete=models.SET_NULL, related_name="pifs")
    device = models.CharField(max_length=64, blank=True)
    mac = models.CharField(max_length=32, blank=True)
    ip = models.CharField(max_length=64, blank=True)
    management = models.BooleanField(default=False)
    currently_attached = models.BooleanField(default=False)
    carrier = models.BooleanField(default=False)
    metrics_ref = models.CharField(max_length=80, blank=True, db_index=True)

    class Meta(XapiObject.Meta):
        constraints = _keys("pif")
        ordering = ["device"]
        verbose_name = "PIF"


class VMQuerySet(models.QuerySet):
    def ordinary(self) -> VMQuerySet:
        """VMs as an administrator thinks of them: not templates, control domains (dom0) or snapshots,
        which XAPI also calls VMs and the inventory keeps as rows."""
        return self.filter(is_a_template=False, is_control_domain=False, is_a_snapshot=False)


class VM(XapiObject):
    pool = models.ForeignKey(Pool, on_delete=models.CASCADE, related_name="vms")
    name_description = models.TextField(blank=True)
    power_state = models.CharField(max_length=16, choices=PowerState.choices, default=PowerState.HALTED)
    resident_on = models.ForeignKey(Host, null=True, blank=True, on_delete=models.SET_NULL, related_name="resident_vms")
    affinity = models.ForeignKey(Host, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    memory_static_max = models.BigIntegerField(default=0)
    memory_dynamic_min = models.BigIntegerField(default=0)
    memory_dynamic_max = models.BigIntegerField(default=0)
    # What XAPI reserves on top of memory_static_max (shadow memory, etc.): HA plans count both.
    memory_overhead = models.BigIntegerField(default=0)
    vcpus_max = models.IntegerField(default=0)
    is_a_template = models.BooleanField(default=False)
    is_control_domain = models.BooleanField(default=False)
    is_a_snapshot = models.BooleanField(default=False)
    ha_restart_priority = models.CharField(max_length=16, blank=True)
    order = models.IntegerField(default=0)
    start_delay = models.IntegerField(default=0)
    current_operations = models.JSONField(default=dict, blank=True)
    metrics_ref = models.CharField(max_length=80, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = VMQuerySet.as_manager()

    class Meta(XapiObject.Meta):
        constraints = _keys("vm")
        indexes = [models.Index(fields=["pool", "power_state"]), models.Index(fields=["name_label"])]
        verbose_name = "VM"

    @property
    def is_ordinary(self) -> bool:
        """The same rule as ``VM.objects.ordinary()``, for one VM in hand."""
        return not (self.is_a_template or self.is_control_domain or self.is_a_snapshot)


class VDI(XapiObject):
    pool = models.ForeignKey(Pool, on_delete=models.CASCADE, related_name="vdis")
    name_description = models.TextField(blank=True)
    sr = models.ForeignKey(SR, null=True, on_delete=models.SET_NULL, related_name="vdis")
    virtual_size = models.BigIntegerField(default=0)
    physical_utilisation = models.BigIntegerField(default=0)
    type = models.CharField(max_length=32, blank=True)
    sharable = models.BooleanField(default=False)
    read_only = models.BooleanField(default=False)

    class Meta(XapiObject.Meta):
        constraints = _keys("vdi")
        verbose_name = "VDI"


class VBD(XapiObject):
    """A VM's disk (or CD) slot. Name is empty, as in XAPI."""

    pool = models.ForeignKey(Pool, on_delete=models.CASCADE, related_name="vbds")
    vm = models.ForeignKey(VM, null=True, on_delete=models.SET_NULL, related_name="vbds")
    vdi = models.ForeignKey(VDI, null=True, blank=True, on_delete=models.SET_NULL, related_name="vbds")
    device = models.CharField(max_length=32, blank=True)
    userdevice = models.CharField(max_length=16, blank=True)
    type = models.CharField(max_length=16, blank=True)
    mode = models.CharField(max_length=4, blank=True)
    bootable = models.BooleanField(default=False)
    currently_attached = models.BooleanField(default=False)

    class Meta(XapiObject.Meta):
        constraints = _keys("vbd")
        ordering = ["userdevice"]
        verbose_name = "VBD"


class VIF(XapiObject):
    pool = models.ForeignKey(Pool, on_delete=models.CASCADE, related_name="vifs")
    vm = models.ForeignKey(VM, null=True, on_delete=models.SET_NULL, related_name="vifs")
    network = models.ForeignKey(Network, null=True, on_delete=models.SET_NULL, related_name="vifs")
    device = models.CharField(max_length=16, blank=True)
    mac = models.CharField(max_length=32, blank=True)
    currently_attached = models.BooleanField(default=False)

    class Meta(XapiObject.Meta):
        constraints = _keys("vif")
        ordering = ["device"]
        verbose_name = "VIF"
