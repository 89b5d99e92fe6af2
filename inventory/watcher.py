"""The pool watcher: one thread per pool keeps its inventory rows equal to XAPI.

A ``PoolWatcher`` connects (following the master), does a full sync, then
loops on ``event.from`` applying each batch; on any loss it reconnects with
backoff and resyncs.  A ``Supervisor`` rereads the Pool table every few
seconds: it starts a watcher for a new pool, stops the one of a deleted pool,
and restarts one whose connection settings changed.  Several ``watch_pools``
processes share the pools (``watch_lock``: each takes its share, and a dead
one's pools are taken over); a process watches a pool only while it holds the
pool's lock, so that no two of them ever write the same rows.  ``manage.py
watch_pools`` runs a Supervisor.
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
from .services import pool_connection_state_set, pool_watcher_set
from .signals import batch_committed
from .sync import EVENT_CLASSES, RECORD_FIELDS, PoolMirror, SyncResult, fetch_records
from .watch_lock import PREFIX, PoolLocks, Survey, shares
from .xapi import XapiAuthError, XapiClient, XapiError, XapiUnreachable, pool_client, safe_url

log = logging.getLogger(__name__)

FIRST_RETRY_DELAY = 0.5
# Consecutive failed attempts after which a pool shows as unreachable rather than reconnecting.
UNREACHABLE_AFTER = 5
# How long a reconcile waits for the watcher threads it stopped to end before it lets go of their pools' locks.
JOIN_TIMEOUT = 5.0
# A batch announced later than this after event.from brought it is logged (INFO), with where the time went: the
# architecture's budget from a change in XAPI to the page is 250 ms.
SLOW_BATCH_SECONDS = 0.25
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
                    taken = time.monotonic()
                    result = mirror.apply(events)
                    announced = time.monotonic()
                    log.debug("pool %s: %d event(s), %d object(s) changed", pool.name, len(events),
                              result.changed)
                    if result.judged_uuids:
                        _observe(pool, result.judged_uuids)
                    if announced - pump.read_at > SLOW_BATCH_SECONDS:
                        log.info("pool %s: %d event(s) announced %.0f ms after event.from brought them (waited "
                                 "%.0f ms, written and sent %.0f ms; then protection %.0f ms)", pool.name,
                                 len(events), (announced - pump.read_at) * 1000, (taken - pump.read_at) * 1000,
                                 (announced - taken) * 1000, (time.monotonic() - announced) * 1000)
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
        # (an answer, when it came) or what the reader raised
        self._queue: queue.Queue[tuple[dict, float] | BaseException] = queue.Queue(maxsize=depth)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._read, name="event-from", daemon=True)
        self._failure: BaseException | None = None
        # Set while the last event.from came back empty: everything read has been handed over.
        self.caught_up = threading.Event()
        self.read_at = 0.0  # when the first answer of the last batch ``get`` returned came (monotonic)

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
                    self._put((answer, time.monotonic()))
                else:
                    self.caught_up.set()
        except BaseException as exc:  # handed to the caller, who decides
            self._put(exc)

    def _put(self, item: tuple[dict, float] | BaseException) -> None:
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
        count = self.max_batch if isinstance(first, BaseException) else len(first[0]["events"])
        while count < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            items.append(item)
            if isinstance(item, BaseException):
                break
            count += len(item[0]["events"])
        events: list[dict] = []
        for item in items:
            if isinstance(item, BaseException):
                # Apply what came before the failure first; the next get() raises it.
                self._failure = item
                if not events:
                    raise item
                break
            if not events:
                self.read_at = item[1]
            events.extend(item[0]["events"])
        return events


def _went_back(old: str, new: str) -> bool:
    """XAPI tokens are zero-padded generation counters: a smaller one means the server started over."""
    return bool(old) and bool(new) and len(old) == len(new) and new < old


def fingerprint(pool: Pool) -> tuple:
    """What, when changed, makes a watcher reconnect."""
    return (pool.url, pool.username, pool.password, pool.verify_tls)


class Supervisor:
    """One PoolWatcher per pool this process watches, following the Pool table and the other watcher processes.

    At every reconcile: read the pools and ``survey`` the live watcher processes and the locks; work out the
    pools this process should watch (``shares``, or every pool nobody else holds for a ``--pool`` process, or
    every pool on SQLite); stop the watchers of the others and let go of a pool's lock only once its watcher
    thread has ended (two writers of one pool never overlap); take the lock of each pool newly assigned here and
    start its watcher. A pool taken is recorded in ``Pool.watcher``; a pool let go of is cleared there if it
    still names this process.
    """

    def __init__(self, *, names: Iterable[str] = (), poll_interval: float = 3.0, event_timeout: float | None = None,
                 max_delay: float | None = None, join_timeout: float = JOIN_TIMEOUT) -> None:
        self.names = list(names)
        self.poll_interval = poll_interval
        self.event_timeout = event_timeout
        self.max_delay = max_delay
        self.join_timeout = join_timeout
        self.watchers: dict[int, PoolWatcher] = {}
        # Watchers asked to stop that have not ended yet: their pools' locks are kept until they have.
        self.stopping: dict[int, PoolWatcher] = {}
        self._fresh: set[int] = set()  # stopped by this reconcile: waited for, up to join_timeout
        self.stop_event = threading.Event()
        # A --pool process takes its pools whenever they are free and shares nothing (see watch_lock).
        self.locks = PoolLocks(shares=not self.names)
        # Pools locked (PostgreSQL) and recorded in Pool.watcher by this process, with their names for the log.
        self.taken: dict[int, str] = {}
        self.elsewhere: dict[int, str] = {}  # pools another process holds, by holder: logged once per holder
        self.members: frozenset[str] = frozenset()  # the sharing processes last seen, logged when they change

    @property
    def ident(self) -> str:
        return self.locks.ident

    def _pools(self) -> list[Pool]:
        qs = Pool.objects.filter(removing_since__isnull=True)  # a pool being removed is watched no more
        return list(qs.filter(name__in=self.names) if self.names else qs)

    def reconcile(self) -> None:
        try:
            close_old_connections()
            pools = {pool.pk: pool for pool in self._pools()}
            survey = self.locks.survey()
        except DatabaseError as exc:
            log.warning("watcher: cannot read the pools and their watchers (%s); retrying", exc.__class__.__name__)
            connection.close()
            self._drop_unlocked()
            self._reap(wanted=set(self.taken))  # nothing to judge the shares by: let go of nothing more
            return
        self._drop_unlocked()
        assigned = self._assign(pools, survey)
        for pk, watcher in list(self.watchers.items()):
            pool = pools.get(pk)
            if pool is None:
                reason = "deleted or being removed"
            elif fingerprint(pool) != watcher.fingerprint:
                reason = "connection settings changed"
            elif not watcher.is_alive():
                reason = "watcher ended"
            elif assigned.get(pk) != self.ident:
                reason = f"assigned to {PREFIX}{assigned.get(pk)} ({self._sharing(survey, pools)})"
            else:
                continue
            log.info("pool %s: %s, stopping its watcher", watcher.pool_name, reason)
            self._stop(pk)
        self._reap(wanted={pk for pk, ident in assigned.items() if ident == self.ident})
        for pk, pool in pools.items():
            mine = assigned.get(pk) == self.ident
            holder = survey.holder(pk) if survey is not None else None
            if not mine or holder not in (None, self.ident):
                self._elsewhere(pool, holder, handing_over=mine)
            elif pk not in self.watchers and pk not in self.stopping and self._take(pool, survey):
                log.info("pool %s: watching %s", pool.name, safe_url(pool.master_url or pool.url))
                watcher = PoolWatcher(pool, event_timeout=self.event_timeout, max_delay=self.max_delay)
                self.watchers[pk] = watcher
                watcher.start()

    def _assign(self, pools: dict[int, Pool], survey: Survey | None) -> dict[int, str]:
        """{pool id: ident of the process that should watch it}, for the pools this process considers."""
        if survey is None:  # SQLite: one process, every pool
            return dict.fromkeys(pools, self.ident)
        holders = {pk: holder for pk in pools if (holder := survey.holder(pk)) is not None}
        if self.names:  # --pool: every one of its pools that nobody else holds
            return {pk: holders.get(pk, self.ident) for pk in pools}
        if survey.members != self.members:
            self.members = survey.members
            log.info("watcher: %d watcher process(es) share the pools: %s", len(survey.members),
                     ", ".join(PREFIX + m for m in sorted(survey.members)))
        return {**holders, **shares(pools, survey.members, holders)}

    def _sharing(self, survey: Survey | None, pools: dict[int, Pool]) -> str:
        members = len(survey.members) if survey is not None else 1
        return f"{members} watcher process(es) share {len(pools)} pool(s)"

    def _elsewhere(self, pool: Pool, holder: str | None, *, handing_over: bool) -> None:
        """A pool another process holds (or is assigned): say who holds it, once per holder."""
        if holder is None or holder == self.ident:
            self.elsewhere.pop(pool.pk, None)
            return
        seen = f"{holder} handing over" if handing_over else holder
        if self.elsewhere.get(pool.pk) == seen:
            return
        self.elsewhere[pool.pk] = seen
        name = holder if holder.startswith("backend ") else PREFIX + holder
        if handing_over:  # a newcomer's share: the holder lets go of it once its watcher thread has ended
            log.info("pool %s: assigned to this process; waiting for %s to let go of it", pool.name, name)
        else:
            log.info("pool %s: another watcher holds it (%s)", pool.name, name)

    def _take(self, pool: Pool, survey: Survey | None) -> bool:
        """Lock the pool and record this process as its watcher; False if it cannot be had now."""
        if pool.pk in self.taken:
            return True  # a watcher restarted: the pool is still this process's
        try:
            taken = self.locks.acquire(pool.pk)
        except DatabaseError as exc:
            log.warning("pool %s: cannot take its lock (%s); retrying", pool.name, exc.__class__.__name__)
            return False
        if not taken:  # another process was quicker, between the survey and now
            log.info("pool %s: another watcher took it first; retrying at the next reconcile", pool.name)
            return False
        previous = pool.watcher
        if previous and previous != self.ident:
            alive = survey is not None and survey.alive(previous)
            why = f"handed over by {PREFIX}{previous}" if alive else f"its watcher {PREFIX}{previous} died"
            log.info("pool %s: %s; taking over", pool.name, why)
        elif self.elsewhere.pop(pool.pk, None):
            log.info("pool %s: the other watcher let go of it; taking over", pool.name)
        try:
            pool_watcher_set(pool_id=pool.pk, watcher=self.ident)
        except DatabaseError as exc:
            log.warning("pool %s: cannot record its watcher (%s); retrying", pool.name, exc.__class__.__name__)
            self.locks.release(pool.pk)
            return False
        self.taken[pool.pk] = pool.name
        return True

    def _stop(self, pk: int) -> None:
        watcher = self.watchers.pop(pk)
        watcher.stop()
        self.stopping[pk] = watcher
        self._fresh.add(pk)

    def _drop_unlocked(self) -> None:
        """Stop the watchers whose lock went with a cut session: another process may own their pools now."""
        if not self.locks.needed:
            return
        lost = [pk for pk in self.watchers if pk not in self.locks.held]
        if lost:
            log.warning("watcher: lost the database session holding the pools' locks; stopping %d watcher(s)",
                        len(lost))
            for pk in lost:
                self._stop(pk)
        self.taken = {pk: name for pk, name in self.taken.items() if pk in self.locks.held}

    def _reap(self, *, wanted: set[int]) -> None:
        """Wait (up to join_timeout) for the watchers stopped by this reconcile; let go of the pools whose watcher
        has ended and that this process no longer wants. A watcher still running keeps its pool's lock."""
        deadline = time.monotonic() + self.join_timeout
        for pk, watcher in list(self.stopping.items()):
            watcher.join(max(0.0, deadline - time.monotonic()) if pk in self._fresh else 0)
            if watcher.is_alive():
                if pk in self._fresh:
                    log.warning("pool %s: its watcher has not ended after %.1f s; keeping the pool's lock until it "
                                "has", watcher.pool_name, self.join_timeout)
                continue
            del self.stopping[pk]
            if pk not in wanted:
                self._let_go(pk)
        self._fresh.clear()
        for pk in self.taken.keys() - wanted - self.watchers.keys() - self.stopping.keys():
            self._let_go(pk)

    def _let_go(self, pk: int) -> None:
        # Unlocked first, then cleared only if it still names this process: whoever takes the pool meanwhile
        # records itself, and that is never undone here.
        name = self.taken.pop(pk, None)
        self.locks.release(pk)
        if name is None:
            return
        try:
            pool_watcher_set(pool_id=pk, watcher="", only_if=self.ident)
        except DatabaseError as exc:
            log.warning("pool %s: cannot clear its watcher (%s)", name, exc.__class__.__name__)
        log.info("pool %s: let go of it", name)

    def run(self) -> None:
        """Until ``stop()``: reconcile every ``poll_interval`` seconds."""
        log.info("watcher: started as %s%s", self.locks.name, f" for {', '.join(self.names)}" if self.names else "")
        try:
            while not self.stop_event.is_set():
                self.reconcile()
                self.stop_event.wait(self.poll_interval)
        finally:
            self.shutdown()

    def stop(self) -> None:
        self.stop_event.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        watchers = [*self.watchers.values(), *self.stopping.values()]
        for watcher in watchers:
            watcher.stop()
        deadline = time.monotonic() + timeout
        for watcher in watchers:
            watcher.join(max(0.0, deadline - time.monotonic()))
        self.watchers.clear()
        self.stopping.clear()
        for pk in list(self.taken):
            self._let_go(pk)
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
