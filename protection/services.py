"""Writes of protection: start and stop protection, and set the pool's host failures to tolerate.

Every service is keyword-only, runs in ``transaction.atomic``, writes the audit log and emits its
realtime events on commit (``eac.realtime``); a workflow run it creates is enqueued on commit too.
Running the workflows is the engine's (``engine.py``); judging what the pool's changes mean is
``observe.py``'s. Celery tasks (``tasks.py``), views, the API and the socket only call these.
"""
from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction

from eac.audit import AuditAction, audit_record
from eac.errors import Conflict
from eac.permissions import user_can_change_protection
from eac.realtime import emit, protection_change
from inventory.models import VM, Host, Pool

from . import selectors
from .choices import (
    ACTIVE_RUN_STATES,
    AVAILABLE_LEVELS,
    ORDER_MAX,
    START_DELAY_MAX,
    UNAVAILABLE_REASON,
    Level,
    ProtectionStatus,
    RestartPriority,
    RunKind,
)
from .models import Protection, WorkflowRun, WorkflowStep
from .preflight import heartbeat_sr_candidates, protection_preflight
from .tasks import workflow_run as workflow_run_task
from .workflows import steps_for

log = logging.getLogger(__name__)


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
    for name, upper in (("order", ORDER_MAX), ("start_delay", START_DELAY_MAX)):
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
        if not heartbeat_sr_candidates(vm.pool).filter(uuid=sr).exists():
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
    if not vm.is_ordinary:
        raise ValidationError({"vm": "Only ordinary VMs can be protected (not templates, snapshots or dom0)."})
    clean = _clean_settings(vm, settings or {})
    with transaction.atomic():
        vm = VM.objects.select_for_update().select_related("pool").get(pk=vm.pk)
        pool = vm.pool
        if pool.removing_since is not None:
            raise Conflict(f"Pool {pool.name} is being removed: its VMs can no longer be protected.")
        if WorkflowRun.objects.filter(vm=vm, state__in=ACTIVE_RUN_STATES).exists():
            raise Conflict("A workflow is already running for this VM: wait for it to finish.")
        existing = Protection.objects.filter(vm=vm).first()
        if existing and existing.status in (ProtectionStatus.PROTECTED, ProtectionStatus.DEGRADED) and all(
            getattr(existing, k) == clean[k] for k in ("restart_priority", "order", "start_delay")
        ) and existing.level == level:
            raise Conflict("The VM is already protected at this level with these settings.")
        if preflight:
            check = protection_preflight(vm=vm, level=level, settings=clean)
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
        emit(protection_change(pool=vm.pool.uuid, vm=vm.uuid))
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
        emit(protection_change(pool=vm.pool.uuid, vm=vm.uuid))
    return run


def pool_failures_to_tolerate_set(
    *, pool: Pool, failures_to_tolerate: int, requested_by, via: str = "api", remote_addr: str | None = None
) -> WorkflowRun:
    """Ask the pool to tolerate ``failures_to_tolerate`` host failures; refused with the reason when the
    plan cannot meet it (our planner says why; XAPI would only say HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN)."""
    _require_administrator(requested_by)
    if pool.removing_since is not None:
        raise Conflict(f"Pool {pool.name} is being removed: its failover plan can no longer be changed.")
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
