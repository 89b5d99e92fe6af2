"""Inventory rows built with the ORM, for tests that need a pool without a watcher.

Each function takes the fields that matter to a test as keywords and fills the
rest with unique, plausible values (uuids, OpaqueRefs, MACs).
"""

from __future__ import annotations

import itertools
import uuid as uuidlib

from inventory.choices import ConnectionState, PowerState
from inventory.models import PBD, PIF, SR, VBD, VDI, VIF, VM, Host, Network, Pool

_serial = itertools.count(1)
GiB = 1024**3


def _ids() -> dict:
    value = str(uuidlib.uuid4())
    return {"uuid": value, "ref": f"OpaqueRef:{value}"}


def _mac(n: int) -> str:
    return "02:" + ":".join(f"{(n >> shift) & 0xFF:02x}" for shift in (32, 24, 16, 8, 0))


def make_pool(**fields) -> Pool:
    n = next(_serial)
    values = {
        "name": f"pool-{n}",
        "url": f"https://pool-{n}.example.org",
        "username": "root",
        "password": "secret",
        "connection_state": ConnectionState.CONNECTED,
        "name_label": f"Pool {n}",
        **_ids(),
    }
    values.update(fields)
    return Pool.objects.create(**values)


def make_host(pool: Pool, **fields) -> Host:
    n = next(_serial)
    values = {
        "name_label": f"host-{n}",
        "address": f"10.0.{n // 250}.{n % 250 + 1}",
        "hostname": f"host-{n}",
        "live": True,
        "enabled": True,
        "memory_total": 256 * GiB,
        "memory_free": 128 * GiB,
        "cpu_count": 32,
        **_ids(),
    }
    values.update(fields)
    return Host.objects.create(pool=pool, **values)


def make_sr(pool: Pool, **fields) -> SR:
    n = next(_serial)
    values = {
        "name_label": f"sr-{n}",
        "type": "lvmoiscsi",
        "content_type": "user",
        "shared": True,
        "physical_size": 2048 * GiB,
        "physical_utilisation": 512 * GiB,
        **_ids(),
    }
    values.update(fields)
    return SR.objects.create(pool=pool, **values)


def make_pbd(host: Host, sr: SR, **fields) -> PBD:
    return PBD.objects.create(pool=host.pool, host=host, sr=sr, **{"currently_attached": True, **_ids(), **fields})


def make_network(pool: Pool, **fields) -> Network:
    n = next(_serial)
    values = {"name_label": f"network-{n}", "bridge": f"xenbr{n}", "mtu": 1500, **_ids()}
    values.update(fields)
    return Network.objects.create(pool=pool, **values)


def make_pif(host: Host, network: Network, **fields) -> PIF:
    n = next(_serial)
    values = {
        "device": "eth0",
        "mac": _mac(n),
        "currently_attached": True,
        "carrier": True,
        **_ids(),
    }
    values.update(fields)
    return PIF.objects.create(pool=host.pool, host=host, network=network, **values)


def make_vm(pool: Pool, *, host: Host | None = None, **fields) -> VM:
    """A VM, running on ``host`` when one is given, halted otherwise."""
    n = next(_serial)
    values = {
        "name_label": f"vm-{n}",
        "power_state": PowerState.RUNNING if host else PowerState.HALTED,
        "resident_on": host,
        "memory_static_max": 4 * GiB,
        "memory_dynamic_max": 4 * GiB,
        "vcpus_max": 2,
        **_ids(),
    }
    values.update(fields)
    return VM.objects.create(pool=pool, **values)


def make_disk(vm: VM, sr: SR, *, userdevice: str = "0", **vdi_fields) -> VBD:
    """A VBD of ``vm`` and the VDI behind it, on ``sr``."""
    n = next(_serial)
    vdi = VDI.objects.create(
        pool=vm.pool,
        sr=sr,
        **{"name_label": f"disk-{n}", "virtual_size": 20 * GiB, "type": "user", **_ids(), **vdi_fields},
    )
    return VBD.objects.create(
        pool=vm.pool,
        vm=vm,
        vdi=vdi,
        device=f"xvd{chr(ord('a') + int(userdevice))}",
        userdevice=userdevice,
        type="Disk",
        mode="RW",
        bootable=userdevice == "0",
        currently_attached=vm.power_state == PowerState.RUNNING,
        **_ids(),
    )


def make_nic(vm: VM, network: Network, *, device: str = "0", **fields) -> VIF:
    n = next(_serial)
    values = {"mac": _mac(n), "currently_attached": vm.power_state == PowerState.RUNNING, **_ids()}
    values.update(fields)
    return VIF.objects.create(pool=vm.pool, vm=vm, network=network, device=device, **values)


# -- a big pool, in bulk -------------------------------------------------------------------------------------


def big_pool_records(*, hosts: int, vms: int, disks: int = 2, nics: int = 2) -> dict[str, dict[str, dict]]:
    """What ``get_all_records`` of every class would answer for a pool of ``hosts`` hosts (each with its dom0, a
    local SR and a PIF) and ``vms`` running VMs with ``disks`` disks on the shared SR and ``nics`` NICs each:
    {event class: {ref: record}}, as ``inventory.sync.fetch_records`` gives them to ``PoolMirror.full_sync``."""
    def ref(kind: str, n: int) -> str:
        return f"OpaqueRef:{kind}-{n}"

    def uuid(kind: str, n: int) -> str:
        return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"{kind}-{n}"))

    records: dict[str, dict[str, dict]] = {cls: {} for cls in
                                           ("pool", "host", "host_metrics", "sr", "pbd", "network", "pif",
                                            "pif_metrics", "vm", "vdi", "vbd", "vif")}
    records["pool"][ref("pool", 0)] = {"uuid": str(uuidlib.uuid4()), "name_label": "Big pool", "master": ref("host", 0),
                                       "ha_enabled": False, "ha_host_failures_to_tolerate": "0",
                                       "ha_plan_exists_for": "0", "ha_overcommitted": False,
                                       "ha_allow_overcommit": False, "ha_configuration": {}}
    records["sr"][ref("sr", 0)] = {"uuid": uuid("sr", 0), "name_label": "shared", "type": "lvmoiscsi",
                                   "content_type": "user", "shared": True, "physical_size": str(64 * 1024 * GiB),
                                   "physical_utilisation": "0"}
    for net in range(2):
        records["network"][ref("network", net)] = {"uuid": uuid("network", net), "name_label": f"network {net}",
                                                   "bridge": f"xenbr{net}", "MTU": "1500"}
    for h in range(hosts):
        records["host"][ref("host", h)] = {"uuid": uuid("host", h), "name_label": f"host-{h:04}",
                                           "address": f"10.{h // 250}.{h % 250}.1", "hostname": f"host-{h:04}",
                                           "enabled": True, "cpu_info": {"cpu_count": "32"},
                                           "metrics": ref("host_metrics", h)}
        records["host_metrics"][ref("host_metrics", h)] = {"uuid": uuid("host_metrics", h), "live": True,
                                                           "memory_total": str(512 * GiB),
                                                           "memory_free": str(256 * GiB), "last_updated": ""}
        records["sr"][ref("sr", h + 1)] = {"uuid": uuid("sr", h + 1), "name_label": f"local host-{h:04}",
                                           "type": "ext", "content_type": "user", "shared": False,
                                           "physical_size": str(2048 * GiB), "physical_utilisation": "0"}
        for k, sr in enumerate((0, h + 1)):
            records["pbd"][ref("pbd", 2 * h + k)] = {"uuid": uuid("pbd", 2 * h + k), "host": ref("host", h),
                                                     "SR": ref("sr", sr), "currently_attached": True}
        records["pif"][ref("pif", h)] = {"uuid": uuid("pif", h), "host": ref("host", h),
                                         "network": ref("network", 0), "device": "eth0", "MAC": _mac(h),
                                         "IP": f"10.{h // 250}.{h % 250}.1", "management": True,
                                         "currently_attached": True, "metrics": ref("pif_metrics", h)}
        records["pif_metrics"][ref("pif_metrics", h)] = {"uuid": uuid("pif_metrics", h), "carrier": True}
        records["vm"][ref("dom0", h)] = {"uuid": uuid("dom0", h), "name_label": f"Control domain on host-{h:04}",
                                         "power_state": "Running", "resident_on": ref("host", h),
                                         "is_control_domain": True, "memory_static_max": str(4 * GiB)}
    for v in range(vms):
        records["vm"][ref("vm", v)] = {
            "uuid": uuid("vm", v), "name_label": f"vm-{v:05}", "power_state": "Running",
            "resident_on": ref("host", v % hosts), "affinity": ref("host", v % hosts),
            "memory_static_max": str(4 * GiB), "memory_dynamic_max": str(4 * GiB), "VCPUs_max": "2",
            "ha_restart_priority": "", "order": "0", "start_delay": "0", "current_operations": {},
        }
        for d in range(disks):
            n = v * disks + d
            records["vdi"][ref("vdi", n)] = {"uuid": uuid("vdi", n), "name_label": f"vm-{v:05} disk {d}",
                                             "SR": ref("sr", 0), "virtual_size": str(20 * GiB),
                                             "physical_utilisation": str(GiB), "type": "user"}
            records["vbd"][ref("vbd", n)] = {"uuid": uuid("vbd", n), "VM": ref("vm", v), "VDI": ref("vdi", n),
                                             "device": f"xvd{chr(ord('a') + d)}", "userdevice": str(d),
                                             "type": "Disk", "mode": "RW", "bootable": d == 0,
                                             "currently_attached": True}
        for i in range(nics):
            n = v * nics + i
            records["vif"][ref("vif", n)] = {"uuid": uuid("vif", n), "VM": ref("vm", v),
                                             "network": ref("network", i % 2), "device": str(i),
                                             "MAC": _mac(1_000_000 + n), "currently_attached": True}
    return records


def make_big_pool(*, hosts: int = 100, vms: int = 10_000, disks: int = 2, nics: int = 2, **fields) -> Pool:
    """A pool as the watcher's full sync writes it (``PoolMirror.full_sync``: COPY on PostgreSQL, bulk_create
    elsewhere), from ``big_pool_records``."""
    from inventory.sync import PoolMirror

    records = big_pool_records(hosts=hosts, vms=vms, disks=disks, nics=nics)
    pool = make_pool(**{"uuid": next(iter(records["pool"].values()))["uuid"], **fields})
    PoolMirror(pool).full_sync(records)
    return pool
