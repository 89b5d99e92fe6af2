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
