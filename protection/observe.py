"""What a batch of inventory changes means for protection: failovers, alerts, protection statuses.

The watcher announces each committed batch (``inventory.signals.batch_committed``); the receiver
connected in ``ProtectionConfig.ready()`` calls ``protection_observe_changes``, and the beat sweep
calls ``pools_evaluate`` in case a batch was missed. Everything here is "look at the inventory,
bring the protection records and alerts in line": evaluating twice changes nothing.
"""
from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from alerts import selectors as alert_reads
from alerts import services as alerts
from alerts.choices import Condition
from alerts.keys import alert_key
from eac.realtime import emit, protection_change
from inventory.choices import ConnectionState
from inventory.models import Host, Pool

from . import selectors, tasks
from .choices import RUNNING_STATES, ProtectionStatus, uses_ams
from .models import FailoverEvent, Protection

log = logging.getLogger(__name__)


def protection_observe_changes(*, pool: Pool, changed: dict[str, set[str]] | None = None) -> None:
    """Called by the watcher after each committed batch: re-evaluate what the changes may mean.

    ``changed`` maps XAPI class names ("host", "vm", "pool", …) to the uuids that changed; any change
    to hosts, their PIFs (a NIC's carrier: a Level 2 component) or the pool re-evaluates the whole pool (a pool
    has few hosts), a change to VMs only the protections of those VMs. Raises nothing: a failure here is logged
    and the beat sweep catches up.
    """
    changed = {str(k).lower(): set(v or ()) for k, v in (changed or {}).items()}
    whole = not changed or any(k.startswith(("host", "pool", "pif")) for k in changed)
    vm_uuids = set().union(*(v for k, v in changed.items() if k.startswith("vm"))) if changed else set()
    try:
        protection_evaluate_pool(pool=pool, vm_uuids=None if whole else vm_uuids)
    except Exception:
        log.exception("protection: evaluating pool %s failed", pool.pk)


def protection_evaluate_pool(*, pool: Pool, vm_uuids: set[str] | None = None) -> None:
    """Bring alerts, failover events and protection statuses in line with the inventory of ``pool``.

    ``vm_uuids``: only these VMs changed (a batch of VM events, many a second on a busy pool). The pool's own state
    (reachable, HA on or off) did not, so what depends on it alone is left to the whole evaluation that follows each
    change of it; the failover plan is judged again only where HA is on (VMs starting and stopping move it)."""
    whole = vm_uuids is None
    if not whole:
        if not vm_uuids:
            return
        # None of them protected and no HA (as the caller's pool has it: the watcher's follows XAPI's pool record, and
        # HA turned on is a change of the pool, judged whole): nothing to judge, in one read, with no transaction.
        if not pool.ha_enabled and not Protection.objects.filter(pool_id=pool.pk, vm__uuid__in=vm_uuids).exists():
            return
    pool = Pool.objects.get(pk=pool.pk)
    with transaction.atomic():
        if whole:
            _evaluate_reachability(pool)
        if pool.connection_state != ConnectionState.CONNECTED:
            return  # the inventory is stale: judge hosts and VMs only from fresh data
        protections = Protection.objects.filter(pool=pool).select_related("vm").select_for_update(of=("self",))
        if not whole:
            protections = list(protections.filter(vm__uuid__in=vm_uuids))
            if not protections and not pool.ha_enabled:
                return  # none of them is protected, and no plan to judge
        hosts = {h.pk: h for h in Host.objects.filter(pool=pool)}
        if whole:
            _evaluate_hosts(pool, hosts.values())
        plan_ok = _evaluate_plan(pool) if whole or pool.ha_enabled else False
        # The open failovers of the pool in one query, not two per protected VM.
        open_events: dict[tuple[str, str], FailoverEvent] = {}
        for event in FailoverEvent.objects.select_for_update().filter(
            pool=pool, state__in=[FailoverEvent.State.DOWN, FailoverEvent.State.FAILED]
        ).order_by("detected_at"):
            open_events[(event.vm_uuid, event.state)] = event
        for protection in protections:
            _evaluate_protection(protection, hosts, plan_ok, open_events)


def _evaluate_reachability(pool: Pool) -> None:
    key = alert_key(pool)
    if pool.connection_state == ConnectionState.UNREACHABLE:
        if not alert_reads.alert_is_open(condition=Condition.POOL_UNREACHABLE, object_key=key):
            alerts.alert_raise(
                condition=Condition.POOL_UNREACHABLE, object_key=key, pool=pool, old_state="connected",
                new_state="unreachable",
                message=f"The console cannot reach pool {pool.name}: {pool.last_error or 'no answer'}",
            )
    elif pool.connection_state == ConnectionState.CONNECTED:
        alerts.alert_clear(condition=Condition.POOL_UNREACHABLE, object_key=key, new_state="connected",
                           message=f"The console reaches pool {pool.name} again.")


def _evaluate_hosts(pool: Pool, hosts) -> None:
    open_lost = alert_reads.open_object_keys(condition=Condition.HOST_LOST, pool=pool)
    for host in hosts:
        key = alert_key(host)
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
            for alert in alert_reads.open_alerts(condition=Condition.VM_RESTARTED, pool=pool, from_host=host.uuid):
                alerts.alert_clear(condition=Condition.VM_RESTARTED, object_key=alert.object_key,
                                   new_state="redundant",
                                   message=f"{alert.vm_name}: host {host.name_label}, which it was restarted "
                                           "away from, is live again.")


def _evaluate_plan(pool: Pool) -> bool:
    """True if the pool's failover plan holds as XAPI reports it (HA on, plan exists for the configured n)."""
    key = alert_key(pool)
    if not pool.ha_enabled:
        alerts.alert_clear(condition=Condition.PLAN_OVERCOMMITTED, object_key=key, new_state="HA off",
                           message=f"High availability is off on pool {pool.name}.")
        return False
    ok = selectors.pool_plan_holds(pool)
    if not ok and not alert_reads.alert_is_open(condition=Condition.PLAN_OVERCOMMITTED, object_key=key):
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
    """When the host was lost, to date a failover from: when XAPI last heard from it (its metrics'
    last update, which stops when it dies), else when the console found it lost (its alert), else now."""
    if host is None:
        return now
    if not host.live and host.last_heard_at is not None:
        return min(host.last_heard_at, now)
    raised = alert_reads.open_alert_raised_at(condition=Condition.HOST_LOST, object_key=alert_key(host))
    return min(raised, now) if raised else now


def _evaluate_protection(protection: Protection, hosts: dict[int, Host], plan_ok: bool,
                         open_events: dict[tuple[str, str], FailoverEvent]) -> None:
    if protection.status in (ProtectionStatus.PROTECTING, ProtectionStatus.UNPROTECTING, ProtectionStatus.CANDIDATE):
        return  # a workflow owns the status
    if uses_ams(protection.level):
        # Level 2 (and 3): its AMs, not XAPI HA, take over a lost host's VM; its status and failovers follow what
        # they say (health.py, services.protection_health_record). A change seen here is a reason to ask them.
        transaction.on_commit(lambda pk=protection.pk: tasks.level2_poll.delay(pk))
        return
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
            _event_restarted(event, here, now)
            _alert_restarted(protection, event)
        if failed_event is not None:
            _event_restarted(failed_event, here, now)
            alerts.alert_clear(condition=Condition.VM_RESTART_FAILED, object_key=alert_key(vm),
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
        emit(protection_change(pool=pool.uuid, vm=vm.uuid))


def _event_restarted(event: FailoverEvent, here: Host | None, now) -> None:
    """The VM of ``event`` runs again, on ``here``: close the failover with its downtime."""
    event.state = FailoverEvent.State.RESTARTED
    event.to_host = here
    event.to_host_name = here.name_label if here else ""
    event.restarted_at = now
    event.downtime_seconds = max(0.0, (now - event.detected_at).total_seconds())
    event.save()


def _degraded_reason(pool: Pool) -> str:
    if not pool.ha_enabled:
        return "High availability is off on the pool: nothing would restart the VM."
    return (f"The failover plan covers {pool.ha_plan_exists_for} host failure(s), fewer than the "
            f"{pool.ha_host_failures_to_tolerate} configured.")


def _alert_restarted(protection: Protection, event: FailoverEvent) -> None:
    vm = protection.vm
    alerts.alert_raise(
        condition=Condition.VM_RESTARTED, object_key=alert_key(vm), pool=protection.pool, vm_name=vm.name_label,
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
        condition=Condition.VM_RESTART_FAILED, object_key=alert_key(vm), pool=protection.pool,
        vm_name=vm.name_label, host_name=event.from_host_name, old_state=f"running on {event.from_host_name}",
        new_state="halted", downtime_seconds=(now - event.detected_at).total_seconds(),
        message=(f"{vm.name_label} was not restarted after host {event.from_host_name} was lost "
                 f"{(now - event.detected_at).total_seconds():.0f} s ago."),
        details={"from_host": event.from_host.uuid if event.from_host else "", "event": event.pk},
    )


def pools_evaluate() -> int:
    """Re-evaluate every pool (unreachable pools, overdue restarts): the beat's safety net in case a
    watcher notification was missed. Returns how many pools were evaluated."""
    pools = 0
    for pool in Pool.objects.all():
        try:
            protection_evaluate_pool(pool=pool)
            pools += 1
        except Exception:
            log.exception("protection sweep: pool %s", pool.pk)
    return pools
