"""A Level 2 VM whose guest crashed on its primary host, restarted from its copy on the secondary host.

A primary host's crash is the AMs' business (the secondary's AM is granted the disks by the witness and its
``on_promote`` unpauses the copy). A guest that crashes on a live host leaves the AMs connected and mirroring:
nothing on the hosts notices. The console does, from the inventory (the VM halted) and XAPI (a ``VM_CRASHED``
message since the VM last started: an owner's shutdown is not restarted), and restarts it the same way:

1. a ``FailoverEvent`` opened (``services.protection_crash_seen``), so the downtime counts from the crash;
2. each disk's roles swapped (``POST …/swap`` on the primary's AM: a planned hand-over, the replicas stay in
   sync) and the secondary's AM seen primary of every disk;
3. the copy unpaused on the secondary host (``VM.unpause``): it runs from the mirrored disks, with the VM's MACs.

The next health reading sees the VM halted and its copy running (``health.took_over``) and records the failover
as for a host crash: the protected VM shown on the secondary host, ``failover_done`` raised. Anything that goes
wrong is ``failover_failed`` with the reason (``services.protection_crash_restart_failed``).

``reserve_again`` is the other half of staying protected: a VM that must stand paused for a takeover (the copy on
the secondary host after that host's crash, or the VM's own record on the former primary after a failover) and
is halted while its host is back is started paused there (``VM.start_on(…, start_paused=True)``), at most once a
minute per protection; when XAPI refuses (not enough memory, say) the component stays degraded with its repair.
"""
from __future__ import annotations

import logging
import time
import xmlrpc.client  # noqa: S411 - XAPI's datetime type; nothing is parsed here
from datetime import UTC, datetime, timedelta

from django.core.cache import cache

from inventory.xapi import pool_client
from inventory.xapi_errors import XapiError

from . import health, services
from .am_client import AMClient, AMError
from .models import Protection

log = logging.getLogger(__name__)

CRASH_MESSAGE = "VM_CRASHED"
PROMOTION_TIMEOUT = 10.0  # seconds for the secondary's AM to say it is primary after the swap
RESERVE_RETRY = 60  # seconds between two attempts to start a standby paused, per protection


class RestartFailed(Exception):
    """The copy could not be started; the message says why, in words."""


def _instant(value) -> datetime | None:
    """XAPI's datetime (an xmlrpc DateTime or its text, ``20261207T06:45:14Z``) as an aware datetime."""
    text = str(getattr(value, "value", value) or "").replace("-", "").replace(":", "")
    try:
        return datetime.strptime(text[:15], "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def crashed_since_start(client, vm_uuid: str) -> bool:
    """XAPI has a ``VM_CRASHED`` message about the VM since it last started (its metrics' start time). Both
    are whole seconds: a crash in the second of the start counts (asked from a second before, compared here)."""
    vm_ref = client.call("VM.get_by_uuid", vm_uuid)
    started = None
    metrics = client.call("VM.get_metrics", vm_ref)
    if metrics and metrics != "OpaqueRef:NULL":
        started = _instant(client.call("VM_metrics.get_start_time", metrics))
    since = (started - timedelta(seconds=1)) if started else datetime(1970, 1, 1, tzinfo=UTC)
    messages = client.call("message.get", "VM", vm_uuid, xmlrpc.client.DateTime(since.strftime("%Y%m%dT%H:%M:%SZ")))
    for message in (messages or {}).values():
        at = _instant((message or {}).get("timestamp"))
        if (message or {}).get("name") == CRASH_MESSAGE and (started is None or (at is not None and at >= started)):
            return True
    return False


def restart_crashed(protection_id: int) -> str:
    """Restart the protected VM from its copy when ``health.crash_restart_due`` and XAPI says it crashed: what
    was done, in words ("" when there was nothing to do). One worker at a time per protection."""
    lock = f"eac:l2-crash-restart:{protection_id}"
    if not cache.add(lock, "1", timeout=120):
        return ""
    try:
        protection = (Protection.objects.select_related("vm", "pool", "secondary_host")
                      .filter(pk=protection_id).first())
        if protection is None:
            return ""
        reading = health.protection_read(protection)
        if not health.crash_restart_due(reading):
            return ""
        vm = protection.vm
        client = pool_client(protection.pool)
        try:
            if not crashed_since_start(client, vm.uuid):
                return ""  # its owner shut it down: not ours to restart
            services.protection_crash_seen(protection=protection, reading=reading)
            try:
                _swap_disks(reading)
                copy = client.call("VM.get_by_uuid", protection.secondary_vm_uuid)
                client.call("VM.unpause", copy)
            except (AMError, XapiError, RestartFailed) as exc:
                why = getattr(exc, "sentence", None) or str(exc)
                log.error("level 2: restarting %s from its copy failed: %s", vm.name_label, why)
                services.protection_crash_restart_failed(protection=protection, reading=reading, why=why)
                return why
        finally:
            client.logout()
        to = reading.secondary.host_name
        log.info("level 2: %s crashed on %s: restarted from its copy on %s", vm.name_label,
                 reading.primary.host_name, to)
        return f"{vm.name_label} crashed on {reading.primary.host_name}: restarted from its copy on {to}."
    finally:
        cache.delete(lock)


def _swap_disks(reading: health.Reading) -> None:
    primary, secondary = reading.ams
    with AMClient(primary.url) as am:
        for disk in reading.disks:
            am.resource_action(disk.resource, "swap")
    deadline = time.monotonic() + PROMOTION_TIMEOUT
    with AMClient(secondary.url) as am:
        while True:
            roles = {d.resource: (am.resource_or_none(d.resource) or {}).get("role") for d in reading.disks}
            if all(role == "Primary" for role in roles.values()):
                return
            if time.monotonic() > deadline:
                raise RestartFailed(f"the AM on {secondary.host_name} was not primary of every disk "
                                    f"{PROMOTION_TIMEOUT:g} s after the swap ({roles})")
            time.sleep(0.1)


def reserve_again(reading: health.Reading) -> str:
    """Start paused the VM that ``health.reservation_due`` names, on its host: what was done ("" if nothing)."""
    due = health.reservation_due(reading)
    if due is None:
        return ""
    uuid, host = due
    protection = reading.protection
    if not cache.add(f"eac:l2-reserve:{protection.pk}", "1", timeout=RESERVE_RETRY):
        return ""
    client = pool_client(protection.pool)
    try:
        client.call("VM.start_on", client.call("VM.get_by_uuid", uuid), client.call("host.get_by_uuid", host.uuid),
                    True, False)
    except XapiError as exc:
        log.warning("level 2: %s: could not start %s paused on %s to hold its memory: %s",
                    protection.vm.name_label, uuid, host.name_label, exc)
        return ""
    finally:
        client.logout()
    log.info("level 2: %s: %s started paused on %s: its memory is held for a takeover again",
             protection.vm.name_label, uuid, host.name_label)
    return f"{uuid} started paused on {host.name_label}"
