"""The workflow engine: claim a run, hold its lease, execute its steps in order, finish it.

A run is claimed with one conditional UPDATE (a pending run, or a running one whose lease
expired because its worker died), so it never runs twice at once; every write of a step is
fenced by the lease, so a worker presumed dead cannot touch a run another worker took over.
Steps are the data of ``workflows.py``; this module knows nothing of what they do, only how a
finished run changes its protection (``_after_run``). The periodic sweep (``runs_to_resume``)
hands back the runs whose worker died, for the task to enqueue again.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError, transaction
from django.db.models import F, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from alerts import selectors as alert_reads
from alerts import services as alerts
from alerts.choices import Condition
from alerts.keys import alert_key, component_key
from eac.audit import AuditAction, audit_record
from eac.realtime import emit, protection_change, protection_progress
from inventory.models import Pool
from inventory.selectors import xapi_error_describe
from inventory.xapi import XapiError, pool_client

from . import selectors
from .am_client import AMClient, AMError
from .choices import RUNNING_STATES, Level, ProtectionStatus, RunKind, RunState, StepState, uses_ams
from .models import ProtectedDisk, Protection, WorkflowRun, WorkflowStep
from .workflows import StepFailed, step_named

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another worker holds the run now (ours was presumed dead): stop touching it."""


class StepContext:
    """What a step sees: the run's parameters, XAPI calls, progress reporting, earlier results."""

    def __init__(self, engine: Engine, step: WorkflowStep) -> None:
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

    # -- Level 2: the AMs, the protection's rows, earlier steps' findings --------------------------------

    @property
    def vm(self):
        vm = self.run.vm
        if vm is None:
            raise StepFailed("VM_GONE", "The VM no longer exists in the pool.")
        return vm

    @property
    def protection(self) -> Protection:
        protection = self.run.protection
        if protection is None:
            raise StepFailed("PROTECTION_GONE", "The protection this workflow works for no longer exists.")
        return protection

    def am(self, url: str) -> AMClient:
        """The client of the AM at ``url`` (one per run, closed with the run)."""
        return self.engine.am(url)

    def result_of(self, step_name: str) -> dict:
        """What an earlier step of this run found (its ``result``)."""
        row = WorkflowStep.objects.filter(run=self.run, name=step_name).values_list("result", flat=True).first()
        return row or {}

    def protection_save(self, **fields) -> None:
        with transaction.atomic():
            self.engine.renew()
            for key, value in fields.items():
                setattr(self.protection, key, value)
            Protection.objects.filter(pk=self.protection.pk).update(**fields)

    def disks(self) -> list[ProtectedDisk]:
        return list(ProtectedDisk.objects.filter(protection=self.protection).order_by("userdevice", "resource"))

    def disk_save(self, disk: ProtectedDisk, **fields) -> None:
        """Record on the disk's row what was just done (fenced by the lease, like every write of a step)."""
        with transaction.atomic():
            self.engine.renew()
            for key, value in fields.items():
                setattr(disk, key, value)
            disk.save(update_fields=[*fields, "updated_at"])

    def disks_discover(self, *, primary_am: str, secondary_am: str) -> list[ProtectedDisk]:
        """One row per disk of the VM as XAPI has it now (made once; a re-run finds the rows it made)."""
        protection = self.protection
        hosts = {h.uuid: h for h in protection.pool.hosts.filter(
            uuid__in=[self.params["primary_host"], self.params["secondary_host"]])}
        for vbd in self.call("VM.get_VBDs", self.vm_ref):
            record = self.call("VBD.get_record", vbd)
            if record.get("type") != "Disk" or record.get("empty") or record.get("VDI") in ("", "OpaqueRef:NULL"):
                continue
            vdi = self.call("VDI.get_record", record["VDI"])
            with transaction.atomic():
                self.engine.renew()
                ProtectedDisk.objects.get_or_create(
                    protection=protection, resource=f"vdi-{vdi['uuid']}",
                    defaults={"userdevice": str(record.get("userdevice", "")), "primary_vdi_uuid": vdi["uuid"],
                              "primary_host": hosts.get(self.params["primary_host"]),
                              "secondary_host": hosts.get(self.params["secondary_host"]),
                              "primary_am_url": primary_am, "secondary_am_url": secondary_am,
                              "size": int(vdi.get("virtual_size") or 0)})
        return self.disks()

    def previous_settings(self) -> dict | None:
        """What the VM had before it was protected, or None if protecting never changed it."""
        return self.params.get("previous") or None

    def ha_enabled_by_console(self) -> bool:
        return bool(self.params.get("ha_enabled_by_console"))


class Engine:
    def __init__(self, run: WorkflowRun, worker: str) -> None:
        self.run = run
        self.worker = worker
        self._client = None
        self._ams: dict[str, AMClient] = {}
        self.lease = timedelta(seconds=settings.EAC_WORKFLOW_LEASE)

    def client(self):
        if self._client is None:
            self._client = pool_client(self.run.pool)
        return self._client

    def am(self, url: str) -> AMClient:
        if url not in self._ams:
            self._ams[url] = AMClient(url)
        return self._ams[url]

    def drop_client(self) -> None:
        if self._client is not None:
            self._client.logout()
            self._client = None
        for am in self._ams.values():
            am.close()
        self._ams.clear()

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
            emit(protection_progress(run=self.run.pk))


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
    engine = Engine(run, worker)
    if run.claims > settings.EAC_WORKFLOW_MAX_CLAIMS:
        _run_finish(engine, failed=("TOO_MANY_ATTEMPTS", f"Gave up after {run.claims - 1} attempts: the worker "
                                    "running this workflow kept stopping before it finished.", []), step=None)
        return "failed"
    emit(protection_progress(run=run.pk))
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


def _step_execute(engine: Engine, step: WorkflowStep) -> tuple[str, str, list] | None:
    """Run one step with retries of transient XAPI errors. None if done, else (code, sentence, params)."""
    impl = step_named(engine.run.kind, step.name, int((engine.run.params or {}).get("level", Level.BASIC_RESTART)))
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
        except (LeaseLost, DatabaseError):
            # A database error is not the step's failure (PostgreSQL restarting, say): the run stays running,
            # its lease lapses, and the sweeper hands it to a worker again.
            raise
        except StepFailed as exc:
            return exc.code, exc.message, exc.params
        except AMError as exc:
            if exc.transient and attempt <= retries:
                delay = min(base * 2 ** (attempt - 1), 30.0)
                engine.step_update(step, message=f"{exc.sentence} Retrying in {delay:g} s (attempt {attempt + 1}).")
                engine.drop_client()
                time.sleep(delay)
                continue
            return "AM_ERROR" if exc.status is None else f"AM_HTTP_{exc.status}", exc.sentence, []
        except Exception as exc:
            if not isinstance(exc, XapiError):
                log.exception("workflow %s step %s: unexpected error", engine.run.pk, step.name)
                return xapi_error_describe(exc, engine.run.pool) + ([],)
            code, sentence = xapi_error_describe(exc, engine.run.pool)
            if exc.transient and attempt <= retries:
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


def _run_finish(engine: Engine, *, failed: tuple[str, str, list] | None, step: WorkflowStep | None) -> None:
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
        emit(protection_progress(run=run.pk))


def _step_results(run: WorkflowRun) -> dict[str, dict]:
    return {s.name: s.result or {} for s in WorkflowStep.objects.filter(run=run)}


def _after_run(run: WorkflowRun, failed: tuple[str, str, list] | None) -> None:
    """What a finished run means for the protection, the audit log and the alerts."""
    protection = Protection.objects.select_for_update().filter(pk=run.protection_id).first()
    results = _step_results(run)
    vm = run.vm
    object_key = alert_key(vm) if vm else alert_key(run.pool)
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
            # A failed swap leaves a protection in place (handed back, or half-way and said so): the next
            # reading of its AMs says how it is; a failed protect or unprotect has nothing to read.
            protection.status = ProtectionStatus.DEGRADED if run.kind == RunKind.SWAP else ProtectionStatus.FAILED
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
        elif run.kind == RunKind.SWAP and protection is not None:
            # As it was before the swap until the next reading of both AMs says how the new pair is.
            protection.status = (run.params or {}).get("status_before") or ProtectionStatus.PROTECTED
            protection.status_reason = (run.params or {}).get("reason_before") or ""
            protection.save()
        elif run.kind == RunKind.UNPROTECT and protection is not None:
            if vm is not None and uses_ams(protection.level):
                _level2_alerts_clear(vm, protection.level)
            protection.delete()
            audit_record(user=None, action=AuditAction.UNPROTECTED, pool=run.pool, vm=vm, detail={"run": run.pk})
        alerts.alert_clear(condition=Condition.WORKFLOW_FAILED, object_key=object_key,
                           message=f"{run.get_kind_display()} of {run.vm_name or run.pool.name} succeeded.",
                           new_state="succeeded")
    if vm is not None:
        emit(protection_change(pool=vm.pool.uuid, vm=vm.uuid))


def runs_to_resume() -> list[int]:
    """Runs to enqueue again: running ones whose worker died (lease expired), pending ones nobody took.

    Enqueuing twice is harmless: only one worker can claim a run.
    """
    now = timezone.now()
    stale_pending = now - timedelta(seconds=settings.EAC_WORKFLOW_PENDING_RESEND)
    resumed = WorkflowRun.objects.filter(state=RunState.RUNNING, lease_until__lt=now).values_list("pk", flat=True)
    lost = WorkflowRun.objects.filter(state=RunState.PENDING, created_at__lt=stale_pending).values_list("pk", flat=True)
    return [*resumed, *lost]


def _level2_alerts_clear(vm, level: int) -> None:
    """Unprotected: the Level 2 (or 3) components of the VM are gone, so are their open alerts (cleared once)."""
    prefix = component_key(vm, "")
    for condition in (Condition.REDUNDANCY_LOST, Condition.VALIDATION_MISMATCH, Condition.FAILOVER_DONE,
                      Condition.FAILOVER_FAILED, Condition.CHECKPOINT_STALLED):
        for key in alert_reads.open_object_keys(condition=condition, pool=vm.pool):
            if key.startswith(prefix):
                alerts.alert_clear(condition=condition, object_key=key, new_state="unprotected",
                                   message=f"{vm.name_label} is no longer protected at Level {level}.")
