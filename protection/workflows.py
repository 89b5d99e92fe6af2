"""Workflows as named steps (after Masakari): the lists are data, the engine runs them.

Each step is idempotent: it first looks at what is already true in XAPI and
only then acts, so a step re-run after its worker died does no harm. A step
may keep what it found in ``result`` for the steps after it (and for undo).
The engine (``engine.workflow_run_execute``) runs the steps in order,
skipping those already done, and records progress, messages, attempts and
times on each.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.conf import settings

from inventory.selectors import xapi_error_describe
from inventory.xapi import XapiError

from .am_client import AMError, checkpoint_body, checkpoint_of, pair_problems
from .choices import EPOCH_MS_DEFAULT, LEVEL3_MAX_NICS, LEVEL3_VCPUS, Level, RestartPriority, RunKind, uses_ams

if TYPE_CHECKING:
    from .engine import StepContext


class StepFailed(Exception):
    """A permanent failure a step found itself (not an XAPI error): a code and a sentence."""

    def __init__(self, code: str, message: str, params: list | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.params = params or []


@dataclass(frozen=True)
class Step(ABC):
    """One named step; each subclass does its work in ``run`` and may return a result dict."""

    name: str
    label: str

    @abstractmethod
    def run(self, ctx: StepContext) -> dict[str, Any] | None: ...


# -- Level 1 protect ---------------------------------------------------------------------------


class CheckAgile(Step):
    def run(self, ctx):
        ctx.progress(0.2, "Asking XAPI whether the VM can restart on any host…")
        ctx.call("VM.assert_agile", ctx.vm_ref)
        return {"message": "The VM is agile: all its disks and networks are shared by every host."}


class CheckPlan(Step):
    def run(self, ctx):
        if ctx.params.get("restart_priority", RestartPriority.RESTART) != RestartPriority.RESTART:
            return {"message": "Best-effort restart does not enter the failover plan: nothing to check."}
        ctx.progress(0.2, "Computing the failover plan with the VM added…")
        ha_enabled = ctx.call("pool.get_ha_enabled", ctx.pool_ref)
        target = (
            int(ctx.call("pool.get_ha_host_failures_to_tolerate", ctx.pool_ref))
            if ha_enabled
            else int(ctx.params.get("failures_to_tolerate", 1))
        )
        configuration = dict(ctx.protected_vm_refs())
        configuration[ctx.vm_ref] = RestartPriority.RESTART.value
        tolerable = int(ctx.call("pool.ha_compute_hypothetical_max_host_failures_to_tolerate", configuration))
        if tolerable < target:
            raise StepFailed(
                "PLAN_WOULD_NOT_HOLD",
                f"With this VM protected the pool could tolerate {tolerable} host failure(s), fewer than the "
                f"{target} it must tolerate. " + ctx.plan_blockers(target),
                [str(tolerable), str(target)],
            )
        return {
            "tolerable": tolerable,
            "target": target,
            "message": f"The plan holds: {tolerable} host failure(s) tolerable with the VM added, {target} needed.",
        }


class EnableHA(Step):
    def run(self, ctx):
        if ctx.call("pool.get_ha_enabled", ctx.pool_ref):
            if ctx.step.result.get("enabling"):
                # We called enable_ha before a worker died: the enabling was ours.
                return {"enabled_by_console": True, "message": "High availability is enabled on the pool."}
            return {"enabled_by_console": False, "message": "High availability was already enabled on the pool."}
        sr_uuid = ctx.params.get("heartbeat_sr")
        if not sr_uuid:
            raise StepFailed(
                "HEARTBEAT_SR_REQUIRED",
                "High availability is off on this pool: choose a shared SR for its heartbeat to turn it on.",
            )
        sr_ref = ctx.call("SR.get_by_uuid", sr_uuid)
        target = int(ctx.params.get("failures_to_tolerate", 1))
        ctx.save_result({"enabling": True})
        ctx.progress(0.3, "Enabling high availability on the pool (this can take a minute)…")
        ctx.call("pool.enable_ha", [sr_ref], {})
        ctx.progress(0.8, f"Setting the host failures to tolerate to {target}…")
        ctx.call("pool.set_ha_host_failures_to_tolerate", ctx.pool_ref, str(target))
        return {"enabled_by_console": True, "message": f"High availability enabled, tolerating {target} failure(s)."}


class ApplySettings(Step):
    def run(self, ctx):
        # Already protected (a change of settings): "previous" is what the VM had before the first protection.
        previous = ctx.step.result.get("previous") or ctx.params.get("previous") or None
        if previous is None:
            # Kept from the first attempt only: a re-run must not record our own values as "previous".
            previous = {
                "ha_restart_priority": ctx.call("VM.get_ha_restart_priority", ctx.vm_ref),
                "order": int(ctx.call("VM.get_order", ctx.vm_ref)),
                "start_delay": int(ctx.call("VM.get_start_delay", ctx.vm_ref)),
            }
            ctx.save_result({"previous": previous})
        ctx.progress(0.4, "Setting the restart priority…")
        ctx.call("VM.set_ha_restart_priority", ctx.vm_ref, ctx.params.get("restart_priority", "restart"))
        ctx.progress(0.7, "Setting the restart order and start delay…")
        ctx.call("VM.set_order", ctx.vm_ref, str(int(ctx.params.get("order", 0))))
        ctx.call("VM.set_start_delay", ctx.vm_ref, str(int(ctx.params.get("start_delay", 0))))
        return {"previous": previous, "message": "Restart priority, order and start delay set."}


class VerifyProtected(Step):
    def run(self, ctx):
        got = {
            "restart_priority": ctx.call("VM.get_ha_restart_priority", ctx.vm_ref),
            "order": int(ctx.call("VM.get_order", ctx.vm_ref)),
            "start_delay": int(ctx.call("VM.get_start_delay", ctx.vm_ref)),
        }
        want = {
            "restart_priority": ctx.params.get("restart_priority", "restart"),
            "order": int(ctx.params.get("order", 0)),
            "start_delay": int(ctx.params.get("start_delay", 0)),
        }
        if got != want:
            wrong = ", ".join(f"{k} is {got[k]!r} instead of {want[k]!r}" for k in want if got[k] != want[k])
            raise StepFailed("VERIFY_MISMATCH", f"Read back from the pool: {wrong}.")
        if not ctx.call("pool.get_ha_enabled", ctx.pool_ref):
            raise StepFailed("HA_NOT_ENABLED", "Read back from the pool: high availability is not enabled.")
        return {"message": "Read back from the pool: the VM is protected as asked."}


# -- Level 1 unprotect -------------------------------------------------------------------------


class RestoreSettings(Step):
    def run(self, ctx):
        previous = ctx.previous_settings()
        if previous is None:
            return {"message": "Protecting never changed this VM's settings: nothing to restore."}
        priority = previous.get("ha_restart_priority", "")
        ctx.progress(0.3, "Removing the restart priority…")
        ctx.call("VM.set_ha_restart_priority", ctx.vm_ref, priority)
        ctx.progress(0.6, "Restoring the restart order and start delay…")
        ctx.call("VM.set_order", ctx.vm_ref, str(int(previous.get("order", 0))))
        ctx.call("VM.set_start_delay", ctx.vm_ref, str(int(previous.get("start_delay", 0))))
        return {"message": "The VM's restart priority, order and start delay are back to what they were."}


class DisableHAIfOurs(Step):
    def run(self, ctx):
        if not ctx.ha_enabled_by_console():
            return {"message": "High availability was not turned on by this protection: left as it is."}
        others = ctx.protected_vm_refs()
        if others:
            return {"message": f"High availability stays on: {len(others)} other VM(s) of the pool rely on it."}
        if not ctx.call("pool.get_ha_enabled", ctx.pool_ref):
            return {"message": "High availability is already off."}
        ctx.progress(0.3, "Disabling high availability on the pool (it was turned on for this VM)…")
        ctx.call("pool.disable_ha")
        return {"message": "High availability, turned on for this VM only, is off again."}


class VerifyUnprotected(Step):
    def run(self, ctx):
        previous = ctx.previous_settings()
        if previous is None:
            return {"message": "Nothing was changed on the VM: nothing to verify."}
        got = ctx.call("VM.get_ha_restart_priority", ctx.vm_ref)
        want = previous.get("ha_restart_priority", "")
        if got != want:
            raise StepFailed("VERIFY_MISMATCH", f"Read back from the pool: restart priority is {got!r}, not {want!r}.")
        return {"message": "Read back from the pool: the VM is no longer protected."}


# -- Level 2 protect (docs/level2.md: the contract with the hosts' AMs and XAPI) ------------------------

SECONDARY_SUFFIX = " (eAC secondary)"
SEED_SUFFIX = " (eAC seed)"  # the snapshot a running VM's secondary is copied from, destroyed right after
RESOURCE_KEY = "eac_am_resource"  # VDI other_config: this disk is served by the AM of the VM's host
SECONDARY_OF_KEY = "eac_secondary_of"  # VM other_config of a secondary VM: the uuid of the VM it stands in for


def _vm_record(ctx: StepContext, ref: str) -> dict:
    return ctx.call("VM.get_record", ref)


def _ref_by_uuid(ctx: StepContext, cls: str, uuid: str) -> str | None:
    """The ref of the ``cls`` object with this uuid, or None when XAPI has none (it was destroyed)."""
    if not uuid:
        return None
    try:
        return ctx.call(f"{cls}.get_by_uuid", uuid)
    except XapiError as exc:
        if exc.code in ("UUID_INVALID", "HANDLE_INVALID"):
            return None
        raise


def _secondary_vm_ref(ctx: StepContext, *, adopt_untagged: bool = False) -> str | None:
    """The secondary VM of this protection: by the uuid recorded, else by name and its tag (a copy made
    just before a worker died). ``adopt_untagged``: also a copy of that name not tagged yet (the worker died
    between VM.copy and tagging it)."""
    protection = ctx.protection
    ref = _ref_by_uuid(ctx, "VM", protection.secondary_vm_uuid)
    if ref:
        return ref
    vm = ctx.vm
    for candidate in ctx.call("VM.get_by_name_label", vm.name_label + SECONDARY_SUFFIX):
        other = ctx.call("VM.get_other_config", candidate)
        if other.get(SECONDARY_OF_KEY) == vm.uuid or (adopt_untagged and SECONDARY_OF_KEY not in other
                                                        and candidate != ctx.vm_ref):
            return candidate
    return None


def _our_snapshot(ctx: StepContext) -> str | None:
    """The snapshot the secondary VM is copied from (a running VM cannot be copied), if one is left."""
    name = ctx.vm.name_label + SEED_SUFFIX
    for snapshot in ctx.call("VM.get_snapshots", ctx.vm_ref):
        if ctx.call("VM.get_name_label", snapshot) == name:
            return snapshot
    return None


def _disk_vbds(ctx: StepContext, vm_ref: str) -> dict[str, dict]:
    """{userdevice: VBD record} of the VM's disks (not CDs, not empty)."""
    out = {}
    for vbd in ctx.call("VM.get_VBDs", vm_ref):
        record = ctx.call("VBD.get_record", vbd)
        if record.get("type") == "Disk" and not record.get("empty") and record.get("VDI") not in ("", "OpaqueRef:NULL"):
            out[str(record.get("userdevice", ""))] = record
    return out


def _set_vdi_key(ctx: StepContext, vdi_ref: str, value: str) -> None:
    """VDI other_config[eac_am_resource] = value (look, then act: a key already right is left alone)."""
    current = ctx.call("VDI.get_other_config", vdi_ref).get(RESOURCE_KEY)
    if current == value:
        return
    if current is not None:
        ctx.call("VDI.remove_from_other_config", vdi_ref, RESOURCE_KEY)
    ctx.call("VDI.add_to_other_config", vdi_ref, RESOURCE_KEY, value)


def _remove_vdi_key(ctx: StepContext, vdi_ref: str) -> None:
    if RESOURCE_KEY in ctx.call("VDI.get_other_config", vdi_ref):
        ctx.call("VDI.remove_from_other_config", vdi_ref, RESOURCE_KEY)


class _PausedVM:
    """Keep the protected VM paused while its disks change hands (docs/level2.md, "Routing"), resumably:
    the step records that it paused the VM before pausing it, so a re-run after a worker died unpauses it."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx

    def __enter__(self) -> _PausedVM:
        ctx = self.ctx
        state = ctx.call("VM.get_power_state", ctx.vm_ref)
        if state == "Running":
            ctx.save_result({"paused_by_us": True})
            ctx.progress(0.1, "Pausing the VM so that no write reaches its disk behind the AM's back…")
            ctx.call("VM.pause", ctx.vm_ref)
        elif state == "Paused" and not ctx.step.result.get("paused_by_us"):
            raise StepFailed("VM_PAUSED", "The VM is paused (not by this protection): unpause it and try again.")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()

    def release(self) -> None:
        ctx = self.ctx
        if ctx.step.result.get("paused_by_us") and ctx.call("VM.get_power_state", ctx.vm_ref) == "Paused":
            ctx.call("VM.unpause", ctx.vm_ref)
        if ctx.step.result.get("paused_by_us"):
            ctx.save_result({"paused_by_us": False})


# -- Level 3 protect: Level 2's steps, its AM resources made with a checkpoint (docs/level3.md) ----------------


def _vm_macs(ctx: StepContext, vm_ref: str) -> list[str]:
    """The MACs of the VM's VIFs, lowercase, in device order."""
    vifs = [ctx.call("VIF.get_record", v) for v in ctx.call("VM.get_VIFs", vm_ref)]
    return [str(v["MAC"]).lower() for v in sorted(vifs, key=lambda v: str(v.get("device", "")))]


def _checkpoint(ctx: StepContext) -> dict | None:
    """The ``checkpoint`` object of a Level 3 run's AM resources (the same on the primary's and the secondary's
    AM: the epoch length asked and the MACs ``check_vm`` read); None at Level 2, whose resources have none."""
    if int(ctx.params.get("level", 0)) != Level.SYSTEM_FT:
        return None
    macs = ctx.result_of("check_vm").get("macs")
    if not macs:
        raise StepFailed("NO_MACS", "The VM's MACs were not recorded by the first step: protect it again.")
    try:
        return checkpoint_body(epoch_ms=int(ctx.params.get("epoch_ms") or EPOCH_MS_DEFAULT), macs=macs)
    except ValueError as exc:
        raise StepFailed("BAD_CHECKPOINT", str(exc)) from None


class CheckLevel3VM(Step):
    """XAPI's word on what Level 3 needs of the VM itself (the preflight read the inventory): one vCPU
    (VM.VCPUs_max: a checkpoint captures one vCPU's state) and 1 to LEVEL3_MAX_NICS VIFs, whose MACs the AMs hold
    the output of and the secondary VM keeps."""

    def run(self, ctx):
        vcpus = int(ctx.call("VM.get_VCPUs_max", ctx.vm_ref))
        if vcpus != LEVEL3_VCPUS:
            raise StepFailed("LEVEL3_VCPUS", f"The VM has {vcpus} vCPUs (VM.VCPUs_max): Level 3 needs exactly "
                                             f"{LEVEL3_VCPUS}, because checkpointing captures one vCPU's state. Halt "
                                             "the VM, set its VCPUs_max to 1, and protect it again.", [str(vcpus)])
        macs = _vm_macs(ctx, ctx.vm_ref)
        if not 1 <= len(macs) <= LEVEL3_MAX_NICS:
            raise StepFailed("LEVEL3_NICS", f"The VM has {len(macs)} network interface(s): Level 3 holds the output "
                                            f"of 1 to {LEVEL3_MAX_NICS}.", [str(len(macs))])
        try:
            checkpoint_body(epoch_ms=int(ctx.params.get("epoch_ms") or EPOCH_MS_DEFAULT), macs=macs)
        except ValueError as exc:
            raise StepFailed("BAD_CHECKPOINT", str(exc)) from None
        return {"macs": macs, "message": f"The VM has 1 vCPU and {len(macs)} network interface(s) "
                                         f"({', '.join(macs)}): it can be checkpointed."}


class CheckAMs(Step):
    """Both hosts' AMs answer, are each other's peers, and see both links up and the witness."""

    def run(self, ctx):
        primary, secondary = ctx.params["primary_host"], ctx.params["secondary_host"]
        found = {}
        for role, uuid in (("primary", primary), ("secondary", secondary)):
            ref = _ref_by_uuid(ctx, "host", uuid)
            if ref is None:
                raise StepFailed("HOST_GONE", f"The {role} host is no longer in the pool.")
            other = ctx.call("host.get_other_config", ref)
            name = ctx.call("host.get_name_label", ref)
            url = other.get("eac_am_url", "")
            if not url:
                raise StepFailed("NO_AM", f"Host {name} has no Availability Manager (no eac_am_url in its "
                                          "other_config).")
            found[role] = {"ref": ref, "name": name, "url": url, "peer": other.get("eac_am_peer", "")}
        if found["primary"]["peer"] != secondary:
            raise StepFailed("NOT_AM_PEERS", f"{found['secondary']['name']} is not the AM peer of "
                                             f"{found['primary']['name']}: a Level 2 pair must be AM peers.")
        vm_host = ctx.call("VM.get_resident_on", ctx.vm_ref)
        if vm_host != found["primary"]["ref"]:
            raise StepFailed("VM_MOVED", f"The VM no longer runs on {found['primary']['name']}: protect it again "
                                         "from where it runs now.")
        for i, role in enumerate(("primary", "secondary")):
            info = found[role]
            ctx.progress(0.2 + 0.4 * i, f"Asking the AM of {info['name']} how its pair is doing…")
            status = ctx.am(info["url"]).status()
            problems = pair_problems(status)
            if problems:
                raise StepFailed("AM_PAIR_NOT_READY", f"The AM of {info['name']} says: " + "; ".join(problems)
                                 + ". Level 2 needs both links up and the witness reachable.")
        return {"primary_am": found["primary"]["url"], "secondary_am": found["secondary"]["url"],
                "message": f"The AMs of {found['primary']['name']} and {found['secondary']['name']} are peers, "
                           "both links are up and the witness is reachable."}


class RouteDisks(Step):
    """Create each disk's primary resource on the primary's AM and route the disk through it, VM paused."""

    def run(self, ctx):
        checked = ctx.result_of("check_ams")
        am = ctx.am(checked["primary_am"])
        disks = ctx.disks_discover(primary_am=checked["primary_am"], secondary_am=checked["secondary_am"])
        if not disks:
            raise StepFailed("NO_DISK", "The VM has no disk: there is nothing for Level 2 to mirror.")

        def look() -> None:
            for disk in disks:
                res = am.resource_or_none(disk.resource)
                if res is not None and not disk.primary_resource:
                    if res.get("role") != "Primary":
                        raise StepFailed("AM_RESOURCE_CLASH", f"The primary's AM already has {disk.resource} as "
                                                              f"{res.get('role')}: it is not this protection's.")
                    ctx.disk_save(disk, primary_resource=True)
                vdi_ref = ctx.call("VDI.get_by_uuid", disk.primary_vdi_uuid)
                if ctx.call("VDI.get_other_config", vdi_ref).get(RESOURCE_KEY) == disk.resource and not disk.routed:
                    ctx.disk_save(disk, routed=True)

        look()
        todo = [d for d in disks if not (d.primary_resource and d.routed)]
        paused = _PausedVM(ctx)
        if not todo:
            paused.release()  # a worker died after routing, before unpausing
            return {"message": f"{len(disks)} disk(s) already served by the primary's AM."}
        with paused:
            for i, disk in enumerate(todo):
                ctx.progress(0.2 + 0.7 * i / len(todo), f"Routing disk {disk.userdevice} through the AM…")
                vdi_ref = ctx.call("VDI.get_by_uuid", disk.primary_vdi_uuid)
                if not disk.primary_resource:
                    sr_uuid = ctx.call("SR.get_uuid", ctx.call("VDI.get_SR", vdi_ref))
                    am.resource_create(name=disk.resource, role="primary", sr=sr_uuid, vdi=disk.primary_vdi_uuid,
                                       vm=ctx.vm.uuid, checkpoint=_checkpoint(ctx))
                    ctx.disk_save(disk, primary_resource=True)
                _set_vdi_key(ctx, vdi_ref, disk.resource)
                ctx.disk_save(disk, routed=True)
        return {"message": f"{len(disks)} disk(s) now served by the primary's AM; the VM runs on."}


class CreateSecondaryVM(Step):
    """VM.copy to the secondary's local SR, the primary's MACs on its VIFs, the memory reserved, the replica
    VDIs tagged with their resources."""

    def run(self, ctx):
        vm = ctx.vm
        copy = _secondary_vm_ref(ctx, adopt_untagged=bool(ctx.step.result.get("copying")))
        if copy is None:
            sr_ref = _ref_by_uuid(ctx, "SR", ctx.params["secondary_sr"])
            if sr_ref is None:
                raise StepFailed("SR_GONE", "The secondary host's local SR chosen for the replicas is gone.")
            ctx.progress(0.1, "Copying the VM to the secondary host's local storage…")
            copy = self._copy(ctx, sr_ref)
        self._drop_snapshot(ctx)
        if ctx.call("VM.get_is_a_template", copy):
            ctx.call("VM.set_is_a_template", copy, False)
        other = ctx.call("VM.get_other_config", copy)
        if SECONDARY_OF_KEY not in other:
            ctx.call("VM.add_to_other_config", copy, SECONDARY_OF_KEY, vm.uuid)
        copy_uuid = ctx.call("VM.get_uuid", copy)
        if ctx.protection.secondary_vm_uuid != copy_uuid:
            ctx.protection_save(secondary_vm_uuid=copy_uuid)
        ctx.save_result({"copying": False})

        # The guest's other_config (its address on the test bed) travels with it.
        ctx.progress(0.4, "Giving the secondary VM the primary's identity (other_config, MACs)…")
        primary_other = ctx.call("VM.get_other_config", ctx.vm_ref)
        for key, value in primary_other.items():
            if key not in other and key != SECONDARY_OF_KEY:
                ctx.call("VM.add_to_other_config", copy, key, value)

        # The same MACs as the primary: the same identity on the network after a failover.
        primary_vifs = [ctx.call("VIF.get_record", v) for v in ctx.call("VM.get_VIFs", ctx.vm_ref)]
        want = {str(v["MAC"]).lower(): v for v in primary_vifs}
        copy_vifs = {v: ctx.call("VIF.get_record", v) for v in ctx.call("VM.get_VIFs", copy)}
        have = set()
        for ref, record in copy_vifs.items():
            mac = str(record["MAC"]).lower()
            if mac in want and mac not in have:
                have.add(mac)
            else:
                ctx.call("VIF.destroy", ref)
        for mac, record in want.items():
            if mac not in have:
                ctx.call("VIF.create", {
                    "device": record["device"], "network": record["network"], "VM": copy, "MAC": record["MAC"],
                    "MTU": record.get("MTU", "1500"), "other_config": record.get("other_config", {}),
                    "qos_algorithm_type": record.get("qos_algorithm_type", ""),
                    "qos_algorithm_params": record.get("qos_algorithm_params", {}),
                })

        footprint = int(ctx.params["secondary_memory"])
        ctx.progress(0.7, "Setting the secondary VM's memory…")
        if int(ctx.call("VM.get_memory_dynamic_max", copy)) != footprint:
            ctx.call("VM.set_memory_dynamic_range", copy, str(footprint), str(footprint))

        copy_disks = _disk_vbds(ctx, copy)
        for disk in ctx.disks():
            vbd = copy_disks.get(disk.userdevice)
            if vbd is None:
                raise StepFailed("REPLICA_MISSING", f"The secondary VM has no disk {disk.userdevice}: its copy is "
                                                    "incomplete. Unprotect, then protect again.")
            replica_uuid = ctx.call("VDI.get_uuid", vbd["VDI"])
            if replica_uuid == disk.primary_vdi_uuid:
                raise StepFailed("REPLICA_IS_PRIMARY", "The secondary VM's disk is the primary's own VDI.")
            if disk.replica_vdi_uuid != replica_uuid:
                ctx.disk_save(disk, replica_vdi_uuid=replica_uuid)
            _set_vdi_key(ctx, vbd["VDI"], disk.resource)
            if not disk.replica_tagged:
                ctx.disk_save(disk, replica_tagged=True)
        return {"secondary_vm": copy_uuid, "message": f"Secondary VM “{vm.name_label}{SECONDARY_SUFFIX}” made, "
                                                       f"with the primary's MACs and {footprint // 2**20} MiB."}

    @staticmethod
    def _copy(ctx: StepContext, sr_ref: str) -> str:
        """VM.copy (docs/level2.md, "The secondary VM"). XAPI copies only a halted VM or a snapshot: a running
        one is copied from a snapshot of it (the seed). The data copied does not matter (the AM's full resync
        fills the replica); the disks' shape does."""
        name = ctx.vm.name_label + SECONDARY_SUFFIX
        if ctx.call("VM.get_power_state", ctx.vm_ref) == "Halted":
            ctx.save_result({"copying": True})
            return ctx.call("VM.copy", ctx.vm_ref, name, sr_ref)
        snapshot = _our_snapshot(ctx)
        if snapshot is None:
            snapshot = ctx.call("VM.snapshot", ctx.vm_ref, ctx.vm.name_label + SEED_SUFFIX)
        ctx.save_result({"copying": True})
        return ctx.call("VM.copy", snapshot, name, sr_ref)

    @staticmethod
    def _drop_snapshot(ctx: StepContext) -> None:
        snapshot = _our_snapshot(ctx)
        if snapshot is None:
            return
        disks = [ctx.call("VDI.get_uuid", ctx.call("VBD.get_VDI", vbd)) for vbd in ctx.call("VM.get_VBDs", snapshot)
                 if ctx.call("VBD.get_type", vbd) == "Disk"]
        ctx.call("VM.destroy", snapshot)
        for uuid in disks:  # XAPI leaves a destroyed snapshot's disks behind
            vdi = _ref_by_uuid(ctx, "VDI", uuid)
            if vdi is not None and not ctx.call("VDI.get_VBDs", vdi):
                ctx.call("VDI.destroy", vdi)


class CreateSecondaryResources(Step):
    def run(self, ctx):
        disks = ctx.disks()
        vm_uuid = ctx.protection.secondary_vm_uuid
        for i, disk in enumerate(disks):
            am = ctx.am(disk.secondary_am_url)
            ctx.progress(0.1 + 0.8 * i / len(disks), f"Creating the replica of disk {disk.userdevice}…")
            res = am.resource_or_none(disk.resource)
            if res is None:
                vdi_ref = ctx.call("VDI.get_by_uuid", disk.replica_vdi_uuid)
                sr_uuid = ctx.call("SR.get_uuid", ctx.call("VDI.get_SR", vdi_ref))
                # The size too: on a host where the replica's image does not exist yet, the AM makes it.
                am.resource_create(name=disk.resource, role="secondary", sr=sr_uuid, vdi=disk.replica_vdi_uuid,
                                   vm=vm_uuid, size=disk.size or None, checkpoint=_checkpoint(ctx))
            elif res.get("role") != "Secondary":
                raise StepFailed("AM_RESOURCE_CLASH", f"The secondary's AM has {disk.resource} as {res.get('role')}, "
                                                      "not as a secondary replica.")
            if not disk.secondary_resource:
                ctx.disk_save(disk, secondary_resource=True)
        return {"message": f"{len(disks)} replica(s) created on the secondary's AM."}


def _sync_fraction(status: dict) -> float:
    if status.get("disk") == "UpToDate":
        return 1.0
    resync = status.get("resync") or {}
    total = resync.get("total") or 0
    return min(1.0, (resync.get("done") or 0) / total) if total else 0.0


class InitialSync(Step):
    """Wait, with progress, until every replica is UpToDate (bounded by EAC_AM_SYNC_TIMEOUT)."""

    def run(self, ctx):
        disks = ctx.disks()
        timeout = settings.EAC_AM_SYNC_TIMEOUT
        deadline = time.monotonic() + timeout
        while True:
            fractions = []
            for disk in disks:
                status = ctx.am(disk.secondary_am_url).resource(disk.resource)
                if status.get("split_brain") or status.get("needs_operator"):
                    raise StepFailed("AM_NEEDS_OPERATOR", f"The replica {disk.resource} needs an operator "
                                                          "(split brain): the protection stops here.")
                fraction = _sync_fraction(status)
                fractions.append(fraction)
                if disk.sync_state != status.get("disk") or abs(disk.sync_progress - fraction) >= 0.01:
                    ctx.disk_save(disk, sync_state=str(status.get("disk", "")), sync_progress=fraction)
            done = sum(fractions) / len(fractions)
            if all(f >= 1.0 for f in fractions):
                return {"message": f"{len(disks)} disk(s) copied to the secondary: every replica is UpToDate."}
            if time.monotonic() > deadline:
                raise StepFailed("SYNC_TIMEOUT", f"The initial copy to the secondary did not finish within "
                                                 f"{timeout:g} s ({done:.0%} done).")
            ctx.progress(done, f"Copying the disks to the secondary: {done:.0%}.")
            time.sleep(settings.EAC_AM_POLL_INTERVAL)


class StartSecondaryPaused(Step):
    """VM.start_on(secondary, start_paused=True): its memory is held on the secondary host, nothing runs."""

    def run(self, ctx):
        copy = _secondary_vm_ref(ctx)
        if copy is None:
            raise StepFailed("SECONDARY_GONE", "The secondary VM is gone: unprotect, then protect again.")
        host_ref = ctx.call("host.get_by_uuid", ctx.params["secondary_host"])
        host_name = ctx.call("host.get_name_label", host_ref)
        state = ctx.call("VM.get_power_state", copy)
        if state == "Paused" and ctx.call("VM.get_resident_on", copy) == host_ref:
            return {"message": f"The secondary VM holds its memory on {host_name}, paused."}
        if state != "Halted":
            raise StepFailed("SECONDARY_STATE", f"The secondary VM is {state.lower()}, not halted: it must only "
                                                "ever be started paused by the console.")
        ctx.progress(0.3, f"Starting the secondary VM paused on {host_name} (reserving its memory)…")
        start_paused(ctx, copy, host_ref, f"The secondary VM's memory could not be reserved on {host_name}: "
                     "{reason} The protection is aborted; unprotect removes what it made.")
        return {"message": f"The secondary VM holds its memory on {host_name}, paused."}


def start_paused(ctx, vm_ref, host_ref, refused: str) -> None:
    """``VM.start_on`` paused: the secondary VM's memory reserved on the host (hardened reservation). A refusal
    ends the step as SECONDARY_NOT_RESERVED with ``refused``, its ``{reason}`` replaced by XAPI's reason in words
    (not str.format: a host's name may hold braces); a transient error is raised for the runner to retry."""
    try:
        ctx.call("VM.start_on", vm_ref, host_ref, True, False)
    except XapiError as exc:
        if exc.transient:
            raise
        reason = xapi_error_describe(exc, ctx.pool)[1]
        raise StepFailed("SECONDARY_NOT_RESERVED", refused.replace("{reason}", reason), [exc.code]) from None


class VerifyLevel2(Step):
    def run(self, ctx):
        problems = []
        for disk in ctx.disks():
            vdi_ref = ctx.call("VDI.get_by_uuid", disk.primary_vdi_uuid)
            if ctx.call("VDI.get_other_config", vdi_ref).get(RESOURCE_KEY) != disk.resource:
                problems.append(f"disk {disk.userdevice} is not routed through the AM")
            primary = ctx.am(disk.primary_am_url).resource_or_none(disk.resource)
            secondary = ctx.am(disk.secondary_am_url).resource_or_none(disk.resource)
            if not primary or primary.get("role") != "Primary":
                problems.append(f"the primary's AM does not serve {disk.resource} as primary")
            if not secondary or secondary.get("disk") != "UpToDate":
                problems.append(f"the replica {disk.resource} is not UpToDate on the secondary")
        copy = _secondary_vm_ref(ctx)
        if copy is None or ctx.call("VM.get_power_state", copy) != "Paused":
            problems.append("the secondary VM is not paused on its host")
        if problems:
            raise StepFailed("VERIFY_MISMATCH", "Read back from the pool and the AMs: " + "; ".join(problems) + ".")
        return {"message": "Read back from the pool and the AMs: every disk is mirrored and the secondary waits, "
                           "paused."}


# -- Level 2 unprotect: exactly what protecting did, undone, from what the disk rows recorded ----------


class DestroySecondaryVM(Step):
    def run(self, ctx):
        copy = _secondary_vm_ref(ctx, adopt_untagged=False)
        if copy is None:
            return {"message": "There is no secondary VM: nothing to destroy."}
        if ctx.call("VM.get_power_state", copy) == "Running":
            # A secondary VM runs only after a takeover: it is the VM's service now, never destroyed here.
            raise StepFailed("SECONDARY_RUNNING", "The secondary VM runs (the VM failed over to it): it is not "
                                                  "stopped or destroyed, and nothing was undone.")
        # Its disks are destroyed by the step after the replicas' deletion: remember them first.
        replicas = sorted({ctx.call("VDI.get_uuid", vbd["VDI"]) for vbd in _disk_vbds(ctx, copy).values()})
        ctx.save_result({"replica_vdis": replicas})
        if ctx.call("VM.get_power_state", copy) != "Halted":
            ctx.progress(0.3, "Stopping the secondary VM…")
            ctx.call("VM.hard_shutdown", copy)
        ctx.progress(0.7, "Destroying the secondary VM…")
        ctx.call("VM.destroy", copy)
        return {"replica_vdis": replicas, "message": "The secondary VM is destroyed."}


class DeleteSecondaryResources(Step):
    def run(self, ctx):
        deleted = 0
        for disk in ctx.disks():
            if not disk.secondary_am_url:
                continue
            am = ctx.am(disk.secondary_am_url)
            res = am.resource_or_none(disk.resource)
            if res is not None:
                if res.get("role") == "Primary":
                    raise StepFailed("REPLICA_IS_PRIMARY", f"The secondary's AM serves {disk.resource} as primary "
                                                           "(after a failover?): it is not deleted.")
                am.resource_delete(disk.resource)
                deleted += 1
            if disk.secondary_resource:
                ctx.disk_save(disk, secondary_resource=False, sync_state="", sync_progress=0.0)
        return {"message": f"{deleted} replica(s) deleted on the secondary's AM."}


class DestroyReplicaVDIs(Step):
    def run(self, ctx):
        disks = ctx.disks()
        primaries = {d.primary_vdi_uuid for d in disks}
        replicas = {d.replica_vdi_uuid for d in disks if d.replica_vdi_uuid}
        replicas |= set(ctx.result_of("destroy_secondary_vm").get("replica_vdis", []))
        destroyed = 0
        for uuid in sorted(replicas - primaries):
            ref = _ref_by_uuid(ctx, "VDI", uuid)
            if ref is not None:
                if ctx.call("VDI.get_VBDs", ref):
                    raise StepFailed("REPLICA_IN_USE", f"The replica VDI {uuid} is attached to a VM: not destroyed.")
                ctx.call("VDI.destroy", ref)
                destroyed += 1
        for disk in disks:
            if disk.replica_vdi_uuid or disk.replica_tagged:
                ctx.disk_save(disk, replica_vdi_uuid="", replica_tagged=False)
        return {"message": f"{destroyed} replica disk(s) destroyed."}


class UnrouteDisks(Step):
    def run(self, ctx):
        disks = [d for d in ctx.disks() if d.routed or d.primary_resource]
        paused = _PausedVM(ctx)
        if not disks:
            paused.release()
            return {"message": "No disk was routed through the AM: nothing to undo."}
        with paused:
            for i, disk in enumerate(disks):
                ctx.progress(0.2 + 0.7 * i / len(disks), f"Giving disk {disk.userdevice} back to its host…")
                vdi_ref = _ref_by_uuid(ctx, "VDI", disk.primary_vdi_uuid)
                if vdi_ref is not None:
                    _remove_vdi_key(ctx, vdi_ref)
                if disk.routed:
                    ctx.disk_save(disk, routed=False)
                am = ctx.am(disk.primary_am_url)
                if am.resource_or_none(disk.resource) is not None:
                    try:
                        am.resource_delete(disk.resource)
                    except AMError as exc:
                        # The AM deletes only a secondary replica: a primary is demoted first (am/README.md).
                        if exc.status != 409:
                            raise
                        am.resource_action(disk.resource, "demote")
                        am.resource_delete(disk.resource)
                if disk.primary_resource:
                    ctx.disk_save(disk, primary_resource=False)
        return {"message": f"{len(disks)} disk(s) served by their host again; the VM runs on."}


class VerifyUnprotectedLevel2(Step):
    def run(self, ctx):
        problems = []
        for disk in ctx.disks():
            ref = _ref_by_uuid(ctx, "VDI", disk.primary_vdi_uuid)
            if ref is not None and RESOURCE_KEY in ctx.call("VDI.get_other_config", ref):
                problems.append(f"disk {disk.userdevice} is still routed through the AM")
            for url in {disk.primary_am_url, disk.secondary_am_url} - {""}:
                if ctx.am(url).resource_or_none(disk.resource) is not None:
                    problems.append(f"the AM at {ctx.am(url).where} still has {disk.resource}")
        if _secondary_vm_ref(ctx) is not None:
            problems.append("the secondary VM still exists")
        if problems:
            raise StepFailed("VERIFY_MISMATCH", "Read back from the pool and the AMs: " + "; ".join(problems) + ".")
        return {"message": "Read back from the pool and the AMs: nothing of the Level 2 protection is left."}


# -- Level 2 planned role swap: the whole VM to the other host of its pair, its client connections kept -------
#
# The run's params name the move: ``from_host`` / ``from_am`` (where the VM runs and whose AM serves its disks)
# and ``to_host`` / ``to_am`` (where its paused copy waits), and ``swapped`` (what Protection.swapped becomes).
# Each step looks at where things stand relative to that move, so a re-run after a worker died, or a second run
# of the same request, does only what is left.


def _swap_hosts(ctx: StepContext) -> tuple[str, str, str, str]:
    """(from ref, to ref, from name, to name) of the swap; StepFailed when a host left the pool."""
    found = []
    for role in ("from", "to"):
        ref = _ref_by_uuid(ctx, "host", ctx.params[f"{role}_host"])
        if ref is None:
            raise StepFailed("HOST_GONE", f"The host the swap goes {role} is no longer in the pool.")
        found.append(ref)
    return found[0], found[1], ctx.call("host.get_name_label", found[0]), ctx.call("host.get_name_label", found[1])


def _host_sees_sr(ctx: StepContext, host_ref: str, sr_ref: str) -> bool:
    for pbd in ctx.call("SR.get_PBDs", sr_ref):
        record = ctx.call("PBD.get_record", pbd)
        if record.get("host") == host_ref and record.get("currently_attached"):
            return True
    return False


def _wait_role(ctx: StepContext, am, resource: str, role: str, what: str) -> None:
    deadline = time.monotonic() + settings.EAC_AM_TIMEOUT * 3
    while (am.resource(resource) or {}).get("role") != role:
        if time.monotonic() > deadline:
            raise StepFailed("AM_ROLE_TIMEOUT", f"The AM at {am.where} does not say it is {role.lower()} of "
                                                f"{resource} ({what}).")
        time.sleep(settings.EAC_AM_POLL_INTERVAL)


class CheckSwap(Step):
    """Both AMs answer and see each other; the VM runs on one host of the pair, its copy waits paused (not
    running: that would be a failover); every replica on the target is UpToDate and connected; the VM's disks
    are on storage the target host sees (the VM moves there live, VM.pool_migrate)."""

    def run(self, ctx):
        from_ref, to_ref, from_name, to_name = _swap_hosts(ctx)
        for url, name in ((ctx.params["from_am"], from_name), (ctx.params["to_am"], to_name)):
            ctx.progress(0.2, f"Asking the AM of {name} how its pair is doing…")
            problems = pair_problems(ctx.am(url).status())
            if problems:
                raise StepFailed("AM_PAIR_NOT_READY", f"The AM of {name} says: " + "; ".join(problems)
                                 + ". A planned swap needs both links up and the witness reachable.")
        state, where = ctx.call("VM.get_power_state", ctx.vm_ref), ctx.call("VM.get_resident_on", ctx.vm_ref)
        if state != "Running" or where not in (from_ref, to_ref):
            raise StepFailed("VM_NOT_RUNNING", f"The VM is {state.lower()}, not running on {from_name}: only a "
                                               "running VM is swapped.")
        copy = _secondary_vm_ref(ctx)
        if copy is None:
            raise StepFailed("SECONDARY_GONE", "The secondary VM is gone: unprotect, then protect again.")
        if ctx.call("VM.get_power_state", copy) == "Running":
            raise StepFailed("SECONDARY_RUNNING", "The secondary VM runs (a failover happened): there is nothing "
                                                  "to swap with.")
        if where == from_ref:
            for device, vbd in sorted(_disk_vbds(ctx, ctx.vm_ref).items()):
                sr = ctx.call("VDI.get_SR", vbd["VDI"])
                if not _host_sees_sr(ctx, to_ref, sr):
                    sr_name = ctx.call("SR.get_name_label", sr)
                    raise StepFailed("VM_REQUIRES_SR", f"Disk {device} of the VM is on {sr_name}, which {to_name} "
                                                       "does not see: the VM cannot move there live (VM.pool_migrate).")
        frm, to = ctx.am(ctx.params["from_am"]), ctx.am(ctx.params["to_am"])
        for disk in ctx.disks():
            there = to.resource_or_none(disk.resource) or {}
            if there.get("role") == "Primary":
                continue  # already handed over by an earlier attempt
            here = frm.resource_or_none(disk.resource) or {}
            if (here.get("role") != "Primary" or there.get("disk") != "UpToDate"
                    or there.get("connection") != "Connected"):
                raise StepFailed("NOT_IN_SYNC", f"Disk {disk.userdevice}: the AM of {from_name} is "
                                                f"{here.get('role', 'without it')}, the replica on {to_name} is "
                                                f"{there.get('disk', 'missing')} ({there.get('connection', '?')}): "
                                                "a planned swap needs both replicas connected and UpToDate.")
        return {"message": f"Ready to move the VM from {from_name} to {to_name}: both AMs connected, every "
                           f"replica on {to_name} UpToDate."}


class HaltCopy(Step):
    """The paused copy on the target host is halted: the memory it holds there is what the VM needs."""

    def run(self, ctx):
        from_ref, to_ref, _, to_name = _swap_hosts(ctx)
        copy = _secondary_vm_ref(ctx)
        if copy is None:
            raise StepFailed("SECONDARY_GONE", "The secondary VM is gone: unprotect, then protect again.")
        state, where = ctx.call("VM.get_power_state", copy), ctx.call("VM.get_resident_on", copy)
        if state == "Halted" or (state == "Paused" and where == from_ref):
            return {"message": "The secondary VM holds no memory on " + to_name + "."}
        if state == "Running":
            raise StepFailed("SECONDARY_RUNNING", "The secondary VM runs (a failover happened): it is not halted.")
        ctx.progress(0.3, f"Halting the paused secondary VM on {to_name} to free its memory…")
        ctx.call("VM.hard_shutdown", copy)
        return {"message": f"The secondary VM is halted: its memory on {to_name} is free for the VM."}


class SwapDiskRoles(Step):
    """Each disk's roles handed over (POST …/swap on the current primary's AM): the target's AM serves it now;
    the VM's I/O on the old primary is forwarded there until the VM has moved."""

    def run(self, ctx):
        frm, to = ctx.am(ctx.params["from_am"]), ctx.am(ctx.params["to_am"])
        _, _, from_name, to_name = _swap_hosts(ctx)
        disks = ctx.disks()
        for i, disk in enumerate(disks):
            if (to.resource(disk.resource) or {}).get("role") == "Primary":
                continue
            ctx.progress(0.1 + 0.8 * i / len(disks), f"Handing disk {disk.userdevice} over to the AM of {to_name}…")
            frm.resource_action(disk.resource, "swap")
            _wait_role(ctx, to, disk.resource, "Primary", f"after the swap asked of {from_name}")
        return {"message": f"{len(disks)} disk(s) served by the AM of {to_name}; {from_name} holds the replicas."}


class MigrateVM(Step):
    """VM.pool_migrate to the target host: the running VM moves (its memory, its NIC, its connections)."""

    def run(self, ctx):
        from_ref, to_ref, from_name, to_name = _swap_hosts(ctx)
        if ctx.call("VM.get_resident_on", ctx.vm_ref) == to_ref:
            return {"message": f"The VM runs on {to_name}."}
        ctx.progress(0.2, f"Moving the running VM to {to_name}…")
        try:
            ctx.call("VM.pool_migrate", ctx.vm_ref, to_ref, {})
        except XapiError as exc:
            if exc.transient:
                raise
            undone = self._hand_back(ctx, from_ref, to_ref)
            raise StepFailed("MIGRATE_FAILED", f"The VM could not move to {to_name}: "
                             f"{xapi_error_describe(exc, ctx.pool)[1]} {undone}", [exc.code]) from None
        return {"message": f"The VM runs on {to_name}; its clients kept their connections."}

    @staticmethod
    def _hand_back(ctx: StepContext, from_ref: str, to_ref: str) -> str:
        """The VM stayed where it was: its disks back to its AM and its copy paused again on the target."""
        frm, to = ctx.am(ctx.params["from_am"]), ctx.am(ctx.params["to_am"])
        try:
            for disk in ctx.disks():
                if (to.resource(disk.resource) or {}).get("role") == "Primary":
                    to.resource_action(disk.resource, "swap")
                    _wait_role(ctx, frm, disk.resource, "Primary", "handed back")
            copy = _secondary_vm_ref(ctx)
            if copy is not None and ctx.call("VM.get_power_state", copy) == "Halted":
                ctx.call("VM.start_on", copy, to_ref, True, False)
        except (AMError, XapiError, StepFailed) as exc:
            return f"Handing the disks back failed too: {getattr(exc, 'sentence', None) or exc}"
        return "The disks were handed back and the secondary VM waits paused again: nothing changed."


class StartCopyOnFormerPrimary(Step):
    """The copy started paused on the former primary host (its memory reserved there), with that host's disks:
    the VDIs its AM replicates (the copy's own are on the other host's storage)."""

    def run(self, ctx):
        from_ref, _, from_name, _ = _swap_hosts(ctx)
        copy = _secondary_vm_ref(ctx)
        if copy is None:
            raise StepFailed("SECONDARY_GONE", "The secondary VM is gone: unprotect, then protect again.")
        state = ctx.call("VM.get_power_state", copy)
        if state == "Paused" and ctx.call("VM.get_resident_on", copy) == from_ref:
            return {"message": f"The secondary VM waits paused on {from_name}."}
        if state != "Halted":
            raise StepFailed("SECONDARY_STATE", f"The secondary VM is {state.lower()}, not halted.")
        am = ctx.am(ctx.params["from_am"])
        vbds = _disk_vbds(ctx, copy)
        for disk in ctx.disks():
            want = (am.resource(disk.resource) or {}).get("vdi")
            vbd = vbds.get(disk.userdevice)
            if not want or vbd is None or ctx.call("VDI.get_uuid", vbd["VDI"]) == want:
                continue
            ref = next(r for r in ctx.call("VM.get_VBDs", copy) if ctx.call("VBD.get_userdevice", r) == disk.userdevice)
            ctx.call("VBD.destroy", ref)
            ctx.call("VBD.create", {**{k: vbd[k] for k in ("userdevice", "bootable", "mode", "type", "empty",
                                                               "unpluggable", "other_config", "qos_algorithm_type",
                                                               "qos_algorithm_params")},
                                    "VM": copy, "VDI": ctx.call("VDI.get_by_uuid", want)})
        ctx.progress(0.5, f"Starting the secondary VM paused on {from_name} (reserving its memory)…")
        start_paused(ctx, copy, from_ref, f"The VM runs on its new host, but its copy could not be started paused "
                     f"on {from_name}: {{reason}} Start it paused there to be protected again.")
        return {"message": f"The secondary VM waits paused on {from_name}."}


class SetResourceVMs(Step):
    """Each AM told which VM runs on its side now (PATCH …{"vm"}): a later takeover unpauses the right one."""

    def run(self, ctx):
        frm, to = ctx.am(ctx.params["from_am"]), ctx.am(ctx.params["to_am"])
        copy_uuid = ctx.protection.secondary_vm_uuid
        for disk in ctx.disks():
            for am, vm_uuid in ((to, ctx.vm.uuid), (frm, copy_uuid)):
                if (am.resource(disk.resource) or {}).get("vm") != vm_uuid:
                    am.resource_set_vm(disk.resource, vm_uuid)
        return {"message": "Each AM knows the VM on its side: the VM on the new primary, its copy on the other."}


class ExchangeHosts(Step):
    """The protection's record follows: primary and secondary host (and their AMs) exchanged."""

    def run(self, ctx):
        p = ctx.params
        hosts = {h.uuid: h for h in ctx.pool.hosts.filter(uuid__in=[p["from_host"], p["to_host"]])}
        new_primary, new_secondary = hosts.get(p["to_host"]), hosts.get(p["from_host"])
        for disk in ctx.disks():
            if disk.primary_am_url != p["to_am"]:
                ctx.disk_save(disk, primary_host=new_primary, secondary_host=new_secondary,
                              primary_am_url=p["to_am"], secondary_am_url=p["from_am"])
        ctx.protection_save(secondary_host=new_secondary, observed_host=new_primary, observed_power_state="Running",
                            swapped=bool(p["swapped"]))
        return {"message": f"Primary {new_primary.name_label if new_primary else '?'}, secondary "
                           f"{new_secondary.name_label if new_secondary else '?'}."}


class VerifySwap(Step):
    def run(self, ctx):
        from_ref, to_ref, from_name, to_name = _swap_hosts(ctx)
        problems = []
        if ctx.call("VM.get_resident_on", ctx.vm_ref) != to_ref or ctx.call("VM.get_power_state",
                                                                             ctx.vm_ref) != "Running":
            problems.append(f"the VM does not run on {to_name}")
        copy = _secondary_vm_ref(ctx)
        if copy is None or ctx.call("VM.get_power_state", copy) != "Paused" or ctx.call(
                "VM.get_resident_on", copy) != from_ref:
            problems.append(f"the secondary VM is not paused on {from_name}")
        for disk in ctx.disks():
            there = ctx.am(ctx.params["to_am"]).resource_or_none(disk.resource) or {}
            if there.get("role") != "Primary" or there.get("vm") != ctx.vm.uuid:
                problems.append(f"the AM of {to_name} does not serve {disk.resource} as primary for the VM")
        if problems:
            raise StepFailed("VERIFY_MISMATCH", "Read back from the pool and the AMs: " + "; ".join(problems) + ".")
        return {"message": f"Read back: the VM runs on {to_name}, its copy waits paused on {from_name}, every disk "
                           f"served by the AM of {to_name} and mirrored to {from_name}."}


# -- pool settings -----------------------------------------------------------------------------


class SetFailuresToTolerate(Step):
    def run(self, ctx):
        target = int(ctx.params["failures_to_tolerate"])
        ctx.progress(0.3, f"Asking the pool to tolerate {target} host failure(s)…")
        ctx.call("pool.set_ha_host_failures_to_tolerate", ctx.pool_ref, str(target))
        got = int(ctx.call("pool.get_ha_host_failures_to_tolerate", ctx.pool_ref))
        if got != target:
            raise StepFailed("VERIFY_MISMATCH", f"Read back from the pool: it tolerates {got}, not {target}.")
        return {"message": f"The pool now tolerates {target} host failure(s)."}


class VerifyLevel3(VerifyLevel2):
    """Level 2's read-back, and: both AMs checkpoint each disk's resource with the epoch asked, and the secondary
    VM's VIFs carry the primary's MACs (the guest continues there with its MAC and address)."""

    def run(self, ctx):
        super().run(ctx)
        problems = []
        want = int(ctx.params.get("epoch_ms") or EPOCH_MS_DEFAULT)
        for disk in ctx.disks():
            for url in (disk.primary_am_url, disk.secondary_am_url):
                am = ctx.am(url)
                try:
                    cp = checkpoint_of(am.resource_or_none(disk.resource))
                except ValueError as exc:
                    problems.append(str(exc))
                    continue
                if cp is None:
                    problems.append(f"the AM at {am.where} does not checkpoint {disk.resource}")
                elif cp.epoch_ms != want:
                    problems.append(f"the AM at {am.where} checkpoints {disk.resource} every {cp.epoch_ms} ms, "
                                    f"not {want} ms")
        copy = _secondary_vm_ref(ctx)
        macs = sorted(_vm_macs(ctx, ctx.vm_ref))
        if copy is not None and sorted(_vm_macs(ctx, copy)) != macs:
            problems.append("the secondary VM's MACs are not the VM's")
        if problems:
            raise StepFailed("VERIFY_MISMATCH", "Read back from the pool and the AMs: " + "; ".join(problems) + ".")
        return {"message": f"Read back from the pool and the AMs: every disk is mirrored, the VM is checkpointed every "
                           f"{want} ms to its paused secondary, which has its MACs ({', '.join(macs)})."}


LEVEL2_WORKFLOWS: dict[str, list[Step]] = {
    RunKind.PROTECT: [
        CheckAMs("check_ams", "Check both Availability Managers and both links"),
        RouteDisks("route_disks", "Route the VM's disks through the primary's AM"),
        CreateSecondaryVM("create_secondary_vm", "Create the secondary VM on the secondary host"),
        CreateSecondaryResources("create_replicas", "Create the replicas on the secondary's AM"),
        InitialSync("initial_sync", "Copy the disks to the secondary (initial sync)"),
        StartSecondaryPaused("start_secondary", "Start the secondary VM paused (reserve its memory)"),
        VerifyLevel2("verify", "Read back and verify"),
    ],
    RunKind.UNPROTECT: [
        DestroySecondaryVM("destroy_secondary_vm", "Stop and destroy the secondary VM"),
        DeleteSecondaryResources("delete_replicas", "Delete the replicas on the secondary's AM"),
        DestroyReplicaVDIs("destroy_replica_vdis", "Destroy the replica disks"),
        UnrouteDisks("unroute_disks", "Give the disks back to their host (VM paused a moment)"),
        VerifyUnprotectedLevel2("verify", "Read back and verify"),
    ],
    RunKind.SWAP: [
        CheckSwap("check_swap", "Check both AMs, the replicas and where the VM can go"),
        HaltCopy("halt_copy", "Halt the paused copy on the other host (free its memory)"),
        SwapDiskRoles("swap_disks", "Hand each disk over to the other host's AM"),
        MigrateVM("migrate_vm", "Move the running VM to the other host (live)"),
        # Once the VM has moved, the AMs and the protection say so at once: a copy that cannot be started then
        # is the secondary VM's degraded component, with its repair, on a record that is otherwise right.
        SetResourceVMs("set_resource_vms", "Tell each AM which VM is on its side"),
        ExchangeHosts("exchange_hosts", "Record the new primary and secondary hosts"),
        StartCopyOnFormerPrimary("start_copy", "Start the copy paused on the former primary host"),
        VerifySwap("verify", "Read back and verify"),
    ],
}

# Level 3 = Level 2 plus checkpointing: the same steps (its resources made with a ``checkpoint``: ``_checkpoint``),
# after a look at the VM itself, and a read-back of the checkpointing. Unprotect and the planned swap are Level 2's.
LEVEL3_WORKFLOWS: dict[str, list[Step]] = {
    RunKind.PROTECT: [
        CheckLevel3VM("check_vm", "Check the VM has one vCPU and 1 to 8 network interfaces"),
        *LEVEL2_WORKFLOWS[RunKind.PROTECT][:-1],
        VerifyLevel3("verify", "Read back and verify (checkpointing too)"),
    ],
}

WORKFLOWS: dict[str, list[Step]] = {
    RunKind.PROTECT: [
        CheckAgile("check_agile", "Check the VM can restart on any host"),
        CheckPlan("check_plan", "Check the failover plan holds with the VM"),
        EnableHA("enable_ha", "Enable high availability on the pool"),
        ApplySettings("apply_settings", "Set restart priority, order and start delay"),
        VerifyProtected("verify", "Read back and verify"),
    ],
    RunKind.UNPROTECT: [
        RestoreSettings("restore_settings", "Restore restart priority, order and start delay"),
        DisableHAIfOurs("disable_ha", "Disable high availability if this protection turned it on"),
        VerifyUnprotected("verify", "Read back and verify"),
    ],
    RunKind.SET_FAILURES_TO_TOLERATE: [
        SetFailuresToTolerate("set_ftt", "Set the host failures to tolerate"),
    ],
}


def steps_for(kind: str, level: int = Level.BASIC_RESTART) -> list[Step]:
    """The steps of a workflow: Level 2 protects, unprotects and swaps with its own, Level 3 protects with its own
    and otherwise as Level 2; the rest are Level 1's."""
    if int(level) == Level.SYSTEM_FT and kind in LEVEL3_WORKFLOWS:
        return LEVEL3_WORKFLOWS[kind]
    if uses_ams(int(level)) and kind in LEVEL2_WORKFLOWS:
        return LEVEL2_WORKFLOWS[kind]
    return WORKFLOWS[kind]


def step_named(kind: str, name: str, level: int = Level.BASIC_RESTART) -> Step:
    for step in steps_for(kind, level):
        if step.name == name:
            return step
    raise KeyError(name)
