"""Writes of the inventory: registering and removing pools, the watcher's connection state, and VM power actions.

Inventory rows themselves are written by the watcher only, through ``inventory.sync``, and deleted in bulk when
their pool is removed (``pool_remove_rows``).
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

from django.core.exceptions import PermissionDenied, ValidationError
from django.core.validators import URLValidator
from django.db import connection, transaction
from django.utils import timezone

from eac.audit import AuditAction, audit_record
from eac.errors import Conflict
from eac.permissions import user_can_change_protection
from eac.realtime import emit, emit_many, inventory_change, pools_change

from .choices import ConnectionState, PowerState
from .models import VM, Pool
from .removal import DELETE, REFUSE, removal_plan
from .selectors import xapi_error_describe
from .watch_lock import NAMESPACE, _key
from .xapi import XapiAuthError, XapiError, XapiUnreachable, connect, pool_client, safe_url

log = logging.getLogger(__name__)

# A connection test should answer quickly; a user is waiting for the form.
PROBE_TIMEOUT = 15.0


@dataclass(frozen=True)
class PoolProbe:
    """What a successful connection test found: the pool and where its master is."""

    url: str
    username: str
    verify_tls: bool
    master_url: str
    uuid: str
    ref: str
    name_label: str


def _validate_url(url: str) -> str:
    url = (url or "").strip()
    if not url:
        raise ValidationError({"url": "Give the URL of the pool master, e.g. https://xcp-master.example.org."})
    try:
        URLValidator(schemes=["http", "https"])(url)
    except ValidationError:
        raise ValidationError({"url": f"{safe_url(url)} is not a valid http:// or https:// URL."}) from None
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise ValidationError({"url": "Put the user name and password in their own fields, not in the URL."})
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ValidationError({"url": "Give the host's address only (scheme, host and port), without a path."})
    return url.rstrip("/")


def pool_probe(*, url: str, username: str, password: str, verify_tls: bool = True,
               timeout: float = PROBE_TIMEOUT) -> PoolProbe:
    """Log in to the pool (following HOST_IS_SLAVE), read its identity, log out.

    Raises ValidationError with a sentence saying what went wrong: nothing
    answers, the certificate, the credentials, or what XAPI refused.
    """
    url = _validate_url(url)
    if not username:
        raise ValidationError({"username": "Give the user name to log in to the pool with."})
    if not password:
        raise ValidationError({"password": "Give the password of that user."})
    try:
        with connect(url, username, password, verify_tls=verify_tls, timeout=timeout) as client:
            pool_ref = client.call("pool.get_all")[0]
            record = client.call("pool.get_record", pool_ref)
            master_url = client.url
    except XapiAuthError as exc:
        raise ValidationError({"password": f"Could not log in to {safe_url(url)}: {exc.describe()}"}) from None
    except XapiUnreachable as exc:
        raise ValidationError({"url": f"Could not connect: {exc.describe()}"}) from None
    except XapiError as exc:
        raise ValidationError({"url": f"Could not connect to {safe_url(url)}: {exc.describe()}"}) from None
    except IndexError:
        raise ValidationError({"url": f"{safe_url(url)} answered, but has no pool."}) from None
    return PoolProbe(url=url, username=username, verify_tls=verify_tls, master_url=master_url,
                     uuid=str(record.get("uuid", "")), ref=pool_ref, name_label=str(record.get("name_label", "")))


def _check_unique(*, name: str | None, uuid: str | None, exclude_pk: int | None) -> None:
    others = Pool.objects.exclude(pk=exclude_pk) if exclude_pk else Pool.objects.all()
    if name is not None and others.filter(name=name).exists():
        raise ValidationError({"name": f"A pool named {name!r} exists already."})
    if uuid:
        twin = others.filter(uuid=uuid).first()
        if twin is not None:
            raise ValidationError({"url": f"This pool is already registered, as {twin.name!r}."})


def _announce(uuid: str, op: str, *, listing: bool = True) -> None:
    """Tell the pages showing the pool (its group); with ``listing`` (registered, changed, removed), every open
    page too, first: a page whose user may see a pool it does not show yet joins its group and resyncs."""
    if uuid:
        listed = [pools_change(pool=uuid, op=op)] if listing else []
        emit_many([*listed, inventory_change(pool=uuid, cls="pool", uuid=uuid, op=op)])


def pool_create(*, name: str, url: str, username: str, password: str, verify_tls: bool = True,
                probe: PoolProbe | None = None) -> Pool:
    """Register a pool after testing the connection (ValidationError if it fails); the watcher picks it up.

    ``probe``: a connection test just done for exactly these url/username/verify_tls (the admin form's)."""
    name = (name or "").strip()
    if not name:
        raise ValidationError({"name": "Give the pool a name."})
    if len(name) > Pool._meta.get_field("name").max_length:
        raise ValidationError({"name": "The name is too long (200 characters at most)."})
    url = _validate_url(url)
    _check_unique(name=name, uuid=None, exclude_pk=None)
    if probe is None or (probe.url, probe.username, probe.verify_tls) != (url, username, verify_tls):
        probe = pool_probe(url=url, username=username, password=password, verify_tls=verify_tls)
    with transaction.atomic():
        _check_unique(name=name, uuid=probe.uuid, exclude_pk=None)
        pool = Pool.objects.create(
            name=name, url=url, username=username, password=password, verify_tls=verify_tls,
            uuid=probe.uuid, ref=probe.ref, name_label=probe.name_label, master_url=probe.master_url,
        )
        _announce(pool.uuid, "add")
    log.info("pool %s added (uuid %s, master %s)", pool.name, pool.uuid, safe_url(pool.master_url))
    return pool


def pool_update(*, pool: Pool, name: str | None = None, url: str | None = None, username: str | None = None,
                password: str | None = None, verify_tls: bool | None = None,
                probe: PoolProbe | None = None) -> Pool:
    """Change a pool's name or connection; ``None`` (and an empty password) keeps the current value.

    A changed URL, user, password or TLS setting is tested before it is saved
    and must lead to the same pool (same uuid).  The watcher reconnects with it.
    """
    current = Pool.objects.get(pk=pool.pk)
    _refuse_if_removing(current)
    new_name = current.name if name is None else name.strip()
    if not new_name:
        raise ValidationError({"name": "Give the pool a name."})
    if len(new_name) > Pool._meta.get_field("name").max_length:
        raise ValidationError({"name": "The name is too long (200 characters at most)."})
    new_url = current.url if url is None else _validate_url(url)
    new_username = current.username if username is None else username
    new_password = password or current.password
    new_verify = current.verify_tls if verify_tls is None else verify_tls
    _check_unique(name=new_name, uuid=None, exclude_pk=current.pk)

    connection_changed = (new_url, new_username, new_password, new_verify) != (
        current.url, current.username, current.password, current.verify_tls)
    if connection_changed:
        # Tested outside the transaction: a slow pool must not hold a row lock.
        if probe is None or (probe.url, probe.username, probe.verify_tls) != (new_url, new_username, new_verify):
            probe = pool_probe(url=new_url, username=new_username, password=new_password, verify_tls=new_verify)
        if current.uuid and probe.uuid != current.uuid:
            raise ValidationError({"url": f"{safe_url(new_url)} leads to another pool "
                                          f"({probe.name_label or probe.uuid}); add it as a new pool instead."})

    with transaction.atomic():
        current = Pool.objects.select_for_update().get(pk=pool.pk)
        _refuse_if_removing(current)  # again: a removal may have been requested while the connection was tested
        _check_unique(name=new_name, uuid=probe.uuid if probe else None, exclude_pk=current.pk)
        if connection_changed and probe is not None:
            current.uuid, current.ref, current.name_label = probe.uuid, probe.ref, probe.name_label
            current.master_url = probe.master_url
            current.last_error = ""
        current.name, current.url, current.username = new_name, new_url, new_username
        current.password, current.verify_tls = new_password, new_verify
        current.save()
        _announce(current.uuid, "mod")
    # The caller's instance reflects what was saved.
    for f in Pool._meta.concrete_fields:
        setattr(pool, f.attname, getattr(current, f.attname))
    log.info("pool %s updated%s", current.name, " (connection changed)" if connection_changed else "")
    return pool


def _refuse_if_removing(pool: Pool) -> None:
    if pool.removing_since is not None:
        raise Conflict(f"{pool.name} is being removed: it can no longer be changed.")


# -- removing a pool ---------------------------------------------------------------------------------

# How long a removal waits for the pool's watcher to stop writing it before it deletes anyway. A watcher process
# rereads the pools every poll (3 s by default), stops the watcher of a pool being removed and lets go of its lock
# once that thread has ended; a process that is stuck must not hold a removal for ever.
WATCHER_STOP_WAIT = 30.0
# A pool marked this long ago and still there is queued again by the removal sweep: the task (watcher wait
# included) normally ends well within it, and a second run of a removal under way only waits for the first.
REMOVAL_RESEND_AFTER = 60.0


def pool_remove_request(*, pool: Pool, requested_by, via: str = "api", remote_addr: str | None = None) -> Pool:
    """Mark ``pool`` as being removed and have a worker delete it, with everything mirrored from it, in bulk
    (``pool_remove_rows``, run by the ``pool_remove`` task). Its watcher stops; it refuses changes meanwhile.

    Idempotent: a second request keeps the first date, writes no second audit line and queues the work again
    (harmless, the task is idempotent too), which resumes a removal whose task was lost. Raises Conflict, before
    marking anything, while rows that protect the pool (``on_delete=PROTECT``) exist. Returns ``pool``, its
    ``removing_since`` set."""
    reasons = _removal_refusals(pool.pk)
    if reasons:
        raise Conflict(f"{pool.name} cannot be removed.", reasons)
    with transaction.atomic():
        current = Pool.objects.select_for_update().filter(pk=pool.pk).first()
        if current is None:  # removed meanwhile: what was asked is done
            return pool
        if current.removing_since is None:
            current.removing_since = timezone.now()
            Pool.objects.filter(pk=current.pk).update(removing_since=current.removing_since)
            audit_record(user=requested_by, action=AuditAction.POOL_REMOVE, via=via, remote_addr=remote_addr,
                         pool=current, object_repr=current.name)
            _announce(current.uuid, "mod")  # the pages show it as being removed
            log.info("pool %s: removal requested", current.name)
        _enqueue_removal(current.pk, current.name)
    pool.removing_since = current.removing_since
    return pool


def _enqueue_removal(pool_id: int, name: str) -> None:
    from .tasks import pool_remove as pool_remove_task

    # Not delay_on_commit: with the broker down, its error would reach the caller after the pool was marked, as a
    # 500. The pool stays marked instead, and the removal sweep (or another request) queues the task again.
    def enqueue() -> None:
        try:
            pool_remove_task.delay(pool_id)
        except Exception as exc:
            log.warning("pool %s: removal not queued (%s: %s); the removal sweep will queue it", name,
                        type(exc).__name__, exc)

    transaction.on_commit(enqueue)


def _removal_refusals(pool_id: int) -> list[str]:
    """Why the pool cannot be removed, in sentences: rows that protect it or its rows (PROTECT, RESTRICT)."""
    reasons = []
    for step in removal_plan():
        if step.action == REFUSE:
            count = step.rows(pool_id).count()
            if count:
                meta = step.model._meta
                what = f"1 {meta.verbose_name} refers" if count == 1 else f"{count} {meta.verbose_name_plural} refer"
                reasons.append(f"{what} to it ({step.model._meta.label}.{step.column}): remove "
                               f"{'it' if count == 1 else 'them'} first.")
    return reasons


def _watcher_gone(pool_id: int) -> bool:
    """Whether no watcher writes the pool any more. On PostgreSQL: the pool's advisory lock is free (its holder let
    go of it once its watcher thread ended, or its session ended with its process; Pool.watcher may outlive a
    process killed, the lock never does). Elsewhere (SQLite: one watcher process, no locks): Pool.watcher is empty."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND classid = %s AND objid = %s AND objsubid = 2"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
                [NAMESPACE, _key(pool_id)])  # fmt: skip
            return cursor.fetchone()[0]
    return not Pool.objects.filter(pk=pool_id).values_list("watcher", flat=True).first()


def pool_remove_rows(*, pool_id: int, watcher_wait: float = WATCHER_STOP_WAIT) -> dict[str, int] | None:
    """Delete a pool being removed and every row of it in bulk, one statement per table (``inventory.removal``), in
    one transaction; then announce that it is gone. Returns the rows deleted or updated per model, or None when
    there was nothing to do (the pool is gone already, a re-run; or it is not being removed).

    First waits, up to ``watcher_wait`` seconds, until no watcher writes the pool, so that its rows are not written
    again behind the delete. Even a watcher's batch still in flight cannot bring them back: the pool's row is
    locked for the transaction, and once it is gone a batch's rows fail their foreign key at its commit.
    A run that died midway left nothing behind (one transaction): running again finishes the job."""
    pool = Pool.objects.filter(pk=pool_id).first()
    if pool is None:
        return None
    if pool.removing_since is None:
        log.warning("pool %s: not being removed; left alone", pool.name)
        return None
    deadline = time.monotonic() + watcher_wait
    while not _watcher_gone(pool_id):
        if time.monotonic() >= deadline:
            log.warning("pool %s: still held by a watcher after %.0f s; removing it anyway", pool.name, watcher_wait)
            break
        time.sleep(0.2)
    started = time.monotonic()
    counts: Counter[str] = Counter()
    # One transaction, not batches: a pool of 10,000 VMs with 2 disks and 2 NICs each, a tenth of them protected
    # (75,700 rows deleted, 5,000 set to NULL) goes in 0.8 s (median of 3; 1.05 s at worst) on PostgreSQL 15
    # (benchmarks/bench_pool_removal.py), and only the rows it deletes or updates are locked meanwhile. Batches
    # would show readers a pool half removed and need a resumable cursor, to save a second nobody waits for.
    with transaction.atomic():
        pool = Pool.objects.select_for_update().filter(pk=pool_id, removing_since__isnull=False).first()
        if pool is None:  # another run finished it while this one waited
            return None
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:  # no watcher takes the pool while it goes (released at commit)
                cursor.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", [NAMESPACE, _key(pool_id)])
        reasons = _removal_refusals(pool_id)
        if reasons:
            raise Conflict(f"{pool.name} cannot be removed.", reasons)
        for step in removal_plan():
            if step.action == REFUSE:
                continue
            rows = step.rows(pool_id)
            # No Collector, no signals: the plan is the cascade.
            done = rows._raw_delete(rows.db) if step.action == DELETE else rows.update(**{step.column: step.value})
            if done:
                counts[step.model._meta.label] += done
        seconds = time.monotonic() - started
        audit_record(user=None, action=AuditAction.POOL_REMOVED, via="system", object_repr=pool.name,
                     detail={"uuid": pool.uuid, "rows": dict(counts), "seconds": round(seconds, 3)})
        _announce(pool.uuid, "del")  # the pool leaves the pages
    log.info("pool %s removed: %d rows in %.2f s", pool.name, sum(counts.values()), seconds)
    return dict(counts)


def pools_removal_resume(*, older_than: float = REMOVAL_RESEND_AFTER) -> list[int]:
    """Queue again the removal of every pool marked for removal more than ``older_than`` seconds ago (the beat
    sweep): a task lost (the broker was down when the removal was requested) or failed (its retries spent on a
    deadlock with a watcher's last batch) is done at last. Returns the pools' ids."""
    from .tasks import pool_remove as pool_remove_task

    since = timezone.now() - timedelta(seconds=older_than)
    pending = list(Pool.objects.filter(removing_since__lt=since).values_list("pk", flat=True))
    for pk in pending:
        pool_remove_task.delay(pk)
    return pending


def pool_connection_state_set(*, pool: Pool, state: str, error: str = "") -> bool:
    """Record how the watcher's connection to ``pool`` is doing; announce a change.  Returns whether it changed.

    ``error`` is a sentence for the administrator (XapiError.describe()), never a secret."""
    if state not in ConnectionState.values:
        raise ValueError(f"unknown connection state {state!r}")
    if pool.connection_state == state and pool.last_error == error:
        return False
    with transaction.atomic():
        updated = Pool.objects.filter(pk=pool.pk).update(connection_state=state, last_error=error)
        pool.connection_state, pool.last_error = state, error
        if updated:
            _announce(pool.uuid, "mod", listing=False)  # the pages showing it re-render its labels
    return bool(updated)


def pool_watcher_set(*, pool_id: int, watcher: str, only_if: str | None = None) -> bool:
    """Record which ``watch_pools`` process keeps the pool in sync (``host:pid``), since now; ``""``: none.

    With ``only_if``, only while the pool still names that process: a watcher letting go of a pool clears its own
    name, never that of the process that took the pool over meanwhile. Returns whether the pool was updated."""
    with transaction.atomic():
        pools = Pool.objects.filter(pk=pool_id)
        if only_if is not None:
            pools = pools.filter(watcher=only_if)
        updated = pools.update(watcher=watcher, watched_since=timezone.now() if watcher else None)
        if updated:
            _announce(Pool.objects.values_list("uuid", flat=True).get(pk=pool_id), "mod", listing=False)
    return bool(updated)


# -- power actions on a VM ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerAction:
    method: str  # the XAPI call
    args: tuple  # after the VM's ref
    from_state: str  # the power state the action applies to
    audit: str  # AuditAction of the request


# VM.start(vm, start_paused, force): force=False, so XAPI keeps its checks (the failover plan among them).
POWER_ACTIONS: dict[str, PowerAction] = {
    "start": PowerAction("VM.start", (False, False), PowerState.HALTED, AuditAction.VM_START),
    "shutdown": PowerAction("VM.clean_shutdown", (), PowerState.RUNNING, AuditAction.VM_SHUTDOWN),
}


def vm_power_request(*, vm: VM, action: str, requested_by, via: str = "ui",
                     remote_addr: str | None = None) -> None:
    """Ask a worker to start or cleanly shut down ``vm`` (the web never calls XAPI in a request).

    Administrators only. The request is refused at once when the VM is not in the state the action
    applies to (as the console last saw it); XAPI may still refuse it, and the worker records why.
    """
    if not user_can_change_protection(requested_by):
        raise PermissionDenied("Only members of the Administrators group can start or shut down VMs.")
    spec = POWER_ACTIONS.get(action)
    if spec is None:
        raise ValidationError({"action": f"Unknown action {action[:40]!r}: use one of {', '.join(POWER_ACTIONS)}."})
    if Pool.objects.filter(pk=vm.pool_id, removing_since__isnull=False).exists():
        raise Conflict(f"{vm.name_label} belongs to a pool being removed: it can no longer be started or shut down.")
    if vm.power_state != spec.from_state:
        raise Conflict(f"{vm.name_label} is {vm.power_state.lower()}: it can be "
                       f"{'started' if action == 'start' else 'shut down'} only when {spec.from_state.lower()}.")
    from .tasks import vm_power as vm_power_task

    with transaction.atomic():
        audit_record(user=requested_by, action=spec.audit, via=via, remote_addr=remote_addr, pool=vm.pool, vm=vm)
        _announce_vm(vm)  # the page's events list shows the request
        vm_power_task.delay_on_commit(vm_id=vm.pk, action=action, requested_by_id=requested_by.pk)


def vm_power(*, vm_id: int, action: str, requested_by_id: int | None) -> str:
    """Run a power action on XAPI (in a worker). A refusal is written to the audit log as a sentence
    and the VM's page re-rendered, so the Administrator reads why; success shows through the watcher."""
    from django.contrib.auth import get_user_model

    vm = VM.objects.select_related("pool").filter(pk=vm_id).first()
    if vm is None:
        return "gone"
    spec = POWER_ACTIONS[action]
    try:
        with pool_client(vm.pool) as client:
            client.call(spec.method, vm.ref, *spec.args)
    except XapiError as exc:
        code, sentence = xapi_error_describe(exc, vm.pool)
        log.info("vm power: %s of %s refused: %s", action, vm.name_label, code)
        user = get_user_model().objects.filter(pk=requested_by_id).first() if requested_by_id else None
        with transaction.atomic():
            audit_record(user=user, action=AuditAction.VM_POWER_REFUSED, via="system", pool=vm.pool, vm=vm,
                         detail={"action": action, "code": code, "message": sentence})
            _announce_vm(vm)
        return code
    return "ok"


def _announce_vm(vm: VM) -> None:
    emit(inventory_change(pool=vm.pool.uuid, cls="vm", uuid=vm.uuid))
