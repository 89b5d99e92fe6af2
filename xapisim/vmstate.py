"""VM and host state shared by the operations, HA and the fault injector.

Memory accounting (one rule everywhere, as xapi's HA planner counts it): a VM
needs ``memory_static_max + memory_overhead`` on the host it runs on or is
being started/migrated to; a host offers ``memory_total - memory_overhead``
(Xen's own) minus what its resident and incoming VMs, dom0 included, need.
``host_metrics.memory_free`` shows that figure and is kept current.

The state-transition helpers (``to_running``, ``to_halted``…) change every
object a client would see change (VM, VM_metrics, host.resident_VMs,
host_metrics, VBD/VIF currently_attached, allowed_operations); call them with
the engine lock held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .datamodel import NULL_REF, Record, now
from .errors import XapiError

if TYPE_CHECKING:
    from .engine import Engine

# Power states, in the order xapi lists them in VM_BAD_POWER_STATE.
_STATES = ("halted", "paused", "suspended", "running")

# Operation -> power states it is allowed in (xapi_vm_lifecycle.ml).
ALLOWED_STATES: dict[str, tuple[str, ...]] = {
    "start": ("halted",),
    "start_on": ("halted",),
    "pause": ("running",),
    "unpause": ("paused",),
    "clean_shutdown": ("running",),
    "clean_reboot": ("running",),
    "suspend": ("running",),
    "pool_migrate": ("running",),
    "hard_shutdown": ("paused", "suspended", "running"),
    "shutdown": ("paused", "suspended", "running"),
    "hard_reboot": ("paused", "running"),
    "resume": ("suspended",),
    "resume_on": ("suspended",),
    "clone": ("halted",),
    "copy": ("halted",),
    "destroy": ("halted", "suspended"),
    "snapshot": _STATES,
    "changing_memory_limits": ("halted",),
    "changing_VCPUs": ("halted",),
    "changing_dynamic_range": ("halted", "running"),
}

_TEMPLATE_OPS = {"clone", "copy", "destroy", "export", "provision", "changing_memory_limits", "changing_VCPUs"}
_SNAPSHOT_OPS = {"clone", "copy", "destroy", "export", "hard_shutdown", "revert"}

# What clients see in VM.allowed_operations, per power state.
_ALLOWED_OPS: dict[str, list[str]] = {
    state: sorted(op for op, states in ALLOWED_STATES.items() if state in states and op != "shutdown")
    for state in _STATES
}


MiB = 1 << 20


def need(vm: Record) -> int:
    """Memory a VM reserves on its host."""
    return int(vm["memory_static_max"]) + int(vm["memory_overhead"])


def vm_overhead(static_max: int, vcpus: int) -> int:
    """A plausible per-VM Xen overhead (shadow memory and the like), rounded up to MiB."""
    raw = static_max // 128 + vcpus * MiB
    return -(-raw // MiB) * MiB


def allowed_ops(vm: Record, current: dict[str, str] | None = None) -> list[str]:
    if current if current is not None else vm["current_operations"]:
        return []  # xapi blocks (almost) everything while an operation runs
    if vm["is_control_domain"]:
        return []
    if vm["is_a_snapshot"]:
        return sorted(_SNAPSHOT_OPS & set(_ALLOWED_OPS[vm["power_state"].lower()]) | {"destroy"})
    if vm["is_a_template"]:
        return sorted(_TEMPLATE_OPS)
    return _ALLOWED_OPS[vm["power_state"].lower()]


def check_op(vm_ref: str, vm: Record, op: str) -> None:
    """xapi's checks before a VM operation, in its order; raises the first failure."""
    if vm["is_control_domain"]:
        raise XapiError("OPERATION_NOT_ALLOWED", "This operation is not allowed on a control domain")
    if vm["is_a_snapshot"] and op not in _SNAPSHOT_OPS:
        raise XapiError("VM_IS_SNAPSHOT", vm_ref, op)
    if vm["is_a_template"] and not vm["is_a_snapshot"] and op not in _TEMPLATE_OPS:
        raise XapiError("VM_IS_TEMPLATE", vm_ref, op)
    state = vm["power_state"].lower()
    states = ALLOWED_STATES[op]
    if op in ("clone", "copy") and vm["is_a_snapshot"]:
        states = ("halted", "suspended")
    if state not in states:
        raise XapiError("VM_BAD_POWER_STATE", vm_ref, ", ".join(s for s in _STATES if s in states), state)
    current = vm["current_operations"]
    if current:
        (task, other), *_ = current.items()
        # Two hard operations may overlap a clean one in xapi; everything else waits.
        if not (op in ("hard_shutdown", "hard_reboot") and other not in ("hard_shutdown", "hard_reboot")):
            raise XapiError("OTHER_OPERATION_IN_PROGRESS", "VM", vm_ref, other, task)


# -- host memory ----------------------------------------------------------------


def host_used(engine: Engine, host: str, *, exclude_vm: str | None = None) -> int:
    s = engine.store
    vms = s.tables["VM"]
    resident = s.tables["host"][host]["resident_VMs"]
    if exclude_vm is not None and exclude_vm in resident:
        used = sum(need(vms[vm]) for vm in resident if vm != exclude_vm)
    else:
        used = _resident_need(engine, host, resident)
    for vm, h in engine.reserved.items():
        if h == host and vm != exclude_vm:
            used += need(vms[vm])
    return used


def _resident_need(engine: Engine, host: str, resident: list[str]) -> int:
    """What the VMs ``resident`` on ``host`` need, remembered per host with their records.

    VM.start asks every host for its free memory, and between two starts the records of most hosts' VMs have
    not changed: comparing the lists of records (an identity test per record, a field-by-field one only for a
    record stored anew, and equal records need the same) costs a fraction of summing them again.
    """
    records = list(map(engine.store.tables["VM"].__getitem__, resident))
    cached = engine.resident_need.get(host)
    if cached is not None and cached[0] == records:
        return cached[1]
    used = sum(map(need, records))
    engine.resident_need[host] = (records, used)
    return used


def host_free(engine: Engine, host: str, *, exclude_vm: str | None = None) -> int:
    s = engine.store
    h = s.tables["host"][host]
    total = s.tables["host_metrics"][h["metrics"]]["memory_total"]
    return total - h["memory_overhead"] - host_used(engine, host, exclude_vm=exclude_vm)


def refresh_host_memory(engine: Engine, *hosts: str) -> None:
    s = engine.store
    for host in hosts:
        if host and host != NULL_REF and s.exists("host", host):
            metrics = s.tables["host"][host]["metrics"]
            s.update(metrics, {"memory_free": max(0, host_free(engine, host))})


def sees_sr(engine: Engine, host: str, sr: str) -> bool:
    """True if ``host`` has a currently attached PBD for ``sr``."""
    s = engine.store
    # Walk the host's few PBDs, not the SR's (a shared SR has one per host).
    for pbd in s.tables["host"][host]["PBDs"]:
        p = s.tables["PBD"][pbd]
        if p["SR"] == sr and p["currently_attached"]:
            return True
    return False


def vm_srs(engine: Engine, vm: Record) -> list[str]:
    """The SRs of the VM's disks (and of its suspend image), each once."""
    s = engine.store
    out: list[str] = []
    for vbd in vm["VBDs"]:
        b = s.tables["VBD"][vbd]
        if b["empty"] or b["VDI"] == NULL_REF:
            continue
        vdi = s.tables["VDI"].get(b["VDI"])
        if vdi is not None and vdi["SR"] not in out:
            out.append(vdi["SR"])
    sv = s.tables["VDI"].get(vm["suspend_VDI"])
    if sv is not None and sv["SR"] not in out:
        out.append(sv["SR"])
    return out


def vm_networks(engine: Engine, vm: Record) -> list[str]:
    s = engine.store
    return list(dict.fromkeys(s.tables["VIF"][v]["network"] for v in vm["VIFs"]))


def host_has_network(engine: Engine, host: str, network: str) -> bool:
    s = engine.store
    return any(s.tables["PIF"][p]["network"] == network for p in s.tables["host"][host]["PIFs"])


def assert_can_boot_here(engine: Engine, vm_ref: str, vm: Record, host: str, *, migrating: bool = False) -> int:
    """xapi's checks that ``vm`` can run on ``host``, in its order; returns the host's free memory they compared
    the VM's need with (``host_free``)."""
    if not engine.is_live(host):
        raise XapiError("HOST_NOT_LIVE")
    if not engine.is_up(host):
        # Live as far as xapi knows, but it does not answer (crashed, not yet declared dead).
        raise XapiError("HOST_OFFLINE", host)
    if not engine.store.tables["host"][host]["enabled"]:
        raise XapiError("HOST_DISABLED", host)
    for sr in vm_srs(engine, vm):
        if not sees_sr(engine, host, sr):
            raise XapiError("VM_REQUIRES_SR", vm_ref, sr)
    for net in vm_networks(engine, vm):
        if not host_has_network(engine, host, net):
            raise XapiError("VM_REQUIRES_NETWORK", vm_ref, net)
    needed = need(vm)
    available = host_free(engine, host, exclude_vm=vm_ref if migrating else None)
    if needed > available:
        raise XapiError("HOST_NOT_ENOUGH_FREE_MEMORY", needed, max(0, available))
    return available


def choose_host(engine: Engine, vm_ref: str, vm: Record) -> str:
    """Where VM.start puts a VM: its affinity host if it can, else the host with most free memory."""
    candidates = []
    for i, host in enumerate(engine.hosts):
        try:
            free = assert_can_boot_here(engine, vm_ref, vm, host)
        except XapiError:
            continue
        candidates.append((host != vm["affinity"], -free, i, host))
    if not candidates:
        raise XapiError("NO_HOSTS_AVAILABLE")
    return min(candidates)[3]


# -- transitions ------------------------------------------------------------------


def _set_devices_attached(engine: Engine, vm: Record, attached: bool) -> None:
    s = engine.store
    for vbd in vm["VBDs"]:
        s.update(vbd, {"currently_attached": attached and not s.tables["VBD"][vbd]["empty"]})
    for vif in vm["VIFs"]:
        s.update(vif, {"currently_attached": attached})


def update_vm(engine: Engine, vm_ref: str, values: dict[str, Any]) -> Record:
    """Update a VM and keep its allowed_operations consistent with the result."""
    s = engine.store
    merged = Record(s.tables["VM"][vm_ref])
    merged.update(values)
    values = {**values, "allowed_operations": allowed_ops(merged)}
    return s.update(vm_ref, values)


def to_running(engine: Engine, vm_ref: str, host: str, *, paused: bool = False) -> None:
    s = engine.store
    vm = s.tables["VM"][vm_ref]
    old_host = vm["resident_on"]
    engine.reserved.pop(vm_ref, None)
    domid = engine.next_domid
    engine.next_domid += 1
    update_vm(
        engine,
        vm_ref,
        {
            "power_state": "Paused" if paused else "Running",
            "resident_on": host,
            "scheduled_to_be_resident_on": NULL_REF,
            "domid": domid,
            "memory_target": vm["memory_dynamic_max"],
            "suspend_VDI": NULL_REF,
        },
    )
    s.update(
        vm["metrics"],
        {
            "memory_actual": vm["memory_dynamic_max"],
            "VCPUs_number": vm["VCPUs_at_startup"],
            "VCPUs_utilisation": {str(i): 0.0 for i in range(int(vm["VCPUs_at_startup"]))},
            "start_time": now(),
            "last_updated": now(),
            "state": ["paused"] if paused else ["running"],
        },
    )
    if old_host != host:
        if s.exists("host", old_host):
            s.set_remove(old_host, "resident_VMs", vm_ref)
        s.set_add(host, "resident_VMs", vm_ref)
    _set_devices_attached(engine, vm, True)
    refresh_host_memory(engine, host, old_host)


def to_halted(engine: Engine, vm_ref: str, *, suspended_vdi: str = NULL_REF) -> None:
    """Halted (or Suspended, with ``suspended_vdi``): the VM leaves its host."""
    s = engine.store
    vm = s.tables["VM"][vm_ref]
    host = vm["resident_on"]
    engine.reserved.pop(vm_ref, None)
    update_vm(
        engine,
        vm_ref,
        {
            "power_state": "Halted" if suspended_vdi == NULL_REF else "Suspended",
            "resident_on": NULL_REF,
            "scheduled_to_be_resident_on": NULL_REF,
            "domid": -1,
            "suspend_VDI": suspended_vdi,
        },
    )
    s.update(
        vm["metrics"],
        {"memory_actual": 0, "VCPUs_number": 0, "VCPUs_utilisation": {}, "state": [], "last_updated": now()},
    )
    if s.exists("host", host):
        s.set_remove(host, "resident_VMs", vm_ref)
    _set_devices_attached(engine, vm, False)
    refresh_host_memory(engine, host)


def set_paused(engine: Engine, vm_ref: str, paused: bool) -> None:
    vm = engine.store.tables["VM"][vm_ref]
    update_vm(engine, vm_ref, {"power_state": "Paused" if paused else "Running"})
    engine.store.update(vm["metrics"], {"state": ["paused"] if paused else ["running"], "last_updated": now()})


def begin_op(engine: Engine, vm_ref: str, task: str, op: str, *, reserve_on: str | None = None) -> None:
    vm = engine.store.tables["VM"][vm_ref]
    values: dict[str, Any] = {"current_operations": {**vm["current_operations"], task: op}}
    if reserve_on is not None:
        engine.reserved[vm_ref] = reserve_on
        values["scheduled_to_be_resident_on"] = reserve_on
    update_vm(engine, vm_ref, values)
    if reserve_on is not None:
        refresh_host_memory(engine, reserve_on)


def end_op(engine: Engine, vm_ref: str, task: str) -> None:
    s = engine.store
    vm = s.tables["VM"].get(vm_ref)
    if vm is None:
        return
    values: dict[str, Any] = {"current_operations": {t: o for t, o in vm["current_operations"].items() if t != task}}
    reserved = engine.reserved.pop(vm_ref, None)
    if reserved is not None:
        values["scheduled_to_be_resident_on"] = NULL_REF
    update_vm(engine, vm_ref, values)
    if reserved is not None:
        refresh_host_memory(engine, reserved)


def vm_message(engine: Engine, name: str, vm_ref: str, what: str) -> None:
    vm = engine.store.tables["VM"][vm_ref]
    engine.message(name, "VM", vm["uuid"], f"VM '{vm['name_label']}' (uuid: {vm['uuid']}) {what}")


class Agility:
    """Which SRs and networks are properly shared, computed once for many VMs.

    xapi: an SR is properly shared if it is marked shared and every enabled
    host has a currently attached PBD for it; a network if every enabled host
    has a PIF on it.
    """

    def __init__(self, engine: Engine) -> None:
        s = engine.store
        enabled = {h for h, r in s.tables["host"].items() if r["enabled"]}
        self.shared_srs = set()
        for sr, rec in s.tables["SR"].items():
            if rec["shared"]:
                seen = {s.tables["PBD"][p]["host"] for p in rec["PBDs"] if s.tables["PBD"][p]["currently_attached"]}
                if enabled <= seen:
                    self.shared_srs.add(sr)
        self.shared_networks = set()
        for net, rec in s.tables["network"].items():
            if enabled <= {s.tables["PIF"][p]["host"] for p in rec["PIFs"]}:
                self.shared_networks.add(net)

    def check(self, engine: Engine, vm: Record) -> None:
        for sr in vm_srs(engine, vm):
            if sr not in self.shared_srs:
                raise XapiError("HA_CONSTRAINT_VIOLATION_SR_NOT_SHARED", sr)
        for net in vm_networks(engine, vm):
            if net not in self.shared_networks:
                raise XapiError("HA_CONSTRAINT_VIOLATION_NETWORK_NOT_SHARED", net)

    def agile(self, engine: Engine, vm: Record) -> bool:
        try:
            self.check(engine, vm)
        except XapiError:
            return False
        return True


def assert_agile(engine: Engine, vm: Record) -> None:
    """xapi's Agility.vm_assert_agile."""
    Agility(engine).check(engine, vm)
