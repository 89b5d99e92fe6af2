"""Writes of protection: start and stop protection, run workflows, observe failovers, audit.

Every service is keyword-only, runs in ``transaction.atomic`` and emits its
realtime events on commit (``eac.realtime``). Celery tasks (``tasks.py``) and
views only call these.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import F, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from alerts import services as alerts
from alerts.choices import Condition
from eac.realtime import emit, emit_many, pool_group
from inventory.choices import ConnectionState
from inventory.models import VM, Host, Pool

from . import selectors
from .choices import (
    AVAILABLE_LEVELS,
    UNAVAILABLE_REASON,
    AuditAction,
    Level,
    ProtectionStatus,
    RestartPriority,
    RunKind,
    RunState,
    StepState,
)
from .models import AuditEntry, FailoverEvent, Protection, WorkflowRun, WorkflowStep
from .permissions import user_can_change_protection
from .workflows import StepFailed, step_named, steps_for
from .xapi_errors import describe_exception, is_transient

log = logging.getLogger(__name__)

RUNNING_STATES = ("Running", "Paused")
ACTIVE_RUN_STATES = (RunState.PENDING, RunState.RUNNING)


class Conflict(Exception):
    """The request is valid but the state of things refuses it (HTTP 409)."""

    def __init__(self, message: str, reasons: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reasons = reasons or []



def run_group(run_id: int) -> str:
    """Channel-layer group of one workflow run's progress."""
    return f"workflow.{run_id}"


# -- audit ---------------------------------------------------------------------------------------


def audit_record(
    *,
    user,
    action: str,
    via: str = "system",
    remote_addr: str | None = None,
    pool: Pool | None = None,
    vm: VM | None = None,
    object_repr: str = "",
    detail: dict | None = None,
) -> AuditEntry:
    """Write one line of the audit log: who, what, when, from where."""
    real_user = user if getattr(user, "is_authenticated", False) else None
    return AuditEntry.objects.create(
        user=real_user,
        username=real_user.get_username() if real_user else "",
        action=action,
        via=via,
        remote_addr=remote_addr or None,
        pool=pool,
        vm=vm,
        object_repr=(object_repr or str(vm or pool or ""))[:255],
        detail=detail or {},
    )


# -- starting and stopping protection -------------------------------------------------------------


def _require_administrator(user) -> None:
    if not user_can_change_protection(user):
        raise PermissionDenied("Only members of the Administrators group can change protection.")


def _clean_settings(vm: VM, raw: dict[str, Any]) -> dict[str, Any]:
    errors: dict[str, str] = {}
    out: dict[str, Any] = {}
    priority = raw.get("restart_priority") or RestartPriority.RESTART
    if priority not in RestartPriority.values:
        errors["restart_priority"] = f"Must be one of: {', '.join(RestartPriority.values)}."
    out["restart_priority"] = str(priority)
    for name, upper in (("order", 10_000), ("start_delay", 86_400)):
        value = raw.get(name, 0)
        try:
            value = int(value)
        except (TypeError, ValueError):
            errors[name] = "Must be a whole number."
            continue
        if not 0 <= value <= upper:
            errors[name] = f"Must be between 0 and {upper}."
        out[name] = value
    hosts = Host.objects.filter(pool=vm.pool).count()
    ftt = raw.get("failures_to_tolerate")
    if ftt not in (None, ""):
        try:
            ftt = int(ftt)
        except (TypeError, ValueError):
            errors["failures_to_tolerate"] = "Must be a whole number."
        else:
            if not 0 <= ftt < max(hosts, 1):
                errors["failures_to_tolerate"] = (
                    f"Must be between 0 and {max(hosts - 1, 0)} for a pool of {hosts} hosts."
                )
            out["failures_to_tolerate"] = ftt
    sr = raw.get("heartbeat_sr") or ""
    if sr:
        if not selectors.heartbeat_sr_candidates(vm.pool).filter(uuid=sr).exists():
            errors["heartbeat_sr"] = "Not a shared SR attached to every host of the VM's pool."
        out["heartbeat_sr"] = str(sr)
    if errors:
        raise ValidationError(errors)
    return out


def protection_start(
    *,
    vm: VM,
    level: int,
    settings: dict[str, Any] | None = None,
    requested_by,
    via: str = "api",
    remote_addr: str | None = None,
    preflight: bool = True,
) -> WorkflowRun:
    """Protect ``vm`` at ``level``: record the protection and enqueue its workflow (HTTP 202).

    Raises PermissionDenied (not an Administrator), ValidationError (bad level or settings) or
    Conflict (the VM cannot be protected as things stand, with the preflight's reasons).
    """
    _require_administrator(requested_by)
    try:
        level = Level(int(level))
    except (TypeError, ValueError):
        raise ValidationError({"level": "Must be 1, 2 or 3."}) from None
    if level not in AVAILABLE_LEVELS:
        raise ValidationError({"level": f"Level {level.value} is not available yet. {UNAVAILABLE_REASON[level]}"})
    if vm.is_a_template or vm.is_control_domain or vm.is_a_snapshot:
        raise ValidationError({"vm": "Only ordinary VMs can be protected (not templates, snapshots or dom0)."})
    clean = _clean_settings(vm, settings or {})
    with transaction.atomic():
        vm = VM.objects.select_for_update().select_related("pool").get(pk=vm.pk)
        pool = vm.pool
        if WorkflowRun.objects.filter(vm=vm, state__in=ACTIVE_RUN_STATES).exists():
            raise Conflict("A workflow is already running for this VM: wait for it to finish.")
        existing = Protection.objects.filter(vm=vm).first()
        if existing and existing.status in (ProtectionStatus.PROTECTED, ProtectionStatus.DEGRADED) and all(
            getattr(existing, k) == clean[k] for k in ("restart_priority", "order", "start_delay")
        ) and existing.level == level:
            raise Conflict("The VM is already protected at this level with these settings.")
        if preflight:
            check = selectors.protection_preflight(vm=vm, level=level, settings=clean)
            blocking = [c["message"] for c in check["checks"] if c["blocking"]]
            if blocking:
                raise Conflict("The VM cannot be protected as things stand.", blocking)
            if not pool.ha_enabled and not clean.get("heartbeat_sr"):
                raise ValidationError({"heartbeat_sr": "High availability is off on this pool: choose the shared "
                                                       "SR for its heartbeat."})
        if not pool.ha_enabled:
            clean.setdefault("failures_to_tolerate", 1)
        if existing is None:
            existing = Protection(vm=vm, pool=pool, created_by=requested_by)
        elif existing.previous_settings:
            clean["previous"] = existing.previous_settings
        existing.level = level
        existing.status = ProtectionStatus.PROTECTING
        existing.status_reason = ""
        for key in ("restart_priority", "order", "start_delay"):
            setattr(existing, key, clean[key])
        existing.save()
        run = _run_create(kind=RunKind.PROTECT, pool=pool, vm=vm, protection=existing, params=clean,
                          requested_by=requested_by, remote_addr=remote_addr)
        audit_record(user=requested_by, action=AuditAction.PROTECT, via=via, remote_addr=remote_addr, pool=pool,
                     vm=vm, detail={"level": int(level), "settings": clean, "run": run.pk})
        _emit_vm(vm)
    return run


def protection_stop(
    *, protection: Protection, requested_by, via: str = "api", remote_addr: str | None = None
) -> WorkflowRun:
    """Unprotect: undo exactly what protecting did (restart priority, order, delay; HA if ours)."""
    _require_administrator(requested_by)
    with transaction.atomic():
        protection = Protection.objects.select_for_update().select_related("vm", "pool").get(pk=protection.pk)
        vm = protection.vm
        if WorkflowRun.objects.filter(vm=vm, state__in=ACTIVE_RUN_STATES).exists():
            raise Conflict("A workflow is already running for this VM: wait for it to finish.")
        params = {
            # None: the protection never got as far as changing the VM, so there is nothing to undo.
            "previous": protection.previous_settings or None,
            "ha_enabled_by_console": protection.ha_enabled_by_console,
        }
        protection.status = ProtectionStatus.UNPROTECTING
        protection.status_reason = ""
        protection.save(update_fields=["status", "status_reason", "updated_at"])
        run = _run_create(kind=RunKind.UNPROTECT, pool=protection.pool, vm=vm, protection=protection,
                          params=params, requested_by=requested_by, remote_addr=remote_addr)
        audit_record(user=requested_by, action=AuditAction.UNPROTECT, via=via, remote_addr=remote_addr,
                     pool=protection.pool, vm=vm, detail={"run": run.pk})
        _emit_vm(vm)
    return run


def pool_failures_to_tolerate_set(
    *, pool: Pool, failures_to_tolerate: int, requested_by, via: str = "api", remote_addr: str | None = None
) -> WorkflowRun:
    """Ask the pool to tolerate ``failures_to_tolerate`` host failures; refused with the reason when the
    plan cannot meet it (our planner says why; XAPI would only say HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN)."""
    _require_administrator(requested_by)
    try:
        n = int(failures_to_tolerate)
    except (TypeError, ValueError):
        raise ValidationError({"failures_to_tolerate": "Must be a whole number."}) from None
    hosts = Host.objects.filter(pool=pool).count()
    if not 0 <= n < max(hosts, 1):
        raise ValidationError({"failures_to_tolerate": f"Must be between 0 and {max(hosts - 1, 0)}."})
    with transaction.atomic():
        if WorkflowRun.objects.filter(pool=pool, kind=RunKind.SET_FAILURES_TO_TOLERATE,
                                      state__in=ACTIVE_RUN_STATES).exists():
            raise Conflict("The host failures to tolerate of this pool are being changed already.")
        reason = selectors.plan_refusal_reason(pool, n)
        if reason:
            audit_record(user=requested_by, action=AuditAction.SET_FAILURES_TO_TOLERATE_REFUSED, via=via,
                         remote_addr=remote_addr, pool=pool, object_repr=pool.name,
                         detail={"failures_to_tolerate": n, "reason": reason})
        else:
            run = _run_create(kind=RunKind.SET_FAILURES_TO_TOLERATE, pool=pool, vm=None, protection=None,
                              params={"failures_to_tolerate": n}, requested_by=requested_by,
                              remote_addr=remote_addr)
            audit_record(user=requested_by, action=AuditAction.SET_FAILURES_TO_TOLERATE, via=via,
                         remote_addr=remote_addr, pool=pool, object_repr=pool.name,
                         detail={"failures_to_tolerate": n, "run": run.pk})
    if reason:
        # The refusal is audited (committed above), then reported.
        raise Conflict(f"The pool cannot tolerate {n} host failure(s).", [reason])
    return run


def _run_create(*, kind: str, pool: Pool, vm: VM | None, protection: Protection | None, params: dict,
                requested_by, remote_addr: str | None) -> WorkflowRun:
    from .tasks import workflow_run as workflow_run_task

    run = WorkflowRun.objects.create(
        kind=kind, pool=pool, vm=vm, vm_name=(vm.name_label if vm else "")[:255], protection=protection,
        params=params, created_by=requested_by if getattr(requested_by, "is_authenticated", False) else None,
        remote_addr=remote_addr or None,
    )
    WorkflowStep.objects.bulk_create(
        WorkflowStep(run=run, position=i, name=step.name, label=step.label) for i, step in enumerate(steps_for(kind))
    )
    workflow_run_task.delay_on_commit(run.pk)
    return run


# -- running workflows ----------------------------------------------------------------------------


class LeaseLost(Exception):
    """Another worker holds the run now (ours was presumed dead): stop touching it."""


class StepContext:
    """What a step sees: the run's parameters, XAPI calls, progress reporting, earlier results."""

    def __init__(self, engine: _Engine, step: WorkflowStep) -> None:
        self.engine = engine
        self.run = engine.run
        self.step = step
        self.params: dict[str, Any] = engine.run.params or {}
        self.pool: Pool = engine.run.pool

    @property
    def vm_ref(self) -> str:
        vm = self.run.vm
        if vm is None:
            raise StepFailed("VM_GONE", "The VM no longer exists in the pool.")
        return vm.ref

    @property
    def pool_ref(self) -> str:
        if not self.pool.ref:
            refs = self.call("pool.get_all")
            self.pool.ref = refs[0]
        return self.pool.ref

    def call(self, method: str, *args: Any) -> Any:
        return self.engine.client().call(method, *args)

    def progress(self, fraction: float, message: str) -> None:
        self.engine.step_update(self.step, progress=max(0.0, min(1.0, fraction)), message=message)

    def save_result(self, values: dict) -> None:
        self.step.result = {**(self.step.result or {}), **values}
        self.engine.step_update(self.step, result=self.step.result)

    def protected_vm_refs(self) -> dict[str, str]:
        """The pool's other protected VMs (ref: restart priority), this run's VM left out."""
        return selectors.protected_vm_refs(self.pool, exclude_vm_id=self.run.vm_id)

    def plan_blockers(self, target: int) -> str:
        vm = self.run.vm
        plan = selectors.pool_planner(self.pool, add_vm=vm)
        return selectors.plan_blockers_text(plan, target)

    def previous_settings(self) -> dict | None:
        """What the VM had before it was protected, or None if protecting never changed it."""
        return self.params.get("previous") or None

    def ha_enabled_by_console(self) -> bool:
        return bool(self.params.get("ha_enabled_by_console"))


class _Engine:
    def __init__(self, run: WorkflowRun, worker: str) -> None:
        self.run = run
        self.worker = worker
        self._client = None
        self.lease = timedelta(seconds=settings.EAC_WORKFLOW_LEASE)

    def client(self):
        if self._client is None:
            from inventory.xapi import pool_client

            self._client = pool_client(self.run.pool)
        return self._client

    def drop_client(self) -> None:
        if self._client is not None:
            self._client.logout()
            self._client = None

    def _fenced(self) -> Q:
        return Q(pk=self.run.pk, claimed_by=self.worker, state=RunState.RUNNING)

    def renew(self, **fields) -> None:
        """Extend our lease (and write ``fields`` on the run) only if we still hold the run."""
        now = timezone.now()
        if not WorkflowRun.objects.filter(self._fenced()).update(**{"lease_until": now + self.lease, **fields}):
            raise LeaseLost()

    def step_update(self, step: WorkflowStep, **fields) -> None:
        with transaction.atomic():
            self.renew()
            for key, value in fields.items():
                setattr(step, key, value)
            WorkflowStep.objects.filter(pk=step.pk).update(**fields)
            if "progress" in fields or "state" in fields:
                total = _run_progress(self.run.pk)
                WorkflowRun.objects.filter(pk=self.run.pk).update(progress=total)
            emit(run_group(self.run.pk), {"type": "protection.progress", "run": self.run.pk})


def _run_progress(run_id: int) -> float:
    rows = list(WorkflowStep.objects.filter(run_id=run_id).values_list("state", "progress"))
    if not rows:
        return 1.0
    return sum(1.0 if state == StepState.DONE else progress for state, progress in rows) / len(rows)


def worker_name(task_id: str | None = None) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{task_id or '-'}"


def workflow_run_execute(*, run_id: int, worker: str) -> str:
    """Claim run ``run_id`` and run its unfinished steps in order. Returns what happened, in a word.

    The claim is one conditional UPDATE: a pending run, or a running one whose lease expired (its worker
    died). Steps already done are skipped; the step that was running when a worker died runs again
    (steps are idempotent). A run claimed more than ``EAC_WORKFLOW_MAX_CLAIMS`` times fails: a workflow
    that keeps killing its worker must not loop forever.
    """
    now = timezone.now()
    lease = timedelta(seconds=settings.EAC_WORKFLOW_LEASE)
    claimed = WorkflowRun.objects.filter(
        Q(pk=run_id) & (Q(state=RunState.PENDING) | Q(state=RunState.RUNNING, lease_until__lt=now))
    ).update(
        state=RunState.RUNNING, claimed_by=worker, lease_until=now + lease, claims=F("claims") + 1,
        started_at=Coalesce("started_at", now),
    )
    if not claimed:
        return "not-claimed"
    run = WorkflowRun.objects.select_related("pool", "vm", "protection").get(pk=run_id)
    engine = _Engine(run, worker)
    if run.claims > settings.EAC_WORKFLOW_MAX_CLAIMS:
        _run_finish(engine, failed=("TOO_MANY_ATTEMPTS", f"Gave up after {run.claims - 1} attempts: the worker "
                                    "running this workflow kept stopping before it finished.", []), step=None)
        return "failed"
    emit(run_group(run.pk), {"type": "protection.progress", "run": run.pk})
    try:
        for step in run.steps.order_by("position"):
            if step.state == StepState.DONE:
                continue
            failure = _step_execute(engine, step)
            if failure is not None:
                _run_finish(engine, failed=failure, step=step)
                return "failed"
        _run_finish(engine, failed=None, step=None)
        return "succeeded"
    except LeaseLost:
        log.warning("workflow %s: lease lost to another worker, stopping", run_id)
        return "lease-lost"
    finally:
        engine.drop_client()


def _step_execute(engine: _Engine, step: WorkflowStep) -> tuple[str, str, list] | None:
    """Run one step with retries of transient XAPI errors. None if done, else (code, sentence, params)."""
    impl = step_named(engine.run.kind, step.name)
    retries = settings.EAC_WORKFLOW_STEP_RETRIES
    base = settings.EAC_WORKFLOW_RETRY_DELAY
    attempt = 0
    while True:
        attempt += 1
        now = timezone.now()
        engine.step_update(step, state=StepState.RUNNING, attempts=step.attempts + 1,
                           started_at=step.started_at or now, message=step.message or "Starting…",
                           error_code="", error_params=[])
        ctx = StepContext(engine, step)
        try:
            result = impl.run(ctx) or {}
        except LeaseLost:
            raise
        except StepFailed as exc:
            return exc.code, exc.message, exc.params
        except Exception as exc:
            from inventory.xapi import XapiError

            if not isinstance(exc, XapiError):
                log.exception("workflow %s step %s: unexpected error", engine.run.pk, step.name)
                return describe_exception(exc, engine.run.pool) + ([],)
            code, sentence = describe_exception(exc, engine.run.pool)
            if is_transient(exc) and attempt <= retries:
                delay = min(base * 2 ** (attempt - 1), 30.0)
                engine.step_update(step, message=f"{sentence} Retrying in {delay:g} s (attempt {attempt + 1}).")
                engine.drop_client()
                time.sleep(delay)
                continue
            return code, sentence, list(exc.params)
        merged = {**(step.result or {}), **{k: v for k, v in result.items() if k != "message"}}
        engine.step_update(step, state=StepState.DONE, progress=1.0, finished_at=timezone.now(),
                           message=result.get("message", "Done."), result=merged)
        return None


def _run_finish(engine: _Engine, *, failed: tuple[str, str, list] | None, step: WorkflowStep | None) -> None:
    run = engine.run
    now = timezone.now()
    with transaction.atomic():
        if step is not None and failed is not None:
            engine.step_update(step, state=StepState.FAILED, finished_at=now, message=failed[1],
                               error_code=failed[0], error_params=[str(p) for p in failed[2]])
        fields = {"state": RunState.FAILED if failed else RunState.SUCCEEDED, "finished_at": now,
                  "lease_until": None}
        if failed:
            fields.update(error_code=failed[0], error_message=failed[1])
        else:
            fields.update(progress=1.0)
        engine.renew(**fields)
        for key, value in fields.items():
            setattr(run, key, value)
        _after_run(run, failed)
        emit(run_group(run.pk), {"type": "protection.progress", "run": run.pk})


def _step_results(run: WorkflowRun) -> dict[str, dict]:
    return {s.name: s.result or {} for s in WorkflowStep.objects.filter(run=run)}


def _after_run(run: WorkflowRun, failed: tuple[str, str, list] | None) -> None:
    """What a finished run means for the protection, the audit log and the alerts."""
    protection = Protection.objects.select_for_update().filter(pk=run.protection_id).first()
    results = _step_results(run)
    vm = run.vm
    object_key = f"vm:{vm.uuid}" if vm else f"pool:{run.pool.uuid}"
    if protection is not None and run.kind == RunKind.PROTECT:
        # Remember what XAPI had before us as soon as we changed it, even if a later step failed.
        previous = results.get("apply_settings", {}).get("previous")
        if previous and not protection.previous_settings:
            protection.previous_settings = previous
        enable = results.get("enable_ha", {})
        if enable.get("enabled_by_console") or enable.get("enabling"):
            protection.ha_enabled_by_console = True
    if failed:
        code, sentence, _ = failed
        if protection is not None:
            protection.status = ProtectionStatus.FAILED
            protection.status_reason = sentence
            protection.save()
        audit_record(user=None, action=AuditAction.WORKFLOW_FAILED, pool=run.pool, vm=vm,
                     object_repr=run.vm_name or run.pool.name,
                     detail={"run": run.pk, "kind": run.kind, "code": code, "message": sentence})
        alerts.alert_raise(
            condition=Condition.WORKFLOW_FAILED, object_key=object_key, pool=run.pool,
            vm_name=run.vm_name, old_state=run.get_kind_display().lower() + " running", new_state="failed",
            message=f"{run.get_kind_display()} of {run.vm_name or run.pool.name} failed: {sentence}",
            details={"run": run.pk, "code": code},
        )
    else:
        if run.kind == RunKind.PROTECT and protection is not None:
            protection.status = ProtectionStatus.PROTECTED
            protection.status_reason = ""
            if vm is not None and vm.power_state in RUNNING_STATES:
                protection.observed_host_id = vm.resident_on_id
                protection.observed_power_state = vm.power_state
            protection.save()
            audit_record(user=None, action=AuditAction.PROTECTED, pool=run.pool, vm=vm, detail={"run": run.pk})
        elif run.kind == RunKind.UNPROTECT and protection is not None:
            protection.delete()
            audit_record(user=None, action=AuditAction.UNPROTECTED, pool=run.pool, vm=vm, detail={"run": run.pk})
        alerts.alert_clear(condition=Condition.WORKFLOW_FAILED, object_key=object_key,
                           message=f"{run.get_kind_display()} of {run.vm_name or run.pool.name} succeeded.",
                           new_state="succeeded")
    if vm is not None:
        _emit_vm(vm)


def _emit_vm(vm: VM) -> None:
    """Tell the pages showing ``vm`` to re-render it (the tree's icon reads the protection): as a change
    of the VM, and as a change of class "protection", which may move it between the summary's groups."""
    group = pool_group(vm.pool.uuid)
    emit_many([
        (group, {"type": "inventory.change", "pool": vm.pool.uuid, "cls": cls, "uuid": vm.uuid, "op": "mod"})
        for cls in ("vm", "protection")
    ])


def workflow_sweep() -> dict[str, int]:
    """Resume runs whose worker died (lease expired), re-enqueue pending runs nobody took, fail the hopeless.

    Called by Celery beat. Enqueuing twice is harmless: only one worker can claim a run.
    """
    from .tasks import workflow_run as workflow_run_task

    now = timezone.now()
    stale_pending = now - timedelta(seconds=settings.EAC_WORKFLOW_PENDING_RESEND)
    resumed = list(WorkflowRun.objects.filter(state=RunState.RUNNING, lease_until__lt=now).values_list("pk", flat=True))
    lost = list(WorkflowRun.objects.filter(state=RunState.PENDING, created_at__lt=stale_pending)
                .values_list("pk", flat=True))
    for pk in [*resumed, *lost]:
        workflow_run_task.delay(pk)
    return {"resumed": len(resumed), "resent": len(lost)}


# -- observing the pool: failovers, plan, hosts ----------------------------------------------------


def protection_observe_changes(*, pool: Pool, changed: dict[str, set[str]] | None = None) -> None:
    """Called by the watcher after each committed batch: re-evaluate what the changes may mean.

    ``changed`` maps XAPI class names ("host", "vm", "pool", …) to the uuids that changed; any change
    to hosts or the pool re-evaluates the whole pool (a pool has few hosts), a change to VMs only the
    protections of those VMs. Raises nothing: a failure here is logged and the beat sweep catches up.
    """
    changed = {str(k).lower(): set(v or ()) for k, v in (changed or {}).items()}
    whole = not changed or any(k.startswith(("host", "pool")) for k in changed)
    vm_uuids = set().union(*(v for k, v in changed.items() if k.startswith("vm"))) if changed else set()
    try:
        protection_evaluate_pool(pool=pool, vm_uuids=None if whole else vm_uuids)
    except Exception:
        log.exception("protection: evaluating pool %s failed", pool.pk)


def protection_evaluate_pool(*, pool: Pool, vm_uuids: set[str] | None = None) -> None:
    """Bring alerts, failover events and protection statuses in line with the inventory of ``pool``."""
    pool = Pool.objects.get(pk=pool.pk)
    with transaction.atomic():
        _evaluate_reachability(pool)
        if pool.connection_state != ConnectionState.CONNECTED:
            return  # the inventory is stale: judge hosts and VMs only from fresh data
        hosts = {h.pk: h for h in Host.objects.filter(pool=pool)}
        if vm_uuids is None:
            _evaluate_hosts(pool, hosts.values())
        plan_ok = _evaluate_plan(pool)
        protections = Protection.objects.filter(pool=pool).select_related("vm").select_for_update(of=("self",))
        if vm_uuids is not None:
            if not vm_uuids:
                return
            protections = protections.filter(vm__uuid__in=vm_uuids)
        # The open failovers of the pool in one query, not two per protected VM.
        open_events: dict[tuple[str, str], FailoverEvent] = {}
        for event in FailoverEvent.objects.select_for_update().filter(
            pool=pool, state__in=[FailoverEvent.State.DOWN, FailoverEvent.State.FAILED]
        ).order_by("detected_at"):
            open_events[(event.vm_uuid, event.state)] = event
        for protection in protections:
            _evaluate_protection(protection, hosts, plan_ok, open_events)


def _evaluate_reachability(pool: Pool) -> None:
    key = f"pool:{pool.uuid or pool.pk}"
    if pool.connection_state == ConnectionState.UNREACHABLE:
        if not alerts.alert_is_open(condition=Condition.POOL_UNREACHABLE, object_key=key):
            alerts.alert_raise(
                condition=Condition.POOL_UNREACHABLE, object_key=key, pool=pool, old_state="connected",
                new_state="unreachable",
                message=f"The console cannot reach pool {pool.name}: {pool.last_error or 'no answer'}",
            )
    elif pool.connection_state == ConnectionState.CONNECTED:
        alerts.alert_clear(condition=Condition.POOL_UNREACHABLE, object_key=key, new_state="connected",
                           message=f"The console reaches pool {pool.name} again.")


def _evaluate_hosts(pool: Pool, hosts) -> None:
    open_lost = alerts.open_object_keys(condition=Condition.HOST_LOST, pool=pool)
    for host in hosts:
        key = f"host:{host.uuid}"
        if not host.live and key not in open_lost:
            alerts.alert_raise(
                condition=Condition.HOST_LOST, object_key=key, pool=pool, host_name=host.name_label,
                old_state="live", new_state="not live",
                message=f"Host {host.name_label} of pool {pool.name} is lost (not live).",
                details={"host": host.uuid},
            )
        elif host.live and key in open_lost:
            alerts.alert_clear(condition=Condition.HOST_LOST, object_key=key, new_state="live",
                               message=f"Host {host.name_label} of pool {pool.name} is live again.")
            # The VMs HA restarted away from this host have their redundancy back.
            for alert in alerts.open_alerts(condition=Condition.VM_RESTARTED, pool=pool, from_host=host.uuid):
                alerts.alert_clear(condition=Condition.VM_RESTARTED, object_key=alert.object_key,
                                   new_state="redundant",
                                   message=f"{alert.vm_name}: host {host.name_label}, which it was restarted "
                                           "away from, is live again.")


def _evaluate_plan(pool: Pool) -> bool:
    """True if the pool's failover plan holds as XAPI reports it (HA on, plan exists for the configured n)."""
    key = f"pool:{pool.uuid}"
    if not pool.ha_enabled:
        alerts.alert_clear(condition=Condition.PLAN_OVERCOMMITTED, object_key=key, new_state="HA off",
                           message=f"High availability is off on pool {pool.name}.")
        return False
    ok = not pool.ha_overcommitted and pool.ha_plan_exists_for >= pool.ha_host_failures_to_tolerate
    if not ok and not alerts.alert_is_open(condition=Condition.PLAN_OVERCOMMITTED, object_key=key):
        alerts.alert_raise(
            condition=Condition.PLAN_OVERCOMMITTED, object_key=key, pool=pool,
            old_state=f"tolerates {pool.ha_host_failures_to_tolerate}",
            new_state=f"tolerates {pool.ha_plan_exists_for}",
            message=(f"Pool {pool.name} is overcommitted: its failover plan covers {pool.ha_plan_exists_for} "
                     f"host failure(s), {pool.ha_host_failures_to_tolerate} configured. "
                     + (selectors.plan_refusal_reason(pool, pool.ha_host_failures_to_tolerate) or "")),
        )
    elif ok:
        alerts.alert_clear(condition=Condition.PLAN_OVERCOMMITTED, object_key=key,
                           new_state=f"tolerates {pool.ha_plan_exists_for}",
                           message=f"The failover plan of pool {pool.name} holds again.")
    return ok


def _lost_since(pool: Pool, host: Host | None, now):
    """When the host was found lost (the raise of its alert), to date a failover from; else now."""
    if host is None:
        return now
    raised = alerts.open_alert_raised_at(condition=Condition.HOST_LOST, object_key=f"host:{host.uuid}")
    return min(raised, now) if raised else now


def _evaluate_protection(protection: Protection, hosts: dict[int, Host], plan_ok: bool,
                         open_events: dict[tuple[str, str], FailoverEvent]) -> None:
    if protection.status in (ProtectionStatus.PROTECTING, ProtectionStatus.UNPROTECTING, ProtectionStatus.CANDIDATE):
        return  # a workflow owns the status
    # A restart that HA gave up on stays the one open failover until the VM runs again.
    failed_event = open_events.get((protection.vm.uuid, FailoverEvent.State.FAILED))
    if protection.status == ProtectionStatus.FAILED and failed_event is None:
        return  # failed by its workflow: only a new workflow changes that
    vm = protection.vm
    pool = protection.pool
    now = timezone.now()
    running = vm.power_state in RUNNING_STATES and vm.resident_on_id is not None
    here = hosts.get(vm.resident_on_id) if running else None
    before = hosts.get(protection.observed_host_id)
    event = open_events.get((vm.uuid, FailoverEvent.State.DOWN))
    before_values = (protection.status, protection.status_reason, protection.observed_host_id,
                     protection.observed_power_state)
    old_status = protection.status
    if running:
        moved_from_dead = before is not None and here is not None and before.pk != here.pk and not before.live
        if event is None and failed_event is None and moved_from_dead:
            # Down and restarted between two looks: date the loss from the host's.
            event = FailoverEvent(pool=pool, vm=vm, vm_uuid=vm.uuid, vm_name=vm.name_label, from_host=before,
                                  from_host_name=before.name_label, detected_at=_lost_since(pool, before, now))
        if event is not None:
            event.state = FailoverEvent.State.RESTARTED
            event.to_host = here
            event.to_host_name = here.name_label if here else ""
            event.restarted_at = now
            event.downtime_seconds = max(0.0, (now - event.detected_at).total_seconds())
            event.save()
            _alert_restarted(protection, event)
        if failed_event is not None:
            failed_event.state = FailoverEvent.State.RESTARTED
            failed_event.to_host = here
            failed_event.to_host_name = here.name_label if here else ""
            failed_event.restarted_at = now
            failed_event.downtime_seconds = max(0.0, (now - failed_event.detected_at).total_seconds())
            failed_event.save()
            alerts.alert_clear(condition=Condition.VM_RESTART_FAILED, object_key=f"vm:{vm.uuid}",
                               new_state="running", downtime_seconds=failed_event.downtime_seconds,
                               message=f"{vm.name_label} runs again, on {here.name_label if here else '?'}.")
        protection.observed_host = here
        protection.observed_power_state = vm.power_state
        protection.status = ProtectionStatus.PROTECTED if plan_ok else ProtectionStatus.DEGRADED
        protection.status_reason = "" if plan_ok else _degraded_reason(pool)
    else:
        lost_host = before is not None and not before.live
        if failed_event is not None:
            return  # already reported as not restarted; waiting for it to run again
        if event is None and lost_host:
            event = FailoverEvent.objects.create(
                pool=pool, vm=vm, vm_uuid=vm.uuid, vm_name=vm.name_label, from_host=before,
                from_host_name=before.name_label, detected_at=_lost_since(pool, before, now),
            )
        if event is not None:
            grace = timedelta(seconds=settings.EAC_RESTART_GRACE)
            if now - event.detected_at > grace:
                _restart_failed(protection, event, now)
            else:
                protection.status = ProtectionStatus.FAILING_OVER
                protection.status_reason = f"Host {event.from_host_name} was lost; waiting for HA to restart the VM."
        else:
            # Shut down on purpose (or never started): nothing to restart.
            protection.observed_host = None
            protection.observed_power_state = vm.power_state
            protection.status = ProtectionStatus.PROTECTED if plan_ok else ProtectionStatus.DEGRADED
            protection.status_reason = "" if plan_ok else _degraded_reason(pool)
    if (protection.status, protection.status_reason, protection.observed_host_id,
            protection.observed_power_state) != before_values:
        protection.save(update_fields=["status", "status_reason", "observed_host", "observed_power_state",
                                       "updated_at"])
    if protection.status != old_status:
        _emit_vm(vm)


def _degraded_reason(pool: Pool) -> str:
    if not pool.ha_enabled:
        return "High availability is off on the pool: nothing would restart the VM."
    return (f"The failover plan covers {pool.ha_plan_exists_for} host failure(s), fewer than the "
            f"{pool.ha_host_failures_to_tolerate} configured.")


def _alert_restarted(protection: Protection, event: FailoverEvent) -> None:
    vm = protection.vm
    alerts.alert_raise(
        condition=Condition.VM_RESTARTED, object_key=f"vm:{vm.uuid}", pool=protection.pool, vm_name=vm.name_label,
        host_name=event.to_host_name, old_state=f"running on {event.from_host_name}",
        new_state=f"running on {event.to_host_name}", downtime_seconds=event.downtime_seconds,
        message=(f"HA restarted {vm.name_label} on {event.to_host_name} after host {event.from_host_name} was "
                 f"lost; down {event.downtime_seconds:.1f} s."),
        details={"from_host": event.from_host.uuid if event.from_host else "", "event": event.pk,
                 "from_host_name": event.from_host_name},
    )


def _restart_failed(protection: Protection, event: FailoverEvent, now) -> None:
    vm = protection.vm
    event.state = FailoverEvent.State.FAILED
    event.save(update_fields=["state"])
    protection.status = ProtectionStatus.FAILED
    protection.status_reason = (f"HA did not restart the VM within {settings.EAC_RESTART_GRACE} s of "
                                f"losing host {event.from_host_name}.")
    alerts.alert_raise(
        condition=Condition.VM_RESTART_FAILED, object_key=f"vm:{vm.uuid}", pool=protection.pool,
        vm_name=vm.name_label, host_name=event.from_host_name, old_state=f"running on {event.from_host_name}",
        new_state="halted", downtime_seconds=(now - event.detected_at).total_seconds(),
        message=(f"{vm.name_label} was not restarted after host {event.from_host_name} was lost "
                 f"{(now - event.detected_at).total_seconds():.0f} s ago."),
        details={"from_host": event.from_host.uuid if event.from_host else "", "event": event.pk},
    )


def protection_sweep() -> dict[str, int]:
    """Periodic safety net (Celery beat): resume dead workflows, re-evaluate every pool (unreachable
    pools, overdue restarts) in case a watcher notification was missed."""
    result = workflow_sweep()
    pools = 0
    for pool in Pool.objects.all():
        try:
            protection_evaluate_pool(pool=pool)
            pools += 1
        except Exception:
            log.exception("protection sweep: pool %s", pool.pk)
    result["pools"] = pools
    return result


__all__ = [
    "Conflict", "audit_record", "protection_start", "protection_stop", "pool_failures_to_tolerate_set",
    "workflow_run_execute", "workflow_sweep", "protection_observe_changes", "protection_evaluate_pool",
    "protection_sweep",
]
