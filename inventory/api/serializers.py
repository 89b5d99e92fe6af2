"""REST representations of the inventory. Writes go through inventory.services (pools only).

XAPI objects show their ``name_label`` as ``name``; a pool's ``name`` is the one
the console was given (its name everywhere in the console), its XAPI name is
``xapi_name_label`` (and, as before, ``name_label``).
"""

from rest_framework import serializers

from inventory import services
from inventory.models import PBD, PIF, SR, VBD, VDI, VIF, VM, Host, Network, Pool


class _RefSerializer(serializers.ModelSerializer):
    """How one object points at another: enough to show it and to follow it."""

    name = serializers.CharField(source="name_label", read_only=True)

    class Meta:
        fields = ["id", "uuid", "name"]
        read_only_fields = fields


class HostRefSerializer(_RefSerializer):
    class Meta(_RefSerializer.Meta):
        model = Host


class SRRefSerializer(_RefSerializer):
    class Meta(_RefSerializer.Meta):
        model = SR
        fields = [*_RefSerializer.Meta.fields, "shared"]
        read_only_fields = fields


class NetworkRefSerializer(_RefSerializer):
    class Meta(_RefSerializer.Meta):
        model = Network


# --- pools ---------------------------------------------------------------------------------------


class PoolSerializer(serializers.ModelSerializer):
    """A pool: how to reach it (writable; the password only goes in) and what the watcher saw."""

    password = serializers.CharField(
        write_only=True, style={"input_type": "password"}, trim_whitespace=False, help_text="Never returned"
    )
    host_count = serializers.IntegerField(read_only=True, help_text="Hosts of the pool")
    vm_count = serializers.IntegerField(
        read_only=True, help_text="VMs of the pool, without templates, control domains and snapshots"
    )
    # A URLField would be documented as a URI, which the empty value (no master found yet) is not.
    master_url = serializers.CharField(read_only=True, help_text="Where the master was last found (empty until then)")
    xapi_name_label = serializers.CharField(
        source="name_label", read_only=True,
        help_text="The pool's own name in XAPI (Pool.name_label); the console calls the pool by name",
    )

    class Meta:
        model = Pool
        fields = [
            "id",
            "name",
            "url",
            "username",
            "password",
            "verify_tls",
            "uuid",
            "name_label",
            "xapi_name_label",
            "master_url",
            "connection_state",
            "last_error",
            "last_event_at",
            "last_sync_at",
            "created_at",
            "removing_since",
            "ha_enabled",
            "ha_host_failures_to_tolerate",
            "ha_plan_exists_for",
            "ha_overcommitted",
            "ha_allow_overcommit",
            "host_count",
            "vm_count",
        ]
        read_only_fields = [
            "uuid",
            "name_label",
            "master_url",
            "connection_state",
            "last_error",
            "last_event_at",
            "last_sync_at",
            "created_at",
            "removing_since",
            "ha_enabled",
            "ha_host_failures_to_tolerate",
            "ha_plan_exists_for",
            "ha_overcommitted",
            "ha_allow_overcommit",
        ]
        extra_kwargs = {"removing_since": {"help_text": "Set while the pool is being removed (null otherwise): "
                                                        "it is listed until a worker has deleted it"}}

    def create(self, validated_data: dict) -> Pool:
        # The service tests the connection first and raises ValidationError (→ 400) when it fails.
        return services.pool_create(**validated_data)

    def update(self, instance: Pool, validated_data: dict) -> Pool:
        return services.pool_update(pool=instance, **validated_data)


class PoolUpdateSerializer(PoolSerializer):
    """As PoolSerializer, but the stored password is kept when none is sent."""

    password = serializers.CharField(
        write_only=True,
        required=False,
        style={"input_type": "password"},
        trim_whitespace=False,
        help_text="Never returned; leave out to keep the stored one",
    )


# --- hosts ---------------------------------------------------------------------------------------


class PIFSerializer(serializers.ModelSerializer):
    network = NetworkRefSerializer(read_only=True)

    class Meta:
        model = PIF
        fields = ["uuid", "device", "mac", "ip", "management", "currently_attached", "carrier", "network"]
        read_only_fields = fields


class HostPBDSerializer(serializers.ModelSerializer):
    sr = SRRefSerializer(read_only=True)

    class Meta:
        model = PBD
        fields = ["uuid", "currently_attached", "sr"]
        read_only_fields = fields


class HostSerializer(serializers.ModelSerializer):
    name = serializers.CharField(source="name_label", read_only=True)

    class Meta:
        model = Host
        fields = [
            "id",
            "uuid",
            "name",
            "name_description",
            "pool",
            "address",
            "hostname",
            "enabled",
            "live",
            "is_master",
            "memory_total",
            "memory_free",
            "cpu_count",
            "am_url",
            "am_peer",
        ]
        read_only_fields = fields


class HostDetailSerializer(HostSerializer):
    pifs = PIFSerializer(many=True, read_only=True)
    pbds = HostPBDSerializer(many=True, read_only=True)

    class Meta(HostSerializer.Meta):
        fields = [*HostSerializer.Meta.fields, "pifs", "pbds"]
        read_only_fields = fields


# --- VMs -----------------------------------------------------------------------------------------


class VDISerializer(serializers.ModelSerializer):
    name = serializers.CharField(source="name_label", read_only=True)
    sr = SRRefSerializer(read_only=True)

    class Meta:
        model = VDI
        fields = ["uuid", "name", "virtual_size", "physical_utilisation", "type", "sharable", "read_only", "sr"]
        read_only_fields = fields


class DiskSerializer(serializers.ModelSerializer):
    """A VBD and the VDI behind it (null for an empty CD drive)."""

    vdi = VDISerializer(read_only=True, allow_null=True)

    class Meta:
        model = VBD
        fields = ["uuid", "device", "userdevice", "type", "mode", "bootable", "currently_attached", "vdi"]
        read_only_fields = fields


class NICSerializer(serializers.ModelSerializer):
    """A VIF and its network."""

    network = NetworkRefSerializer(read_only=True, allow_null=True)

    class Meta:
        model = VIF
        fields = ["uuid", "device", "mac", "currently_attached", "network"]
        read_only_fields = fields


class VMSerializer(serializers.ModelSerializer):
    name = serializers.CharField(source="name_label", read_only=True)
    host = HostRefSerializer(source="resident_on", read_only=True, allow_null=True, help_text="Where it runs")

    class Meta:
        model = VM
        fields = [
            "id",
            "uuid",
            "name",
            "name_description",
            "pool",
            "power_state",
            "host",
            "memory_static_max",
            "memory_dynamic_max",
            "vcpus_max",
            "is_a_template",
            "is_control_domain",
            "is_a_snapshot",
            "ha_restart_priority",
            "updated_at",
        ]
        read_only_fields = fields


class VMDetailSerializer(VMSerializer):
    affinity = HostRefSerializer(read_only=True, allow_null=True, help_text="The host it prefers to start on")
    disks = DiskSerializer(source="vbds", many=True, read_only=True)
    nics = NICSerializer(source="vifs", many=True, read_only=True)

    class Meta(VMSerializer.Meta):
        fields = [
            *VMSerializer.Meta.fields,
            "affinity",
            "order",
            "start_delay",
            "current_operations",
            "disks",
            "nics",
        ]
        read_only_fields = fields


# --- SRs and networks ----------------------------------------------------------------------------


class SRSerializer(serializers.ModelSerializer):
    name = serializers.CharField(source="name_label", read_only=True)

    class Meta:
        model = SR
        fields = [
            "id",
            "uuid",
            "name",
            "name_description",
            "pool",
            "type",
            "content_type",
            "shared",
            "physical_size",
            "physical_utilisation",
        ]
        read_only_fields = fields


class SRPBDSerializer(serializers.ModelSerializer):
    host = HostRefSerializer(read_only=True, allow_null=True)

    class Meta:
        model = PBD
        fields = ["uuid", "currently_attached", "host"]
        read_only_fields = fields


class SRDetailSerializer(SRSerializer):
    pbds = SRPBDSerializer(many=True, read_only=True)

    class Meta(SRSerializer.Meta):
        fields = [*SRSerializer.Meta.fields, "pbds"]
        read_only_fields = fields


class NetworkSerializer(serializers.ModelSerializer):
    name = serializers.CharField(source="name_label", read_only=True)

    class Meta:
        model = Network
        fields = ["id", "uuid", "name", "name_description", "pool", "bridge", "mtu"]
        read_only_fields = fields


class NetworkPIFSerializer(serializers.ModelSerializer):
    host = HostRefSerializer(read_only=True, allow_null=True)

    class Meta:
        model = PIF
        fields = ["uuid", "device", "mac", "currently_attached", "carrier", "host"]
        read_only_fields = fields


class NetworkDetailSerializer(NetworkSerializer):
    pifs = NetworkPIFSerializer(many=True, read_only=True)

    class Meta(NetworkSerializer.Meta):
        fields = [*NetworkSerializer.Meta.fields, "pifs"]
        read_only_fields = fields


class VMPowerSerializer(serializers.Serializer):
    action = serializers.ChoiceField(choices=sorted(services.POWER_ACTIONS),
                                     help_text="start (from Halted) or shutdown (clean, from Running)")


class VMPowerQueuedSerializer(serializers.Serializer):
    vm = serializers.IntegerField()
    action = serializers.CharField()
    detail = serializers.CharField()
