"""The classes and fields the simulator serves, named and typed as in xapi.

Field names and types follow xapi-project/xen-api's ``ocaml/idl/datamodel*.ml``
(the subset a console needs, plus what clients commonly read).  Each class is a
small text table, one field a line::

    name  type  [rw]  [default]

Types: ``s`` string, ``i`` int (64-bit), ``f`` float, ``b`` bool, ``d``
datetime, ``e`` enum (a string on the wire), ``r:Class`` reference, ``sr:Class``
set of references, ``ss`` set of strings, ``si`` set of ints, ``m`` map
string->string, ``mf`` map string->float, ``mr:Class`` map string->ref.
``rw`` means the class has a generic ``set_<field>`` (and, for maps,
``add_to_``/``remove_from_``; for sets, ``add_``/``remove_``).

Every record of a class has every field of the table, so clients that index a
record by key never miss one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

NULL_REF = "OpaqueRef:NULL"


class DateTime(str):
    """An XML-RPC ``dateTime.iso8601`` value, kept as its text ``YYYYMMDDTHH:MM:SSZ``.

    A ``str`` subclass so that ``json.dumps`` writes it as a string (as xapi's
    JSON-RPC does) while the XML encoder can tell it from a plain string.
    """

    __slots__ = ()


EPOCH = DateTime("19700101T00:00:00Z")


def now() -> DateTime:
    """The current time, as xapi stamps it (UTC, to the second)."""
    return DateTime(time.strftime("%Y%m%dT%H:%M:%SZ", time.gmtime()))


class Record(dict):
    """One object's fields.  Never mutated once stored: a change stores a new Record.

    Because a stored Record never changes, the wire layer may cache its encoded
    form on the object itself (``xml``/``json`` slots) without ever serving a
    stale encoding; the next version of the object is a new Record with no cache.
    """

    __slots__ = ("xml", "json")


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # one of s i f b d e r sr ss si m mf mr
    writable: bool
    default: Any
    ref_class: str | None = None


@dataclass
class ClassDef:
    name: str
    fields: dict[str, Field]
    has_name_label: bool
    # Some xapi classes (pool, message, the *_metrics) have no get_by_name_label.
    by_name_label: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def defaults(self) -> dict[str, Any]:
        """Every field at its default, in table order (the order of every record's keys).

        The empty lists and dicts are shared by all records: like every set and
        map value in the store they are never changed in place (see ``Record``).
        """
        template = self.extra.get("template")
        if template is None:
            template = self.extra["template"] = {f.name: f.default for f in self.fields.values()}
        return template


_SCALAR_DEFAULTS: dict[str, Any] = {
    "s": "",
    "i": 0,
    "f": 0.0,
    "b": False,
    "d": EPOCH,
    "e": "",
    "r": NULL_REF,
}


def _parse_default(kind: str, text: str) -> Any:
    if kind == "i":
        return int(text)
    if kind == "f":
        return float(text)
    if kind == "b":
        return text == "true"
    if text == '""':
        return ""
    return text


def _table(text: str) -> dict[str, Field]:
    fields: dict[str, Field] = {}
    for line in text.strip().splitlines():
        parts = line.split()
        if not parts:
            continue
        name, kind = parts[0], parts[1]
        rest = parts[2:]
        writable = bool(rest) and rest[0] == "rw"
        if writable:
            rest = rest[1:]
        ref_class = None
        if ":" in kind:
            kind, ref_class = kind.split(":", 1)
        if kind in ("sr", "ss", "si"):
            default: Any = []
        elif kind in ("m", "mf", "mr"):
            default = {}
        else:
            default = _parse_default(kind, rest[0]) if rest else _SCALAR_DEFAULTS[kind]
        fields[name] = Field(name, kind, writable, default, ref_class)
    return fields


_OPS = """
allowed_operations ss
current_operations m
"""

CLASSES: dict[str, ClassDef] = {}


def _define(name: str, table: str, *, by_name_label: bool = False) -> None:
    fields = _table(table)
    CLASSES[name] = ClassDef(name, fields, "name_label" in fields, by_name_label)


_define(
    "pool",
    """
uuid s
name_label s rw
name_description s rw
master r:host
default_SR r:SR rw
suspend_image_SR r:SR rw
crash_dump_SR r:SR rw
other_config m rw
ha_enabled b
ha_configuration m
ha_statefiles ss
ha_host_failures_to_tolerate i
ha_plan_exists_for i
ha_allow_overcommit b
ha_overcommitted b
blobs mr:blob
tags ss rw
gui_config m rw
health_check_config m rw
wlb_url s
wlb_username s
wlb_enabled b rw
wlb_verify_cert b rw
redo_log_enabled b
redo_log_vdi r:VDI
vswitch_controller s
restrictions m
metadata_VDIs sr:VDI
ha_cluster_stack s xhad
"""
    + _OPS
    + """
guest_agent_config m
cpu_info m
policy_no_vendor_device b rw
live_patching_disabled b rw
igmp_snooping_enabled b
uefi_certificates s
is_psr_pending b rw
tls_verification_enabled b
repositories sr:Repository
client_certificate_auth_enabled b
client_certificate_auth_name s
repository_proxy_url s
repository_proxy_username s
repository_proxy_password r:secret
migration_compression b rw
coordinator_bias b rw
telemetry_uuid r:secret
telemetry_frequency e weekly
telemetry_next_collection d
last_update_sync d
update_sync_frequency e weekly
update_sync_day i
update_sync_enabled b
recommendations m
license_server m rw
ha_reboot_vm_on_internal_shutdown b
""",
)

_define(
    "host",
    """
uuid s
"""
    + _OPS
    + """
name_label s rw
name_description s rw
memory_overhead i
API_version_major i 2
API_version_minor i 21
API_version_vendor s XenSource
API_version_vendor_implementation m
enabled b true
software_version m
other_config m rw
capabilities ss
cpu_configuration m
sched_policy s credit
supported_bootloaders ss
resident_VMs sr:VM
logging m rw
PIFs sr:PIF
suspend_image_sr r:SR rw
crash_dump_sr r:SR rw
crashdumps sr:host_crashdump
patches sr:host_patch
updates sr:pool_update
PBDs sr:PBD
host_CPUs sr:host_cpu
cpu_info m
hostname s rw
address s
metrics r:host_metrics
license_params m
ha_statefiles ss
ha_network_peers ss
blobs mr:blob
tags ss rw
external_auth_type s
external_auth_service_name s
external_auth_configuration m
edition s xcp-ng
license_server m rw
bios_strings m
power_on_mode s
power_on_config m
local_cache_sr r:SR
chipset_info m
PCIs sr:PCI
PGPUs sr:PGPU
PUSBs sr:PUSB
ssl_legacy b
guest_VCPUs_params m rw
display e enabled
virtual_hardware_platform_versions si
control_domain r:VM
updates_requiring_reboot sr:pool_update
features sr:Feature
iscsi_iqn s
multipathing b
uefi_certificates s
certificates sr:Certificate
editions ss
pending_guidances ss
tls_verification_enabled b
last_software_update d
https_only b
latest_synced_updates_applied e unknown
numa_affinity_policy e default_policy
""",
    by_name_label=True,
)

_define(
    "host_metrics",
    """
uuid s
memory_total i
memory_free i
live b
last_updated d
other_config m rw
""",
)

_define(
    "VM",
    """
uuid s
"""
    + _OPS
    + """
name_label s rw
name_description s rw
power_state e Halted
user_version i rw 1
is_a_template b rw
is_default_template b
suspend_VDI r:VDI
resident_on r:host
scheduled_to_be_resident_on r:host
affinity r:host rw
memory_overhead i
memory_target i
memory_static_max i
memory_dynamic_max i
memory_dynamic_min i
memory_static_min i
VCPUs_params m rw
VCPUs_max i
VCPUs_at_startup i
actions_after_softreboot e soft_reboot
actions_after_shutdown e destroy
actions_after_reboot e restart
actions_after_crash e restart
consoles sr:console
VIFs sr:VIF
VBDs sr:VBD
VUSBs sr:VUSB
crash_dumps sr:crashdump
VTPMs sr:VTPM
PV_bootloader s rw
PV_kernel s rw
PV_ramdisk s rw
PV_args s rw
PV_bootloader_args s rw
PV_legacy_args s rw
HVM_boot_policy s rw
HVM_boot_params m rw
HVM_shadow_multiplier f 1.0
platform m rw
PCI_bus s
other_config m rw
domid i -1
domarch s
last_boot_CPU_flags m
is_control_domain b
metrics r:VM_metrics
guest_metrics r:VM_guest_metrics
last_booted_record s
recommendations s rw
xenstore_data m rw
ha_always_run b
ha_restart_priority s
is_a_snapshot b
snapshot_of r:VM
snapshots sr:VM
snapshot_time d
transportable_snapshot_id s
blobs mr:blob
tags ss rw
blocked_operations m rw
snapshot_info m
snapshot_metadata s
parent r:VM
children sr:VM
bios_strings m
protection_policy r:VMPP
is_snapshot_from_vmpp b
snapshot_schedule r:VMSS
is_vmss_snapshot b
appliance r:VM_appliance
start_delay i
shutdown_delay i rw
order i
VGPUs sr:VGPU
attached_PCIs sr:PCI
suspend_SR r:SR rw
version i
generation_id s 0:0
hardware_platform_version i rw
has_vendor_device b true
requires_reboot b
reference_label s
domain_type e hvm
NVRAM m
pending_guidances ss
groups sr:VM_group
""",
    by_name_label=True,
)

_define(
    "VM_metrics",
    """
uuid s
memory_actual i
VCPUs_number i
VCPUs_utilisation mf
VCPUs_CPU m
VCPUs_params m
VCPUs_flags m
state ss
start_time d
install_time d
last_updated d
other_config m rw
hvm b
nested_virt b
nomigrate b
current_domain_type e unspecified
""",
)

_define(
    "VBD",
    """
uuid s
"""
    + _OPS
    + """
VM r:VM
VDI r:VDI
device s
userdevice s rw
bootable b rw
mode e RW
type e Disk
unpluggable b rw true
storage_lock b
empty b
other_config m rw
currently_attached b
status_code i
status_detail s
runtime_properties m
qos_algorithm_type s rw
qos_algorithm_params m rw
qos_supported_algorithms ss
metrics r:VBD_metrics
""",
)

_define(
    "VDI",
    """
uuid s
name_label s rw
name_description s rw
"""
    + _OPS
    + """
SR r:SR
VBDs sr:VBD
crash_dumps sr:crashdump
virtual_size i
physical_utilisation i
type e user
sharable b
read_only b
other_config m rw
storage_lock b
location s
managed b true
missing b
parent r:VDI
xenstore_data m
sm_config m
is_a_snapshot b
snapshot_of r:VDI
snapshots sr:VDI
snapshot_time d
tags ss rw
allow_caching b
on_boot e persist
metadata_of_pool r:pool
metadata_latest b
is_tools_iso b
cbt_enabled b
""",
    by_name_label=True,
)

_define(
    "SR",
    """
uuid s
name_label s rw
name_description s rw
"""
    + _OPS
    + """
VDIs sr:VDI
PBDs sr:PBD
virtual_allocation i
physical_utilisation i
physical_size i
type s
content_type s
shared b
other_config m rw
tags ss rw
sm_config m
blobs mr:blob
local_cache_enabled b
introduced_by r:DR_task
clustered b
is_tools_sr b
""",
    by_name_label=True,
)

_define(
    "PBD",
    """
uuid s
host r:host
SR r:SR
device_config m
currently_attached b
other_config m rw
""",
)

_define(
    "VIF",
    """
uuid s
"""
    + _OPS
    + """
device s
network r:network
VM r:VM
MAC s
MTU i 1500
other_config m rw
currently_attached b
status_code i
status_detail s
runtime_properties m
qos_algorithm_type s rw
qos_algorithm_params m rw
qos_supported_algorithms ss
metrics r:VIF_metrics
MAC_autogenerated b
locking_mode e network_default
ipv4_allowed ss
ipv6_allowed ss
ipv4_configuration_mode e None
ipv4_addresses ss
ipv4_gateway s
ipv6_configuration_mode e None
ipv6_addresses ss
ipv6_gateway s
""",
)

_define(
    "network",
    """
uuid s
name_label s rw
name_description s rw
"""
    + _OPS
    + """
VIFs sr:VIF
PIFs sr:PIF
MTU i rw 1500
other_config m rw
bridge s
managed b true
blobs mr:blob
tags ss rw
default_locking_mode e unlocked
assigned_ips m
purpose ss
""",
    by_name_label=True,
)

_define(
    "PIF",
    """
uuid s
device s
network r:network
host r:host
MAC s
MTU i 1500
VLAN i -1
metrics r:PIF_metrics
physical b true
currently_attached b true
ip_configuration_mode e None
IP s
netmask s
gateway s
DNS s
bond_slave_of r:Bond
bond_master_of sr:Bond
VLAN_master_of r:VLAN
VLAN_slave_of sr:VLAN
management b
other_config m rw
disallow_unplug b rw
tunnel_access_PIF_of sr:tunnel
tunnel_transport_PIF_of sr:tunnel
ipv6_configuration_mode e None
IPv6 ss
ipv6_gateway s
primary_address_type e IPv4
managed b true
properties m
capabilities ss
igmp_snooping_status e unknown
sriov_physical_PIF_of sr:network_sriov
sriov_logical_PIF_of sr:network_sriov
PCI r:PCI
""",
)

_define(
    "PIF_metrics",
    """
uuid s
io_read_kbs f
io_write_kbs f
carrier b true
vendor_id s
vendor_name s
device_id s
device_name s
speed i
duplex b
pci_bus_path s
last_updated d
other_config m rw
""",
)

_define(
    "task",
    """
uuid s
name_label s
name_description s
"""
    + _OPS
    + """
created d
finished d
status e pending
resident_on r:host
progress f
type s
result s
error_info ss
other_config m rw
subtask_of r:task
subtasks sr:task
backtrace s ()
""",
    by_name_label=True,
)

_define(
    "message",
    """
uuid s
name s
priority i
cls e VM
obj_uuid s
timestamp d
body s
""",
)

# Wire names of the classes, for Class_method names and error parameters.
CLASS_NAMES: tuple[str, ...] = tuple(CLASSES)
# Longest first, so "VM_metrics_get_record" is split at "VM_metrics", not "VM".
CLASS_NAMES_LONGEST_FIRST: tuple[str, ...] = tuple(sorted(CLASSES, key=len, reverse=True))
CLASS_BY_LOWER: dict[str, str] = {c.lower(): c for c in CLASSES}

# Message priorities and class names, as xapi's api_messages.ml has them.
MESSAGE_PRIORITIES: dict[str, int] = {
    "HA_HOST_FAILED": 3,
    "HA_HOST_WAS_FENCED": 4,
    "HA_POOL_OVERCOMMITTED": 3,
    "HA_POOL_DROP_IN_PLAN_EXISTS_FOR": 3,
    "HA_PROTECTED_VM_RESTART_FAILED": 2,
    "VM_STARTED": 5,
    "VM_SHUTDOWN": 5,
    "VM_REBOOTED": 5,
    "VM_MIGRATED": 5,
    "VM_SNAPSHOTTED": 5,
    "VM_SUSPENDED": 5,
    "VM_RESUMED": 5,
    "VM_PAUSED": 5,
    "VM_UNPAUSED": 5,
    "VM_CRASHED": 2,
    "VM_CLONED": 5,
    "PBD_PLUG_FAILED_ON_SERVER_START": 3,
}
