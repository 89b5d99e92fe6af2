"""Writes of protection: start and stop protection, and set the pool's host failures to tolerate.

Every service is keyword-only, runs in ``transaction.atomic``, writes the audit log and emits its
realtime events on commit (``eac.realtime``); a workflow run it creates is enqueued on commit too.
Running the workflows is the engine's (``engine.py``); judging what the pool's changes mean is
``observe.py``'s. Celery tasks (``tasks.py``), views, the API and the socket only call these.
"""
from __future__ import annotations

import logging
from typing import Any

from django.conf import settings as django_settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.utils import timezone

from alerts import selectors as alert_reads
from alerts import services as alerts
from alerts.choices import Condition
from alerts.keys import component_key
from eac.audit import AuditAction, audit_record
from eac.errors import Conflict
from eac.permissions import user_can_change_protection
from eac.realtime import emit, protection_change
from inventory.models import VM, Host, Pool

from . import health, selectors, tasks
from .choices import (
    ACTIVE_RUN_STATES,
    AVAILABLE_LEVELS,
    EPOCH_MS_DEFAULT,
    EPOCH_MS_MAX,
    EPOCH_MS_MIN,
    ORDER_MAX,
    START_DELAY_MAX,
    UNAVAILABLE_REASON,
    CheckpointState,
    ComponentState,
    Level,
    Level2Action,
    ProtectionStatus,
    RestartPriority,
    RunKind,
    uses_ams,
)
from .models import FailoverEvent, Protection, WorkflowRun, WorkflowStep
from .preflight import heartbeat_sr_candidates, level2_choice, level2_setting_problems, protection_preflight
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


def _clean_level2(vm: VM, raw: dict[str, Any], level: int = Level.COMPONENT_FT) -> dict[str, Any]:
    """Level 2 settings: the secondary host (default: the AM peer of the VM's host) and the memory it
    reserves for the secondary VM in bytes (default: the VM's; not below its dynamic minimum)."""
    errors: dict[str, str] = {}
    wanted: dict[str, Any] = {"secondary_host": str(raw.get("secondary_host") or "")}
    memory = raw.get("secondary_memory")
    if memory not in (None, ""):
        try:
            wanted["secondary_memory"] = int(memory)
        except (TypeError, ValueError):
            errors["secondary_memory"] = "Must be a whole number of bytes."
        else:
            if wanted["secondary_memory"] <= 0:
                errors["secondary_memory"] = "Must be a positive number of bytes."
    if errors:
        raise ValidationError(errors)
    choice = level2_choice(vm, wanted)
    errors = level2_setting_problems(vm, choice)
    if not errors and choice.secondary is None:
        primary = choice.primary
        errors["secondary_host"] = (
            f"{primary} has no Availability Manager: Level {level} needs one on the VM's host and on its peer."
            if primary is not None and not primary.am_url
            else "Choose the secondary host: the VM's host has no AM peer to suggest."
        )
    if errors:
        raise ValidationError(errors)
    return {
        "level": int(Level.COMPONENT_FT),
        "primary_host": choice.primary.uuid if choice.primary else "",
        "secondary_host": choice.secondary.uuid,
        "secondary_memory": choice.footprint,
        "secondary_sr": choice.sr.uuid if choice.sr else "",
    }


def _clean_level3(vm: VM, raw: dict[str, Any]) -> dict[str, Any]:
    """Level 3 settings: Level 2's, and the epoch length in ms (EPOCH_MS_MIN..EPOCH_MS_MAX, default
    EPOCH_MS_DEFAULT). Whether the VM itself suits Level 3 (one vCPU, 1 to 8 NICs) is the preflight's to say."""
    errors: dict[str, list[str]] = {}
    epoch = raw.get("epoch_ms")
    if epoch in (None, ""):
        epoch = EPOCH_MS_DEFAULT
    try:
        if isinstance(epoch, bool) or isinstance(epoch, float) and not epoch.is_integer():
            raise ValueError
        epoch = int(epoch)
    except (TypeError, ValueError, OverflowError):
        errors["epoch_ms"] = ["Must be a whole number of milliseconds."]
    else:
        if not EPOCH_MS_MIN <= epoch <= EPOCH_MS_MAX:
            errors["epoch_ms"] = [f"Must be between {EPOCH_MS_MIN} and {EPOCH_MS_MAX} ms (the time between two "
                                  "checkpoints)."]
    try:
        clean = _clean_level2(vm, raw, Level.SYSTEM_FT)
    except ValidationError as exc:
        errors.update(exc.message_dict)
    if errors:
        raise ValidationError(errors)
    return {**clean, "level": int(Level.SYSTEM_FT), "epoch_ms": epoch}


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
    level2 = uses_ams(level)  # Level 2, or Level 3 (Level 2 plus checkpointing)
    if level == Level.SYSTEM_FT:
        clean = _clean_level3(vm, settings or {})
    elif level2:
        clean = _clean_level2(vm, settings or {})
    else:
        clean = _clean_settings(vm, settings or {})
    with transaction.atomic():
        vm = VM.objects.select_for_update().select_related("pool").get(pk=vm.pk)
        pool = vm.pool
        if pool.removing_since is not None:
            raise Conflict(f"Pool {pool.name} is being removed: its VMs can no longer be protected.")
        if WorkflowRun.objects.filter(vm=vm, state__in=ACTIVE_RUN_STATES).exists():
            raise Conflict("A workflow is already running for this VM: wait for it to finish.")
        existing = Protection.objects.filter(vm=vm).first()
        if existing and (existing.level != level or level2):
            # A change of level (or of a Level 2 pair) is an unprotect, then a protect: each level undoes
            # only what it did.
            raise Conflict(f"The VM has a Level {existing.level} protection ({existing.get_status_display().lower()})"
                           f": unprotect it first, then protect it at Level {level.value}.")
        if existing and existing.status in (ProtectionStatus.PROTECTED, ProtectionStatus.DEGRADED) and all(
            getattr(existing, k) == clean[k] for k in ("restart_priority", "order", "start_delay")
        ) and existing.level == level:
            raise Conflict("The VM is already protected at this level with these settings.")
        if preflight:
            check = protection_preflight(vm=vm, level=level, settings=clean)
            blocking = [c["message"] for c in check["checks"] if c["blocking"]]
            if blocking:
                raise Conflict("The VM cannot be protected as things stand.", blocking)
            if not level2 and not pool.ha_enabled and not clean.get("heartbeat_sr"):
                raise ValidationError({"heartbeat_sr": "High availability is off on this pool: choose the shared "
                                                       "SR for its heartbeat."})
        if not pool.ha_enabled and not level2:
            clean.setdefault("failures_to_tolerate", 1)
        if existing is None:
            existing = Protection(vm=vm, pool=pool, created_by=requested_by)
        elif existing.previous_settings:
            clean["previous"] = existing.previous_settings
        existing.level = level
        existing.status = ProtectionStatus.PROTECTING
        existing.status_reason = ""
        if level2:
            existing.secondary_host = Host.objects.get(pool=pool, uuid=clean["secondary_host"])
            existing.secondary_memory = clean["secondary_memory"]
            existing.epoch_ms = clean.get("epoch_ms")
        else:
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
    """Unprotect: undo exactly what protecting did (Level 1: restart priority, order, delay, HA if ours;
    Level 2: the secondary VM, its replicas and the disks' routing through the AM)."""
    _require_administrator(requested_by)
    with transaction.atomic():
        protection = (Protection.objects.select_for_update(of=("self",)).select_related("vm", "pool", "failed_over_to")
                      .get(pk=protection.pk))
        vm = protection.vm
        if WorkflowRun.objects.filter(vm=vm, state__in=ACTIVE_RUN_STATES).exists():
            raise Conflict("A workflow is already running for this VM: wait for it to finish.")
        if uses_ams(protection.level) and protection.failed_over_to_id is not None:
            # Unprotect undoes a protection in place: after a failover the secondary VM is the one running, on
            # the replicas its AM serves as primary, and undoing would stop and destroy it.
            raise Conflict(f"The VM runs from its secondary copy on {protection.failed_over_to.name_label} since "
                           f"its failover at {protection.failed_over_at:%Y-%m-%d %H:%M:%S} UTC: unprotecting would "
                           "stop and destroy it. Bring the service back on the VM itself first.")
        if uses_ams(protection.level) and protection.swapped:
            # Unprotect gives the VM back its own disks, which the host it runs on now holds only as replicas.
            raise Conflict("The VM runs on its former secondary host after a planned swap: swap it back first, "
                           "then unprotect it.")
        if uses_ams(protection.level):
            # What to undo is in the protection's disk rows and its secondary VM's uuid.
            params = {"level": int(protection.level)}
        else:
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
    steps = steps_for(kind, params.get("level", Level.BASIC_RESTART))
    WorkflowStep.objects.bulk_create(
        WorkflowStep(run=run, position=i, name=step.name, label=step.label) for i, step in enumerate(steps)
    )
    tasks.workflow_run.delay_on_commit(run.pk)
    return run


# -- Level 2: component health, failover, validation, actions -------------------------------------------

# The statuses in which the AMs' word decides a Level 2 protection's status (a workflow owns the others).
LEVEL2_WATCHED = (ProtectionStatus.PROTECTED, ProtectionStatus.DEGRADED, ProtectionStatus.FAILING_OVER,
                  ProtectionStatus.FAILED)
_BAD = (ComponentState.DEGRADED, ComponentState.FAILED)


def _alerting(component: dict) -> bool:
    """A component whose state is a loss of redundancy: degraded or failed, or an AM that does not answer
    (unknown because of it). Other unknowns (what only a silent AM could tell) neither raise nor clear. Stalled
    checkpointing has an alert of its own (``_checkpoint_alert``), not this one as well."""
    if (component.get("checkpoint") or {}).get("state") == CheckpointState.STALLED:
        return False
    return component["state"] in _BAD or (component["kind"] == "AM" and component["state"] == ComponentState.UNKNOWN)


def _checkpoint_alert(protection: Protection, reading: health.Reading) -> None:
    """Level 3: "checkpointing stalled" raised once when the primary AM's checkpoint state is Stalled, cleared once
    when it is Checkpointing again; any other state (or a silent AM) neither raises nor clears it."""
    found = health.primary_checkpoint(reading)
    if found is None or found[1].state not in (CheckpointState.STALLED, CheckpointState.CHECKPOINTING):
        return
    view, cp = found
    vm, pool = protection.vm, protection.pool
    key = component_key(vm, "checkpoint")
    if cp.state == CheckpointState.STALLED:
        age = f" (the last one, epoch {cp.last_committed}, {cp.last_commit_age_ms / 1000:.1f} s ago)" if (
            cp.last_committed is not None and cp.last_commit_age_ms is not None) else ""
        alerts.alert_raise(
            condition=Condition.CHECKPOINT_STALLED, object_key=key, pool=pool, vm_name=vm.name_label,
            host_name=view.host_name, old_state=CheckpointState.CHECKPOINTING.value,
            new_state=CheckpointState.STALLED.value,
            message=(f"Level 3 checkpointing of {vm.name_label} stalled ({_pair_words(protection, reading)}): the AM "
                     f"on {view.host_name} has no checkpoint acknowledged by its peer{age}, while the peer is "
                     "connected; the VM's network output is held until one is. "
                     + (f"The AM says: {cp.why} " if cp.why else "")
                     + f"To repair: check the availability links and the AM on {_other(reading, view).host_name}."),
            details={"component": f"checkpoint@{view.host.uuid if view.host else view.url}",
                     "checkpoint": cp.figures()},
        )
    else:
        alerts.alert_clear(condition=Condition.CHECKPOINT_STALLED, object_key=key,
                           new_state=CheckpointState.CHECKPOINTING.value,
                           message=f"Level 3 checkpointing of {vm.name_label} goes on again "
                                   f"({_pair_words(protection, reading)}): its checkpoints are acknowledged.")


def _other(reading: health.Reading, view: health.AMView) -> health.AMView:
    return reading.secondary if view is reading.primary else reading.primary


def _pair_words(protection: Protection, reading: health.Reading) -> str:
    return f"pool {protection.pool.name}, hosts {reading.primary.host_name} and {reading.secondary.host_name}"


def _component_alerts(protection: Protection, reading: health.Reading, components: list[dict],
                      previous: dict[str, dict]) -> None:
    vm, pool = protection.vm, protection.pool
    prefix = component_key(vm, "")
    open_keys = {k for k in alert_reads.open_object_keys(condition=Condition.REDUNDANCY_LOST, pool=pool)
                 if k.startswith(prefix)}
    seen = set()
    for c in components:
        key = component_key(vm, c["id"])
        seen.add(key)
        what = f"{c['kind']} {c['name']}" + (f" on {c['host_name']}" if c["kind"] not in ("AM", "Witness",
                                                                                          "Checkpointing") and
                                             c["host"] else "")
        if _alerting(c) and key not in open_keys:
            alerts.alert_raise(
                condition=Condition.REDUNDANCY_LOST, object_key=key, pool=pool, vm_name=vm.name_label,
                host_name=c["host_name"], old_state=(previous.get(c["id"]) or {}).get("state", "ok"),
                new_state=c["state"],
                message=(f"Level {protection.level} redundancy of {vm.name_label} lost "
                         f"({_pair_words(protection, reading)}): {what}: {c['detail']}"
                         + (f" To repair: {c['repair']}" if c["repair"] else "")),
                details={"component": c["id"], "kind": c["kind"], "host": c["host"], "repair": c["repair"]},
            )
        elif c["state"] == ComponentState.OK and key in open_keys:
            alerts.alert_clear(condition=Condition.REDUNDANCY_LOST, object_key=key, new_state="ok",
                               message=f"Level {protection.level} redundancy of {vm.name_label} is back "
                                       f"({_pair_words(protection, reading)}): {what} is OK again.")
    for key in open_keys - seen:  # a component that is no more (a disk unprotected)
        alerts.alert_clear(condition=Condition.REDUNDANCY_LOST, object_key=key, new_state="gone",
                           message=f"{vm.name_label}: this Level {protection.level} component is no longer part of its "
                                   "protection.")


def _failover(protection: Protection, reading: health.Reading, now) -> tuple[str, str] | None:
    """Follow a failover: the status and reason it imposes, or None when there is none under way."""
    vm, pool = protection.vm, protection.pool
    primary, secondary = reading.primary.host, reading.secondary.host
    from_name, to_name = reading.primary.host_name, reading.secondary.host_name
    key = component_key(vm, "failover")
    events = {e.state: e for e in FailoverEvent.objects.select_for_update().filter(
        pool=pool, vm_uuid=vm.uuid, state__in=[FailoverEvent.State.DOWN, FailoverEvent.State.FAILED])}
    crashed = not health.primary_host_dead(reading) and not reading.primary.error
    lost = f"the VM crashed on {from_name}" if crashed else f"{from_name} was lost"
    if health.took_over(reading):
        if protection.failed_over_to_id != (secondary.pk if secondary else None):
            event = events.get(FailoverEvent.State.DOWN) or events.get(FailoverEvent.State.FAILED) or FailoverEvent(
                pool=pool, vm=vm, vm_uuid=vm.uuid, vm_name=vm.name_label, from_host=primary,
                from_host_name=from_name, detected_at=min(primary.last_heard_at or now, now) if primary else now)
            event.state = FailoverEvent.State.RESTARTED
            event.to_host, event.to_host_name, event.restarted_at = secondary, to_name, now
            event.downtime_seconds = max(0.0, (now - event.detected_at).total_seconds())
            event.save()
            protection.failed_over_to, protection.failed_over_at = secondary, now
            alerts.alert_clear(condition=Condition.FAILOVER_FAILED, object_key=key, new_state=f"running on {to_name}",
                               downtime_seconds=event.downtime_seconds,
                               message=f"{vm.name_label} runs again, on {to_name} (its secondary).")
            alerts.alert_raise(
                condition=Condition.FAILOVER_DONE, object_key=key, pool=pool, vm_name=vm.name_label,
                host_name=to_name, old_state=f"running on {from_name}", new_state=f"running on {to_name}",
                downtime_seconds=event.downtime_seconds,
                message=(f"Level {protection.level} failover of {vm.name_label} done"
                         f" ({_pair_words(protection, reading)}): the AM on "
                         f"{to_name} took over its disks after {lost}; the VM runs on {to_name}."),
                details={"from_host": primary.uuid if primary else "", "to_host": secondary.uuid if secondary else "",
                         "event": event.pk},
            )
        return None
    if protection.failed_over_to_id is not None:
        if (reading.vm_power_state == "Running" and primary is not None and reading.vm_host == primary.pk
                and not reading.secondary_vm_running):
            _failed_back(protection, reading, now)
        return None
    if not health.primary_host_dead(reading):
        if crashed and events.get(FailoverEvent.State.DOWN) and reading.vm_power_state == "Halted":
            return (ProtectionStatus.FAILING_OVER,
                    f"The VM crashed on {from_name}; restarting it from its copy on {to_name}.")
        return None
    event = events.get(FailoverEvent.State.FAILED)
    if event is None:
        event = events.get(FailoverEvent.State.DOWN) or FailoverEvent.objects.create(
            pool=pool, vm=vm, vm_uuid=vm.uuid, vm_name=vm.name_label, from_host=primary, from_host_name=from_name,
            detected_at=min(primary.last_heard_at or now, now))
    grace = django_settings.EAC_L2_FAILOVER_GRACE
    if event.state == FailoverEvent.State.DOWN and (now - event.detected_at).total_seconds() <= grace:
        return (ProtectionStatus.FAILING_OVER,
                f"Host {from_name} was lost; waiting for the AM on {to_name} to take over and start the VM.")
    if event.state == FailoverEvent.State.DOWN:
        event.state = FailoverEvent.State.FAILED
        event.save(update_fields=["state"])
        down = (now - event.detected_at).total_seconds()
        alerts.alert_raise(
            condition=Condition.FAILOVER_FAILED, object_key=key, pool=pool, vm_name=vm.name_label,
            host_name=from_name, old_state=f"running on {from_name}", new_state="not running",
            downtime_seconds=down,
            message=(f"Level {protection.level} failover of {vm.name_label} failed"
                     f" ({_pair_words(protection, reading)}): host "
                     f"{from_name} was lost {down:.0f} s ago and no copy runs on {to_name}."),
            details={"from_host": primary.uuid if primary else "", "event": event.pk},
        )
    return (ProtectionStatus.FAILED,
            f"Host {from_name} was lost and the VM was not started on {to_name} within {grace:g} s: check the AM "
            f"on {to_name} and the witness, or start the secondary VM by hand.")


def _failed_back(protection: Protection, reading: health.Reading, now) -> None:
    """The VM runs again from its own record on the primary host (its standby there took over from the copy):
    no longer failed over; the move is a failover event of its own and ``failover_done`` says so."""
    vm, back_on, left = protection.vm, reading.primary.host_name, protection.failed_over_to
    event = FailoverEvent.objects.create(
        pool=protection.pool, vm=vm, vm_uuid=vm.uuid, vm_name=vm.name_label, from_host=left,
        from_host_name=left.name_label if left else "", to_host=reading.primary.host, to_host_name=back_on,
        detected_at=min((left.last_heard_at if left else None) or now, now), restarted_at=now,
        state=FailoverEvent.State.RESTARTED)
    event.downtime_seconds = max(0.0, (now - event.detected_at).total_seconds())
    event.save(update_fields=["downtime_seconds"])
    protection.failed_over_to, protection.failed_over_at = None, None
    alerts.alert_raise(
        condition=Condition.FAILOVER_DONE, object_key=component_key(vm, "failover"), pool=protection.pool,
        vm_name=vm.name_label, host_name=back_on, old_state=f"running on {event.from_host_name}",
        new_state=f"running on {back_on}", downtime_seconds=event.downtime_seconds,
        message=(f"Level {protection.level} failover of {vm.name_label} done"
                 f" ({_pair_words(protection, reading)}): it runs on "
                 f"{back_on} again, from its own record, after its copy on {event.from_host_name} stopped."),
        details={"from_host": left.uuid if left else "", "to_host": reading.primary.host.uuid, "event": event.pk})


def protection_crash_seen(*, protection: Protection, reading: health.Reading) -> FailoverEvent:
    """A Level 2 VM's guest crashed on its live primary host (XAPI said ``VM_CRASHED``) and is being restarted
    from its copy (``protection.failover``): the failover event opened now, so its downtime counts from here."""
    primary = reading.primary.host
    with transaction.atomic():
        event = FailoverEvent.objects.select_for_update().filter(
            pool=protection.pool, vm_uuid=protection.vm.uuid, state=FailoverEvent.State.DOWN).first()
        if event is None:
            event = FailoverEvent.objects.create(
                pool=protection.pool, vm=protection.vm, vm_uuid=protection.vm.uuid, vm_name=protection.vm.name_label,
                from_host=primary, from_host_name=reading.primary.host_name, detected_at=timezone.now())
        audit_record(user=None, action=AuditAction.LEVEL2_ACTION, pool=protection.pool, vm=protection.vm,
                     detail={"action": "restart-from-copy", "why": f"guest crashed on {reading.primary.host_name}",
                             "event": event.pk})
    return event


def protection_crash_restart_failed(*, protection: Protection, reading: health.Reading, why: str) -> None:
    """Restarting a crashed Level 2 VM from its copy failed: the event failed, ``failover_failed`` raised."""
    vm, from_name, to_name = protection.vm, reading.primary.host_name, reading.secondary.host_name
    with transaction.atomic():
        event = FailoverEvent.objects.select_for_update().filter(
            pool=protection.pool, vm_uuid=vm.uuid, state=FailoverEvent.State.DOWN).first()
        if event is not None:
            event.state = FailoverEvent.State.FAILED
            event.save(update_fields=["state"])
        alerts.alert_raise(
            condition=Condition.FAILOVER_FAILED, object_key=component_key(vm, "failover"), pool=protection.pool,
            vm_name=vm.name_label, host_name=from_name, old_state=f"running on {from_name}", new_state="not running",
            message=(f"Level {protection.level} failover of {vm.name_label} failed"
                     f" ({_pair_words(protection, reading)}): its guest "
                     f"crashed on {from_name} and its copy on {to_name} could not be started: {why}"),
            details={"from_host": reading.primary.host.uuid if reading.primary.host else "",
                     "event": event.pk if event else None},
        )


UNSHOWN = {"since", "rtt_ms", "checkpoint"}  # component fields whose change alone is not pushed to the pages


def protection_health_record(*, reading: health.Reading) -> bool:
    """Record what one reading of a Level 2 protection's AMs says: its components (each with the time its
    state began), the alerts of each loss and return of redundancy, a failover, and the protection's status
    with a reason. Emits protection.change after commit when anything shown changed. Returns that."""
    now = timezone.now()
    with transaction.atomic():
        protection = (Protection.objects.select_for_update(of=("self",))
                      .select_related("vm", "pool").filter(pk=reading.protection.pk).first())
        if protection is None or not uses_ams(protection.level) or protection.status not in LEVEL2_WATCHED:
            return False
        if protection.status == ProtectionStatus.FAILED and not protection.components:
            return False  # failed by its workflow: only a new workflow changes that
        before = (protection.status, protection.status_reason, protection.failed_over_to_id,
                  [{k: v for k, v in c.items() if k not in UNSHOWN} for c in protection.components])
        forced = _failover(protection, reading, now)
        # the components as they are after the failover's record (a failed-over VM has a standby to show)
        reading.protection.failed_over_to_id = protection.failed_over_to_id
        components = health.components_of(reading)
        previous = {c["id"]: c for c in protection.components if isinstance(c, dict) and "id" in c}
        for c in components:
            old = previous.get(c["id"]) or {}
            c["since"] = old.get("since") if old.get("state") == c["state"] and old.get("since") else now.isoformat()
        _component_alerts(protection, reading, components, previous)
        if protection.level == Level.SYSTEM_FT:
            _checkpoint_alert(protection, reading)
        moved = ""
        if protection.failed_over_to_id is not None:
            moved = (f"Failed over: the VM runs on {protection.failed_over_to.name_label} since "
                     f"{protection.failed_over_at:%Y-%m-%d %H:%M:%S} UTC. ")
        bad = [c for c in components if c["state"] != ComponentState.OK]
        by_disk: dict[str, list[str]] = {}
        for c in components:
            if c["kind"] == "Disk replica":
                by_disk.setdefault(c["name"], []).append(c["state"])
        dead_disks = [n for n, states in by_disk.items() if ComponentState.FAILED in states
                      and not ({ComponentState.OK, ComponentState.DEGRADED} & set(states))]
        if forced:
            status, reason = forced
        elif dead_disks:
            status = ProtectionStatus.FAILED
            reason = moved + f"No usable replica of disk(s) {', '.join(dead_disks)}: " + "; ".join(
                c["detail"] for c in bad if c["kind"] == "Disk replica")
        elif bad:
            status = ProtectionStatus.DEGRADED
            reason = moved + " ".join(c["detail"] for c in bad[:6]) + (f" (and {len(bad) - 6} more)" if len(bad) > 6
                                                                       else "")
        else:
            status, reason = ProtectionStatus.PROTECTED, moved.strip()
            alerts.alert_clear(condition=Condition.FAILOVER_DONE, object_key=component_key(protection.vm, "failover"),
                               new_state="redundant", message=f"{protection.vm.name_label} has its Level "
                                                              f"{protection.level} redundancy back after its failover.")
        protection.status, protection.status_reason = status, reason
        protection.components, protection.components_checked_at = components, now
        if reading.secondary_vm_running and protection.failed_over_to_id is not None:
            protection.observed_host_id = protection.failed_over_to_id
            protection.observed_power_state = "Running"
        protection.save(update_fields=["status", "status_reason", "components", "components_checked_at",
                                       "failed_over_to", "failed_over_at", "observed_host", "observed_power_state",
                                       "updated_at"])
        changed = before != (status, reason, protection.failed_over_to_id,
                             [{k: v for k, v in c.items() if k not in UNSHOWN} for c in components])
        if changed:
            emit(protection_change(pool=protection.pool.uuid, vm=protection.vm.uuid))
    return changed


def protection_verify_record(*, protection: Protection, results: dict[str, dict]) -> dict:
    """Record an active validation (``health.protection_verify``: each disk's POST …/verify answer, or the
    error) as ``Protection.last_verify``; a mismatch raises the validation alert, a clean one clears it."""
    now = timezone.now()
    mismatches = sum(len(r.get("mismatches") or []) for r in results.values())
    errors = {name: r["error"] for name, r in results.items() if r.get("error")}
    ok = not mismatches and not errors and bool(results)
    if mismatches:
        message = (f"{mismatches} chunk(s) differ between the replicas of "
                   + ", ".join(n for n, r in results.items() if r.get("mismatches")) + ".")
    elif errors:
        message = "Not validated: " + " ".join(errors.values())
    else:
        message = f"{len(results)} disk(s) validated: the replicas are identical."
    record = {"at": now.isoformat(), "ok": ok, "mismatches": mismatches, "disks": results, "message": message}
    with transaction.atomic():
        protection = Protection.objects.select_for_update(of=("self",)).select_related("vm", "pool").get(
            pk=protection.pk)
        vm, pool = protection.vm, protection.pool
        key = component_key(vm, "verify")
        hosts = ", ".join(sorted({d.primary_host.name_label for d in protection.disks.all() if d.primary_host}
                                 | {d.secondary_host.name_label for d in protection.disks.all() if d.secondary_host}))
        if mismatches:
            alerts.alert_raise(
                condition=Condition.VALIDATION_MISMATCH, object_key=key, pool=pool, vm_name=vm.name_label,
                old_state="identical", new_state=f"{mismatches} chunk(s) differ",
                message=f"Validation of {vm.name_label}'s Level {protection.level} replicas"
                        f" (pool {pool.name}, hosts {hosts}): "
                        f"{message} Resync the replica from the primary (resync on its AM).",
                details={"disks": {n: r.get("mismatches") for n, r in results.items()}},
            )
        elif ok:
            alerts.alert_clear(condition=Condition.VALIDATION_MISMATCH, object_key=key, new_state="identical",
                               message=f"Validation of {vm.name_label}'s Level {protection.level} replicas"
                                       f" (pool {pool.name}, hosts "
                                       f"{hosts}): the replicas are identical again.")
        protection.last_verify = record
        protection.save(update_fields=["last_verify", "updated_at"])
        emit(protection_change(pool=pool.uuid, vm=vm.uuid))
    return record


def _swap_request(*, protection: Protection, requested_by, via: str, remote_addr: str | None) -> dict:
    """The planned role swap of the whole VM (``workflows``, ``RunKind.SWAP``): the VM moves live to the host of
    its copy, the copy waits paused on the host it left, the AMs' roles and the protection's hosts follow.
    Refused (Conflict) when it cannot be done as things stand; done by a worker, step by step."""
    with transaction.atomic():
        protection = (Protection.objects.select_for_update(of=("self",))
                      .select_related("vm", "pool", "secondary_host", "failed_over_to").get(pk=protection.pk))
        vm = protection.vm
        if protection.failed_over_to_id is not None:
            raise Conflict(f"The VM runs from its copy on {protection.failed_over_to.name_label} after a failover: "
                           "there is no standby to swap with until it is protected again.")
        if protection.status not in (ProtectionStatus.PROTECTED, ProtectionStatus.DEGRADED):
            raise Conflict(f"The protection is {protection.get_status_display().lower()}: wait until it is "
                           "protected or degraded.")
        if WorkflowRun.objects.filter(vm=vm, state__in=ACTIVE_RUN_STATES).exists():
            raise Conflict("A workflow is running for this VM: wait for it to finish.")
        disks = list(protection.disks.select_related("primary_host", "secondary_host"))
        first = disks[0] if disks else None
        if first is None or not (first.primary_am_url and first.secondary_am_url and first.primary_host
                                 and first.secondary_host):
            raise Conflict("The protection has no mirrored disk on two hosts: there is nothing to swap.")
        source, target = first.primary_host, first.secondary_host
        if vm.power_state != "Running":
            raise Conflict(f"The VM is {vm.power_state.lower()}: only a running VM is swapped.")
        if vm.resident_on_id != source.pk:
            where = vm.resident_on.name_label if vm.resident_on else "no host"
            raise Conflict(f"The VM runs on {where}, not on its primary host {source.name_label}: a planned swap "
                           "moves it from there.")
        copy = next((c for c in protection.components or [] if c.get("id") == "secondary-vm"), None)
        if copy is None or copy.get("state") != ComponentState.OK:
            raise Conflict(f"The secondary VM does not wait paused on {target.name_label}: "
                           + ((copy or {}).get("detail") or "its state is not known yet."))
        params = {"level": int(protection.level), "from_host": source.uuid, "to_host": target.uuid,
                  "from_am": first.primary_am_url, "to_am": first.secondary_am_url, "swapped": not protection.swapped,
                  "status_before": protection.status, "reason_before": protection.status_reason}
        protection.status = ProtectionStatus.PROTECTING
        protection.status_reason = f"Planned role swap: moving the VM from {source.name_label} to {target.name_label}."
        protection.save(update_fields=["status", "status_reason", "updated_at"])
        run = _run_create(kind=RunKind.SWAP, pool=protection.pool, vm=vm, protection=protection, params=params,
                          requested_by=requested_by, remote_addr=remote_addr)
        audit_record(user=requested_by, action=AuditAction.LEVEL2_ACTION, via=via, remote_addr=remote_addr,
                     pool=protection.pool, vm=vm, detail={"action": Level2Action.SWAP.value, "run": run.pk,
                                                          "from": source.uuid, "to": target.uuid})
        emit(protection_change(pool=protection.pool.uuid, vm=vm.uuid))
    return {"action": Level2Action.SWAP.value, "disk": "", "queued": True, "run": run.pk,
            "message": f"{Level2Action.SWAP.label}: the VM moves from {source.name_label} to {target.name_label}; "
                       "the VM's page shows each step."}


def protection_level2_request(*, protection: Protection, action: str, disk: str = "", requested_by,
                              via: str = "api", remote_addr: str | None = None) -> dict:
    """Ask a Level 2 protection's AMs to validate the replicas, swap roles (planned) or resync a repaired
    disk. Checked here, done by a worker (``tasks.level2_action``): the answer says what was queued.

    Raises PermissionDenied, ValidationError (not Level 2, an unknown action or disk) or Conflict (the
    protection's state refuses it, with why)."""
    _require_administrator(requested_by)
    if action not in Level2Action.values:
        raise ValidationError({"action": f"Must be one of: {', '.join(Level2Action.values)}."})
    if not uses_ams(protection.level):
        raise ValidationError({"action": f"The VM is protected at Level {protection.level}: only a Level 2 "
                                         "protection has Availability Managers to ask."})
    disks = list(protection.disks.all())
    names = {d.userdevice: d.resource for d in disks} | {d.resource: d.resource for d in disks}
    if disk and disk not in names:
        raise ValidationError({"disk": f"The VM has no protected disk {disk!r}: one of "
                                       f"{', '.join(sorted(d.userdevice or d.resource for d in disks)) or 'none'}."})
    if protection.status not in (ProtectionStatus.PROTECTED, ProtectionStatus.DEGRADED):
        raise Conflict(f"The protection is {protection.get_status_display().lower()}: wait until it is protected "
                       "or degraded.")
    if WorkflowRun.objects.filter(vm=protection.vm, state__in=ACTIVE_RUN_STATES).exists():
        raise Conflict("A workflow is running for this VM: wait for it to finish.")
    comps = protection.components or []
    if action == Level2Action.SWAP:
        peer = next((c for c in comps if c.get("id") == "peer"), None)
        if peer is None or peer.get("state") != ComponentState.OK:
            raise Conflict("A planned swap needs both AMs connected on both links: "
                           + ((peer or {}).get("detail") or "their state is not known yet."))
    if action == Level2Action.SWAP:
        return _swap_request(protection=protection, requested_by=requested_by, via=via, remote_addr=remote_addr)
    if action == Level2Action.REPAIR:
        failed = [c for c in comps if c.get("kind") == "Disk replica" and c.get("state") == ComponentState.FAILED
                  and (not disk or c.get("name") in (disk, names.get(disk)))]
        if not failed:
            raise Conflict("No disk replica is failed" + (f" for disk {disk}" if disk else "")
                           + ": there is nothing to repair.")
    resource = names.get(disk, "") if disk else ""
    with transaction.atomic():
        audit_record(user=requested_by, action=AuditAction.LEVEL2_ACTION, via=via, remote_addr=remote_addr,
                     pool=protection.pool, vm=protection.vm, detail={"action": action, "disk": resource})
        tasks.level2_action.delay_on_commit(protection.pk, action, resource)
    return {"action": action, "disk": resource, "queued": True,
            "message": f"{Level2Action(action).label}: asked; the VM's page shows the outcome."}
