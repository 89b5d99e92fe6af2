"""The pool watcher: one thread per pool keeps its inventory rows equal to XAPI.

A ``PoolWatcher`` connects (following the master), does a full sync, then
loops on ``event.from`` applying each batch; on any loss it reconnects with
backoff and resyncs.  A ``Supervisor`` rereads the Pool table every few
seconds: it starts a watcher for a new pool, stops the one of a deleted pool,
and restarts one whose connection settings changed.  It watches a pool only while
it holds the pool's lock (``watch_lock``), so that a second ``watch_pools``
process waits instead of writing the same rows.  ``manage.py watch_pools`` runs a
Supervisor.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterable

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection

from .choices import ConnectionState
from .models import Pool
from .services import pool_connection_state_set
from .signals import batch_committed
from .sync import EVENT_CLASSES, RECORD_FIELDS, PoolMirror, SyncResult, fetch_records
from .watch_lock import PoolLocks
from .xapi import XapiAuthError, XapiClient, XapiError, XapiUnreachable, pool_client, safe_url

log = logging.getLogger(__name__)

FIRST_RETRY_DELAY = 0.5
# Consecutive failed attempts after which a pool shows as unreachable rather than reconnecting.
UNREACHABLE_AFTER = 5
# Failures of event.from after which the watcher logs in again and does a full sync at once (no backoff).
RECONNECT_CODES = {"SESSION_INVALID", "EVENTS_LOST", "EVENT_FROM_TOKEN_PARSE_FAILURE", "TOO_MANY_PENDING_EVENTS",
                   "POOL_RESTARTED"}


class _Reconnect(Exception):
    """Log in again and resync at once (the session expired): not a failure of the pool."""


class _PoolGone(Exception):
    pass


def _counts(result: SyncResult) -> str:
    c = result.counts
    return (f"{c.get('host', 0)} hosts, {c.get('vm', 0)} VMs, {c.get('sr', 0)} SRs, {c.get('vdi', 0)} VDIs, "
            f"{c.get('vbd', 0)} VBDs, {c.get('network', 0)} networks, {c.get('pif', 0)} PIFs, {c.get('vif', 0)} VIFs, "
            f"{c.get('pbd', 0)} PBDs")


def full_sync(client: XapiClient, mirror: PoolMirror) -> tuple[str, SyncResult]:
    """Read everything and write it; returns the event.from token to continue from, and the result.

    The token is taken before reading, so a change made while reading arrives as an
    event afterwards (applied again, harmlessly) instead of being lost."""
    pool = mirror.pool
    started = time.monotonic()
    # With an empty token, event.from returns every subscribed object (just the pool here) and the
    # current token: cheap, and the same on every XAPI version.
    token = client.event_from(["pool"], "", 0.0)["token"]
    records = fetch_records(client)
    fetched = time.monotonic()
    result = mirror.full_sync(records)
    done = time.monotonic()
    log.info("pool %s: full sync from %s: %s in %.2f s (read %.2f s, write %.2f s)", pool.name,
             safe_url(client.url), _counts(result), done - started, fetched - started, done - fetched)
    return token, result


class PoolWatcher(threading.Thread):
    """Keeps one pool in sync until stopped or the pool is deleted."""

    def __init__(self, pool: Pool, *, event_timeout: float | None = None, max_delay: float | None = None) -> None:
        super().__init__(name=f"watch-{pool.name}"[:60], daemon=True)
        self.pool_id = pool.pk
        self.pool_name = pool.name
        self.fingerprint = fingerprint(pool)
        self.event_timeout = settings.EAC_EVENT_TIMEOUT if event_timeout is None else event_timeout
        self.max_delay = settings.EAC_RECONNECT_MAX_DELAY if max_delay is None else max_delay
        self._stopping = threading.Event()
        self._synced = False
        self._lock = threading.Lock()
        self._client: XapiClient | None = None

    # -- control, from another thread ----------------------------------------------------------

    def stop(self) -> None:
        """Ask the thread to end; a call blocked in event.from is broken off."""
        self._stopping.set()
        with self._lock:
            if self._client is not None:
                self._client.abort()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # -- the thread ----------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._loop()
        except _PoolGone:
            log.info("pool %s: deleted, watcher stops", self.pool_name)
        except Exception:  # the supervisor restarts a watcher that died
            log.exception("pool %s: watcher failed", self.pool_name)
        finally:
            self._set_client(None)
            connection.close()

    def _pool(self) -> Pool:
        pool = Pool.objects.filter(pk=self.pool_id).first()
        if pool is None:
            raise _PoolGone()
        self.pool_name = pool.name
        return pool

    def _set_client(self, client: XapiClient | None) -> None:
        with self._lock:
            old, self._client = self._client, client
            if client is not None and self._stopping.is_set():
                client.abort()
        if old is not None and old is not client:
            old.logout()

    def _set_state(self, pool: Pool, state: str, error: str = "") -> None:
        if pool_connection_state_set(pool=pool, state=state, error=error):
            log.info("pool %s: %s%s", pool.name, state, f" ({error})" if error else "")

    def _loop(self) -> None:
        delay = FIRST_RETRY_DELAY
        failures = 0
        while not self.stopping:
            pool = self._pool()
            self._synced = False
            error: str | None = None
            auth = False
            try:
                self._watch(pool)
                return  # stopped
            except _Reconnect as exc:
                log.info("pool %s: %s Logging in again for a full sync.", pool.name, exc)
                if self._stopping.wait(0.1):
                    break
                continue
            except XapiError as exc:
                error, auth = exc.describe(), isinstance(exc, XapiAuthError)
            except DatabaseError as exc:
                log.warning("pool %s: database error (%s); resyncing", pool.name, exc.__class__.__name__)
                connection.close()  # it may be broken; the next query opens a new one
            except _PoolGone:
                raise
            except Exception:  # a bug or a record we cannot read: keep watching, with backoff
                if self.stopping:
                    break
                log.exception("pool %s: unexpected failure; resyncing", pool.name)
                error = "The watcher failed unexpectedly (see its log); retrying."
            finally:
                self._set_client(None)
            if self.stopping:
                break
            if self._synced:  # the session had worked: a fresh loss, start the backoff over
                failures, delay = 0, FIRST_RETRY_DELAY
            failures += 1
            if error is not None:
                if auth:
                    state = ConnectionState.UNREACHABLE
                    delay = self.max_delay  # retrying soon will not fix a password
                elif failures < UNREACHABLE_AFTER:
                    state = ConnectionState.RECONNECTING
                else:
                    state = ConnectionState.UNREACHABLE
                self._failed(self._pool(), state, error)
            if self._stopping.wait(delay):
                break
            delay = min(delay * 2, self.max_delay)

    def _failed(self, pool: Pool, state: str, error: str) -> None:
        log.warning("pool %s: %s", pool.name, error)
        self._set_state(pool, state, error)
        _observe(pool)

    def _watch(self, pool: Pool) -> None:
        """One session: connect, full sync, events until stopped.  Raises on any loss."""
        client = pool_client(pool)
        self._set_client(client)
        log.info("pool %s: connected to %s", pool.name, safe_url(client.url))
        mirror = PoolMirror(pool)
        token, _ = full_sync(client, mirror)
        self._set_state(pool, ConnectionState.CONNECTED)
        self._synced = True
        _observe(pool)
        pump = EventPump(client, token, timeout=self.event_timeout)
        pump.start()
        try:
            while not self.stopping:
                try:
                    events = pump.get(timeout=1.0)
                except XapiError as exc:
                    if self.stopping:
                        break
                    if exc.code in RECONNECT_CODES:
                        # The event stream cannot continue: start over from a fresh session and full sync.
                        raise _Reconnect(exc.describe()) from None
                    raise
                if events:
                    result = mirror.apply(events)
                    log.debug("pool %s: %d event(s), %d object(s) changed", pool.name, len(events),
                              result.changed)
                    if result.changed:
                        _observe(pool, result.changed_uuids)
        finally:
            pump.stop()


def _observe(pool: Pool, changed: dict[str, set[str]] | None = None) -> None:
    """Announce the committed changes at once, rather than leaving them to the next beat sweep: the
    alert budget is 5 s from the state change (protection listens, see ``inventory.signals``)."""
    for receiver, result in batch_committed.send_robust(sender=Pool, pool=pool, changed=changed):
        if isinstance(result, Exception):
            log.error("pool %s: %s failed on a committed batch: %r", pool.name, receiver, result)


class EventPump:
    """Reads ``event.from`` in a thread of its own while the caller writes the previous batch.

    Reading (XAPI encoding, the network, JSON decoding) and writing (PostgreSQL)
    then overlap, and when the writer falls behind, the answers waiting are
    merged into one batch, one transaction.  The reader uses the client alone:
    the caller must not use it until ``stop()``, after which it is unusable.
    """

    def __init__(self, client: XapiClient, token: str, *, timeout: float, classes: Iterable[str] = EVENT_CLASSES,
                 depth: int = 4, max_batch: int = 50_000) -> None:
        self.client = client
        self.token = token
        self.timeout = timeout
        self.classes = list(classes)
        self.max_batch = max_batch
        self._queue: queue.Queue[dict | BaseException] = queue.Queue(maxsize=depth)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._read, name="event-from", daemon=True)
        self._failure: BaseException | None = None
        # Set while the last event.from came back empty: everything read has been handed over.
        self.caught_up = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.client.abort()  # breaks a blocked event.from
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):  # let a reader blocked on a full queue finish
                self._queue.get_nowait()
            self._thread.join(0.05)

    def _read(self) -> None:
        token = self.token
        try:
            while not self._stopping.is_set():
                answer = self.client.event_from(self.classes, token, self.timeout, fields=RECORD_FIELDS)
                new_token = str(answer.get("token", ""))
                if _went_back(token, new_token):
                    raise XapiError("POOL_RESTARTED", message="The pool master restarted (its event counter "
                                                              "started over).")
                token = self.token = new_token
                if answer.get("events"):
                    self.caught_up.clear()
                    self._put(answer)
                else:
                    self.caught_up.set()
        except BaseException as exc:  # handed to the caller, who decides
            self._put(exc)

    def _put(self, item: dict | BaseException) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(queue.Full):
                self._queue.put(item, timeout=0.2)
                return

    def get(self, timeout: float) -> list[dict]:
        """The events that arrived (several answers merged), [] after ``timeout`` seconds without any.
        Raises what the reader raised (XapiError, XapiUnreachable)."""
        if self._failure is not None:
            raise self._failure
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            return []
        items = [first]
        count = self.max_batch if isinstance(first, BaseException) else len(first["events"])
        while count < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            items.append(item)
            if isinstance(item, BaseException):
                break
            count += len(item["events"])
        events: list[dict] = []
        for item in items:
            if isinstance(item, BaseException):
                # Apply what came before the failure first; the next get() raises it.
                self._failure = item
                if not events:
                    raise item
                break
            events.extend(item["events"])
        return events


def _went_back(old: str, new: str) -> bool:
    """XAPI tokens are zero-padded generation counters: a smaller one means the server started over."""
    return bool(old) and bool(new) and len(old) == len(new) and new < old


def fingerprint(pool: Pool) -> tuple:
    """What, when changed, makes a watcher reconnect."""
    return (pool.url, pool.username, pool.password, pool.verify_tls)


class Supervisor:
    """One PoolWatcher per pool, following the Pool table, for the pools whose lock it holds."""

    def __init__(self, *, names: Iterable[str] = (), poll_interval: float = 3.0, event_timeout: float | None = None,
                 max_delay: float | None = None) -> None:
        self.names = list(names)
        self.poll_interval = poll_interval
        self.event_timeout = event_timeout
        self.max_delay = max_delay
        self.watchers: dict[int, PoolWatcher] = {}
        self.stop_event = threading.Event()
        self.locks = PoolLocks()
        self.waiting: set[int] = set()  # pools another process watches: logged once, tried at every reconcile

    def _pools(self) -> list[Pool]:
        qs = Pool.objects.filter(removing_since__isnull=True)  # a pool being removed is watched no more
        return list(qs.filter(name__in=self.names) if self.names else qs)

    def reconcile(self) -> None:
        if not self.locks.still_held():
            # The session holding the locks was cut (the database restarted): another process may own the
            # pools now. Stop writing them; they are taken again below, once the database answers.
            log.warning("watcher: lost the database session holding the pools' locks; stopping the watchers")
            for watcher in self.watchers.values():
                watcher.stop()
            self.watchers.clear()
        try:
            close_old_connections()
            pools = {pool.pk: pool for pool in self._pools()}
        except DatabaseError as exc:
            log.warning("watcher: cannot read the pools (%s); retrying", exc.__class__.__name__)
            connection.close()
            return
        for pk, watcher in list(self.watchers.items()):
            pool = pools.get(pk)
            reason = None
            if pool is None:
                reason = "deleted"
            elif fingerprint(pool) != watcher.fingerprint:
                reason = "connection settings changed"
            elif not watcher.is_alive():
                reason = "watcher ended"
            if reason:
                log.info("pool %s: %s, stopping its watcher", watcher.pool_name, reason)
                watcher.stop()
                del self.watchers[pk]
                if pool is None:
                    self.locks.release(pk)
        for pk, pool in pools.items():
            if pk not in self.watchers:
                if not self._lock(pool):
                    continue
                log.info("pool %s: watching %s", pool.name, safe_url(pool.master_url or pool.url))
                watcher = PoolWatcher(pool, event_timeout=self.event_timeout, max_delay=self.max_delay)
                self.watchers[pk] = watcher
                watcher.start()

    def _lock(self, pool: Pool) -> bool:
        """Take the pool's lock; False while another process holds it (logged once per wait)."""
        try:
            taken = self.locks.acquire(pool.pk)
        except DatabaseError as exc:
            log.warning("pool %s: cannot take its lock (%s); retrying", pool.name, exc.__class__.__name__)
            return False
        if not taken and pool.pk not in self.waiting:
            self.waiting.add(pool.pk)
            log.info("pool %s: another watcher holds it (%s); waiting", pool.name, self.locks.holder(pool.pk))
        elif taken and pool.pk in self.waiting:
            self.waiting.discard(pool.pk)
            log.info("pool %s: the other watcher let go of it; taking over", pool.name)
        return taken

    def run(self) -> None:
        """Until ``stop()``: reconcile every ``poll_interval`` seconds."""
        log.info("watcher: started%s", f" for {', '.join(self.names)}" if self.names else "")
        try:
            while not self.stop_event.is_set():
                self.reconcile()
                self.stop_event.wait(self.poll_interval)
        finally:
            self.shutdown()

    def stop(self) -> None:
        self.stop_event.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        for watcher in self.watchers.values():
            watcher.stop()
        deadline = time.monotonic() + timeout
        for watcher in self.watchers.values():
            watcher.join(max(0.0, deadline - time.monotonic()))
        self.watchers.clear()
        self.locks.close()
        connection.close()
        log.info("watcher: stopped")


def sync_once(pool: Pool) -> SyncResult:
    """Connect, full sync, disconnect (``watch_pools --once``).  Records the connection state; raises XapiError."""
    try:
        with pool_client(pool) as client:
            _, result = full_sync(client, PoolMirror(pool))
    except XapiError as exc:
        state = ConnectionState.UNREACHABLE if isinstance(exc, (XapiUnreachable, XapiAuthError)) else \
            ConnectionState.RECONNECTING
        pool_connection_state_set(pool=pool, state=state, error=exc.describe())
        raise
    pool_connection_state_set(pool=pool, state=ConnectionState.CONNECTED)
    return result
