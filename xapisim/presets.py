"""Pools to serve: the demo pool and generated pools of any size.

Everything is drawn from ``random.Random(seed)`` (refs and uuids from the
store's seeded generator), so the same seed always gives the same objects:
a restarted simulator looks like the same pool to a client.

Objects are built with their final cross-references in one go (no
append-per-object on shared lists), so 1,000 hosts and 10,000 VMs build in a
few seconds.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .datamodel import NULL_REF, DateTime, Record, now
from .vmstate import allowed_ops, need, vm_overhead

if TYPE_CHECKING:
    from .engine import Engine

GiB = 1 << 30
MiB = 1 << 20


def host_address(base: str, index: int) -> str:
    """Address of host ``index`` (0-based): ``base`` + index, skipping .0 and .255."""
    start = int(ipaddress.IPv4Address(base))
    addr = start
    for _ in range(index + 1):
        while addr & 0xFF in (0, 255):
            addr += 1
        current = addr
        addr += 1
    return str(ipaddress.IPv4Address(current))


SOFTWARE_VERSION = {
    "product_version": "8.3.0",
    "product_version_text": "8.3",
    "product_version_text_short": "8.3",
    "platform_name": "XCP",
    "platform_version": "3.4.0",
    "product_brand": "XCP-ng",
    "build_number": "cloud",
    "git_id": "0",
    "hostname": "localhost",
    "date": "2024-10-02",
    "dbv": "0.0.1",
    "xapi": "24.19",
    "xapi_build": "24.19.2",
    "xen": "4.17.5-3",
    "linux": "4.19.0+1",
    "xencenter_min": "2.21",
    "xencenter_max": "2.21",
    "network_backend": "openvswitch",
    "db_schema": "5.780",
}

CPU_INFO = {
    "cpu_count": "32",
    "socket_count": "2",
    "threads_per_core": "2",
    "vendor": "GenuineIntel",
    "speed": "2394.374",
    "modelname": "Intel(R) Xeon(R) Silver 4214R CPU @ 2.40GHz",
    "family": "6",
    "model": "85",
    "stepping": "7",
    "flags": "fpu de tsc msr pae mce cx8 apic sep mca cmov pat clflush acpi mmx fxsr sse sse2 ht syscall nx lm",
    "features_pv": "1fc9cbf5-f6f83203-2991cbf5-00000123-00000007-d19ffffb-00000008-00000000",
    "features_hvm": "1fcbfbff-f7fa3223-2d93fbff-00000523-0000000f-d19ffffb-00000008-00000000",
}


@dataclass
class _Host:
    ref: str
    name: str
    metrics: str
    free: int
    pifs: list[str] = field(default_factory=list)
    pbds: list[str] = field(default_factory=list)
    resident: list[str] = field(default_factory=list)
    local_sr: str = NULL_REF


class Builder:
    """Creates the objects of a pool with consistent cross-references."""

    def __init__(self, engine: Engine, seed: int, bind: str) -> None:
        self.engine = engine
        self.s = engine.store
        self.rng = random.Random(seed * 7919 + 17)
        self.bind = bind
        self.hosts: list[_Host] = []
        self.sr_vdis: dict[str, list[str]] = {}
        self.sr_pbds: dict[str, list[str]] = {}
        self.sr_used: dict[str, int] = {}
        self.net_pifs: dict[str, list[str]] = {}
        self.net_vifs: dict[str, list[str]] = {}
        self.networks: list[str] = []
        self.shared_sr = NULL_REF
        self.stamp = now()

    def mac(self) -> str:
        return "02:" + ":".join(f"{self.rng.randrange(256):02x}" for _ in range(5))

    # -- infrastructure ---------------------------------------------------

    def pool(self, name: str) -> str:
        return self.s.create(
            "pool",
            {
                "name_label": name,
                "other_config": {"memory-ratio-hvm": "0.25", "memory-ratio-pv": "0.25"},
                "restrictions": {"restrict_ha": "false", "restrict_pooling": "false"},
                "cpu_info": {"cpu_count": "32", "socket_count": "2", "vendor": "GenuineIntel"},
                "ha_cluster_stack": "xhad",
            },
        )

    def host(self, name: str, memory_total: int) -> _Host:
        i = len(self.hosts)
        address = host_address(self.bind, i)
        overhead = 512 * MiB + memory_total // 256
        metrics = self.s.create(
            "host_metrics",
            {"memory_total": memory_total, "memory_free": memory_total, "live": True, "last_updated": self.stamp},
        )
        ref = self.s.new_ref()
        host = _Host(ref, name, metrics, memory_total - overhead)
        self.hosts.append(host)
        self._pending_hosts[ref] = {
            "name_label": name,
            "name_description": "Default install",
            "hostname": name,
            "address": address,
            "memory_overhead": overhead,
            "metrics": metrics,
            "software_version": {**SOFTWARE_VERSION, "hostname": name},
            "cpu_info": dict(CPU_INFO),
            "capabilities": ["xen-3.0-x86_64", "hvm-3.0-x86_32", "hvm-3.0-x86_32p", "hvm-3.0-x86_64"],
            "cpu_configuration": {},
            "supported_bootloaders": ["pygrub", "eliloader"],
            "license_params": {"sku_type": "free", "expiry": "20380119T03:14:07Z", "restrict_ha": "false"},
            "edition": "xcp-ng",
            "editions": ["xcp-ng"],
            "bios_strings": {
                "bios-vendor": "Dell Inc.",
                "system-manufacturer": "Dell Inc.",
                "system-product-name": "PowerEdge R640",
                "system-serial-number": f"SN{1000 + i}",
            },
            "chipset_info": {"iommu": "true"},
            "iscsi_iqn": f"iqn.2024-01.com.example:{name}",
            "virtual_hardware_platform_versions": [0, 1, 2],
            "allowed_operations": [
                "provision",
                "evacuate",
                "reboot",
                "shutdown",
                "vm_start",
                "vm_resume",
                "vm_migrate",
            ],
            "API_version_vendor_implementation": {},
            "last_software_update": self.stamp,
            "tls_verification_enabled": True,
        }
        # dom0: every host runs one, and xapi lists it among the VMs.
        dom0_mem = 4 * GiB if memory_total >= 32 * GiB else 1 * GiB
        dom0 = self._vm(
            f"Control domain on host: {name}",
            dom0_mem,
            8,
            "Running",
            host,
            control=True,
            description="The domain which manages physical devices and manages other domains",
        )
        self._pending_hosts[ref]["control_domain"] = dom0
        return host

    def shared_storage(self, name: str, sr_type: str, size: int) -> str:
        sr = self.s.create(
            "SR",
            {
                "name_label": name,
                "name_description": "iSCSI SR [10.0.1.50 (iqn.2024-01.com.example:storage.lun0)]",
                "type": sr_type,
                "shared": True,
                "physical_size": size,
                "sm_config": {"allocation": "thick", "use_vhd": "true", "devserial": "scsi-36001405abcdef"},
                "other_config": {"auto-scan": "false"},
                "allowed_operations": [
                    "vdi_create",
                    "vdi_destroy",
                    "vdi_snapshot",
                    "vdi_clone",
                    "vdi_resize",
                    "scan",
                    "plug",
                    "unplug",
                ],
            },
        )
        self.sr_vdis[sr] = []
        self.sr_used[sr] = 0
        self.sr_pbds[sr] = []
        for host in self.hosts:
            pbd = self.s.create(
                "PBD",
                {
                    "host": host.ref,
                    "SR": sr,
                    "currently_attached": True,
                    "device_config": {
                        "target": "10.0.1.50",
                        "targetIQN": "iqn.2024-01.com.example:storage.lun0",
                        "SCSIid": "36001405abcdef",
                        "port": "3260",
                    },
                },
            )
            host.pbds.append(pbd)
            self.sr_pbds[sr].append(pbd)
        self.shared_sr = sr
        return sr

    def local_storage(self, host: _Host, size: int) -> str:
        sr = self.s.create(
            "SR",
            {
                "name_label": f"Local storage {host.name}",
                "name_description": f"Local storage on {host.name}",
                "type": "lvm",
                "shared": False,
                "physical_size": size,
                "sm_config": {"allocation": "thick", "use_vhd": "true", "devserial": f"scsi-local-{host.name}"},
                "allowed_operations": [
                    "vdi_create",
                    "vdi_destroy",
                    "vdi_snapshot",
                    "vdi_clone",
                    "vdi_resize",
                    "scan",
                    "plug",
                    "unplug",
                ],
            },
        )
        pbd = self.s.create(
            "PBD", {"host": host.ref, "SR": sr, "currently_attached": True, "device_config": {"device": "/dev/sdb"}}
        )
        host.pbds.append(pbd)
        host.local_sr = sr
        self.sr_vdis[sr] = []
        self.sr_used[sr] = 0
        self.sr_pbds[sr] = [pbd]
        return sr

    def network(self, name: str, bridge: str, device: str, subnet: str, *, management: bool) -> str:
        net = self.s.create(
            "network",
            {
                "name_label": name,
                "bridge": bridge,
                "MTU": 1500,
                "other_config": {"automatic": "true" if management else "false"},
                "allowed_operations": [],
            },
        )
        self.networks.append(net)
        self.net_pifs[net] = []
        self.net_vifs[net] = []
        for i, host in enumerate(self.hosts):
            metrics = self.s.create(
                "PIF_metrics",
                {
                    "carrier": True,
                    "speed": 10000,
                    "duplex": True,
                    "vendor_name": "Intel Corporation",
                    "device_name": "Ethernet Controller X710 for 10GbE SFP+",
                    "vendor_id": "8086",
                    "device_id": "1572",
                    "pci_bus_path": f"0000:3b:00.{device[-1]}",
                    "last_updated": self.stamp,
                },
            )
            net4 = ipaddress.IPv4Network(subnet)
            ip = str(net4.network_address + 10 + i) if 10 + i < net4.num_addresses - 1 else ""
            pif = self.s.create(
                "PIF",
                {
                    "device": device,
                    "network": net,
                    "host": host.ref,
                    "MAC": self.mac(),
                    "metrics": metrics,
                    "management": management,
                    "ip_configuration_mode": "Static" if ip else "None",
                    "IP": ip,
                    "netmask": str(net4.netmask) if ip else "",
                    "gateway": str(net4.network_address + 1) if management and ip else "",
                    "DNS": "10.0.0.2" if management and ip else "",
                    "properties": {"gro": "on"},
                    "capabilities": ["fcoe"],
                },
            )
            host.pifs.append(pif)
            self.net_pifs[net].append(pif)
        return net

    # -- VMs ---------------------------------------------------------------

    def _vdi(self, sr: str, name: str, size: int, **extra: Any) -> str:
        vdi = self.s.create(
            "VDI",
            {
                "name_label": name,
                "SR": sr,
                "virtual_size": size,
                "physical_utilisation": size,
                "type": "user",
                "sm_config": {"vdi_type": "vhd"},
                "allowed_operations": ["clone", "snapshot", "resize", "destroy", "copy"],
                **extra,
            },
        )
        self.s.update(vdi, {"location": self.s.tables["VDI"][vdi]["uuid"]})
        self.sr_vdis[sr].append(vdi)
        self.sr_used[sr] += size
        return vdi

    def _vm(
        self,
        name: str,
        memory: int,
        vcpus: int,
        power_state: str,
        host: _Host | None,
        *,
        disks: list[tuple[str, int]] = (),  # type: ignore[assignment]
        networks: list[str] = (),  # type: ignore[assignment]
        control: bool = False,
        template: bool = False,
        description: str = "",
        other_config: dict[str, str] | None = None,
    ) -> str:
        s = self.s
        running = power_state in ("Running", "Paused")
        metrics = s.create(
            "VM_metrics",
            {
                "memory_actual": memory if running else 0,
                "VCPUs_number": vcpus if running else 0,
                "VCPUs_utilisation": {str(i): round(self.rng.random() * 0.3, 4) for i in range(vcpus)}
                if running
                else {},
                "state": [power_state.lower()] if running else [],
                "start_time": self.stamp if running else DateTime("19700101T00:00:00Z"),
                "install_time": self.stamp,
                "last_updated": self.stamp,
                "hvm": not control,
                "current_domain_type": ("pv" if control else "hvm") if running else "unspecified",
            },
        )
        vm = s.new_ref()
        vbds: list[str] = []
        for i, (sr, size) in enumerate(disks):
            vdi = self._vdi(
                sr, f"{name} disk {i}" if i else f"{name} system disk", size, name_description="Created by eAC demo"
            )
            vbd = s.create(
                "VBD",
                {
                    "VM": vm,
                    "VDI": vdi,
                    "device": f"xvd{'abcdefgh'[i]}",
                    "userdevice": str(i),
                    "bootable": i == 0,
                    "mode": "RW",
                    "type": "Disk",
                    "currently_attached": running,
                    "allowed_operations": ["attach"],
                },
            )
            s.update(vdi, {"VBDs": [vbd]})
            vbds.append(vbd)
        if not control and not template:
            vbds.append(
                s.create(
                    "VBD",
                    {
                        "VM": vm,
                        "VDI": NULL_REF,
                        "userdevice": "3",
                        "device": "xvdd",
                        "mode": "RO",
                        "type": "CD",
                        "empty": True,
                    },
                )
            )
        vifs: list[str] = []
        for i, net in enumerate(networks):
            vif = s.create(
                "VIF",
                {
                    "VM": vm,
                    "network": net,
                    "device": str(i),
                    "MAC": self.mac(),
                    "MAC_autogenerated": True,
                    "currently_attached": running,
                },
            )
            self.net_vifs[net].append(vif)
            vifs.append(vif)
        static_min = min(memory, 512 * MiB)
        values: dict[str, Any] = {
            "name_label": name,
            "name_description": description,
            "power_state": power_state,
            "is_a_template": template,
            "is_default_template": template,
            "resident_on": host.ref if running and host else NULL_REF,
            "memory_overhead": 0 if control else vm_overhead(memory, vcpus),
            "memory_target": memory if running else 0,
            "memory_static_max": memory,
            "memory_dynamic_max": memory,
            "memory_dynamic_min": memory,
            "memory_static_min": static_min,
            "VCPUs_max": vcpus,
            "VCPUs_at_startup": vcpus,
            "VCPUs_params": {},
            "VBDs": vbds,
            "VIFs": vifs,
            "metrics": metrics,
            "is_control_domain": control,
            "domid": (0 if control else self.engine.next_domid) if running else -1,
            "domain_type": "pv" if control else "hvm",
            "HVM_boot_policy": "" if control else "BIOS order",
            "HVM_boot_params": {} if control else {"order": "cdn"},
            "platform": {}
            if control
            else {
                "timeoffset": "0",
                "device-model": "qemu-upstream-compat",
                "apic": "true",
                "acpi": "1",
                "pae": "true",
                "nx": "true",
                "viridian": "false",
            },
            "other_config": other_config
            or ({} if control else {"base_template_name": "Debian Bookworm 12", "mac_seed": self.s.new_uuid()}),
            "user_version": 1,
            "generation_id": "" if control else "0:0",
            "hardware_platform_version": 0 if control else 2,
            "has_vendor_device": False,
            "actions_after_crash": "restart",
            "last_boot_CPU_flags": {"vendor": "GenuineIntel"} if running else {},
        }
        if running and not control:
            self.engine.next_domid += 1
        values["allowed_operations"] = allowed_ops(Record({**values, "current_operations": {}, "is_a_snapshot": False}))
        s.create("VM", values, ref=vm)
        if running and host:
            host.resident.append(vm)
            host.free -= need(s.tables["VM"][vm])
        return vm

    def vm(
        self,
        name: str,
        memory_gib: float,
        vcpus: int,
        power_state: str,
        *,
        disks_gib: list[int],
        local: bool = False,
        host_hint: int | None = None,
        extra_networks: int = 0,
        description: str = "",
    ) -> str:
        memory = int(memory_gib * GiB)
        host = self._place(memory, vcpus, local, host_hint, power_state)
        if host is None and power_state in ("Running", "Paused"):
            power_state = "Halted"
        if local:
            owner = host if host is not None else self.hosts[(host_hint or 0) % len(self.hosts)]
            sr = owner.local_sr
        else:
            sr = self.shared_sr
        disks = [(sr, g * GiB) for g in disks_gib]
        networks = self.networks[: 1 + extra_networks]
        ref = self._vm(name, memory, vcpus, power_state, host, disks=disks, networks=networks, description=description)
        if power_state == "Suspended":
            vdi = self._vdi(self.shared_sr, f"Suspend image for {name}", memory, type="suspend")
            self.s.update(ref, {"suspend_VDI": vdi})
        return ref

    def _place(self, memory: int, vcpus: int, local: bool, hint: int | None, power_state: str) -> _Host | None:
        if power_state not in ("Running", "Paused"):
            return None
        needed = memory + vm_overhead(memory, vcpus)
        order = self.hosts
        if hint is not None:
            k = hint % len(self.hosts)
            order = self.hosts[k:] + self.hosts[:k]
        for host in order[:1] if local else order:
            if host.free >= needed:
                return host
        return None

    def template(self, name: str, memory_gib: int, vcpus: int, description: str) -> str:
        return self._vm(
            name,
            memory_gib * GiB,
            vcpus,
            "Halted",
            None,
            template=True,
            description=description,
            other_config={
                "default_template": "true",
                "install-methods": "cdrom,nfs,http,ftp",
                "linux_template": "true",
            },
        )

    def snapshot(self, vm: str, name: str) -> str:
        s = self.s
        src = s.tables["VM"][vm]
        disks = []
        for vbd in src["VBDs"]:
            b = s.tables["VBD"][vbd]
            if not b["empty"]:
                d = s.tables["VDI"][b["VDI"]]
                disks.append((d["SR"], d["virtual_size"], b["VDI"]))
        snap = self._vm(
            name,
            src["memory_static_max"],
            src["VCPUs_max"],
            "Halted",
            None,
            disks=[(sr, size) for sr, size, _ in disks],
            networks=[s.tables["VIF"][v]["network"] for v in src["VIFs"]],
            template=True,
            description=f"Snapshot of {src['name_label']}",
        )
        s.update(
            snap,
            {
                "is_a_snapshot": True,
                "is_default_template": False,
                "snapshot_of": vm,
                "snapshot_time": self.stamp,
                "parent": vm,
                "allowed_operations": ["clone", "copy", "destroy", "export"],
            },
        )
        snap_vdis = [s.tables["VBD"][b]["VDI"] for b in s.tables["VM"][snap]["VBDs"] if not s.tables["VBD"][b]["empty"]]
        for (_, _, orig), new in zip(disks, snap_vdis, strict=True):
            s.update(new, {"is_a_snapshot": True, "snapshot_of": orig, "snapshot_time": self.stamp})
            s.update(orig, {"snapshots": [new]})
        s.update(vm, {"snapshots": [snap], "children": [snap]})
        return snap

    # -- finish ------------------------------------------------------------

    _pending_hosts: dict[str, dict[str, Any]]

    def begin(self) -> None:
        self._pending_hosts = {}

    def finish(self, pool: str) -> None:
        s = self.s
        for host in self.hosts:
            values = self._pending_hosts[host.ref]
            values.update(PIFs=host.pifs, PBDs=host.pbds, resident_VMs=host.resident)
            s.create("host", values, ref=host.ref)
            s.update(host.metrics, {"memory_free": max(0, host.free)})
            self.engine.hosts.append(host.ref)
            self.engine.addresses[host.ref] = values["address"]
        for sr, vdis in self.sr_vdis.items():
            used = self.sr_used[sr]
            s.update(
                sr, {"VDIs": vdis, "PBDs": self.sr_pbds[sr], "virtual_allocation": used, "physical_utilisation": used}
            )
        for net in self.networks:
            s.update(net, {"PIFs": self.net_pifs[net], "VIFs": self.net_vifs[net]})
        s.update(
            pool,
            {
                "master": self.hosts[0].ref,
                "default_SR": self.shared_sr,
                "suspend_image_SR": self.shared_sr,
                "crash_dump_SR": self.shared_sr,
            },
        )
        s.stop_seeding()


# -- the presets ---------------------------------------------------------------------

# name, GiB, vCPUs, state, disks GiB, local storage, host hint, extra networks
_DEMO_VMS: list[tuple[str, float, int, str, list[int], bool, int | None, int]] = [
    ("web-01", 2, 2, "Running", [20], False, 0, 0),
    ("web-02", 2, 2, "Running", [20], False, 1, 0),
    ("web-03", 2, 2, "Running", [20], False, 2, 0),
    ("db-primary", 16, 8, "Running", [40, 200], False, 0, 1),
    ("db-replica", 16, 8, "Running", [40, 200], False, 1, 1),
    ("mail", 4, 2, "Running", [60], False, 2, 0),
    ("ad-dc-01", 4, 2, "Running", [60], False, 3, 0),
    ("ad-dc-02", 4, 2, "Running", [60], False, 0, 0),
    ("fileserver", 8, 4, "Running", [100, 500], False, 1, 1),
    ("monitoring", 4, 2, "Running", [50], False, 2, 0),
    ("vpn-gw", 1, 1, "Running", [10], False, 3, 0),
    ("jenkins", 8, 4, "Running", [80], False, 3, 0),
    ("gitlab", 8, 4, "Running", [150], False, 2, 0),
    ("k8s-node-1", 8, 4, "Running", [50], False, 0, 0),
    ("k8s-node-2", 8, 4, "Running", [50], False, 1, 0),
    ("k8s-node-3", 8, 4, "Running", [50], False, 2, 0),
    ("build-agent-1", 8, 4, "Running", [100], True, 0, 0),
    ("build-agent-2", 8, 4, "Running", [100], True, 1, 0),
    ("build-agent-3", 8, 4, "Running", [100], True, 3, 0),
    ("build-agent-4", 8, 4, "Halted", [100], True, 3, 0),
    ("test-win10", 4, 2, "Halted", [64], True, 2, 0),
    ("backup-proxy", 2, 2, "Halted", [20], False, None, 0),
    ("wiki", 2, 2, "Suspended", [30], False, None, 0),
    ("legacy-erp", 4, 2, "Paused", [80], False, 3, 0),
    ("dev-sandbox", 2, 2, "Halted", [30], False, None, 0),
]


def build_demo(engine: Engine, seed: int, bind: str) -> None:
    """4 hosts of 64 GiB, a shared iSCSI SR, local SRs, two networks, ~25 VMs."""
    b = Builder(engine, seed, bind)
    b.begin()
    pool = b.pool("Demo pool")
    for i in range(4):
        b.host(f"xcp-host-{i + 1}", 64 * GiB)
    b.shared_storage("iSCSI shared storage", "lvmoiscsi", 4 << 40)
    for host in b.hosts:
        b.local_storage(host, 1 << 40)
    b.network("Pool-wide network associated with eth0", "xenbr0", "eth0", "10.0.0.0/24", management=True)
    b.network("Storage network eth1", "xenbr1", "eth1", "10.0.1.0/24", management=False)
    refs = {}
    for name, gib, vcpus, state, disks, local, hint, extra in _DEMO_VMS:
        refs[name] = b.vm(name, gib, vcpus, state, disks_gib=disks, local=local, host_hint=hint, extra_networks=extra)
    b.template("Debian Bookworm 12", 2, 2, "Template for Debian Bookworm 12")
    b.template("Windows Server 2022 (64-bit)", 4, 2, "Template for Windows Server 2022 (64-bit)")
    b.snapshot(refs["db-primary"], "db-primary before upgrade")
    b.finish(pool)


def build_generated(engine: Engine, seed: int, bind: str, n_hosts: int, n_vms: int) -> None:
    """``n_hosts`` hosts of 256 GiB and ``n_vms`` VMs of 1-16 GiB; one in ten on local storage."""
    b = Builder(engine, seed, bind)
    b.begin()
    pool = b.pool(f"Generated pool ({n_hosts} hosts)")
    width = max(4, len(str(n_hosts)))
    for i in range(n_hosts):
        b.host(f"host-{i + 1:0{width}d}", 256 * GiB)
    b.shared_storage("Shared iSCSI storage", "lvmoiscsi", 1 << 50)
    for host in b.hosts:
        b.local_storage(host, 2 << 40)
    b.network("Pool-wide network associated with eth0", "xenbr0", "eth0", "10.0.0.0/16", management=True)
    b.network("Storage network eth1", "xenbr1", "eth1", "10.1.0.0/16", management=False)
    rng = b.rng
    vwidth = max(5, len(str(n_vms)))
    for i in range(n_vms):
        roll = rng.random()
        state = "Running" if roll < 0.7 else "Halted" if roll < 0.9 else "Suspended" if roll < 0.95 else "Paused"
        b.vm(
            f"vm-{i + 1:0{vwidth}d}",
            rng.choice((1, 2, 2, 4, 4, 8, 16)),
            rng.choice((1, 2, 2, 4, 8)),
            state,
            disks_gib=[rng.choice((10, 20, 40, 80))],
            local=rng.random() < 0.1,
            host_hint=i % n_hosts,
        )
    b.template("Debian Bookworm 12", 2, 2, "Template for Debian Bookworm 12")
    b.finish(pool)
