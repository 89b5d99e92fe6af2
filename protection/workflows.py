"""Workflows as named steps (after Masakari): the lists are data, the engine runs them.

Each step is idempotent: it first looks at what is already true in XAPI and
only then acts, so a step re-run after its worker died does no harm. A step
may keep what it found in ``result`` for the steps after it (and for undo).
The engine (``engine.workflow_run_execute``) runs the steps in order,
skipping those already done, and records progress, messages, attempts and
times on each.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .choices import RestartPriority, RunKind

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


def steps_for(kind: str) -> list[Step]:
    return WORKFLOWS[kind]


def step_named(kind: str, name: str) -> Step:
    for step in WORKFLOWS[kind]:
        if step.name == name:
            return step
    raise KeyError(name)
