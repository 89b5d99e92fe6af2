"""Realtime helper: the one way to push an event to browsers.

Senders call ``emit`` (or ``emit_many``) inside their transaction; the message
leaves only once the data it describes is committed, so a consumer that reads
the database on receipt always sees the change.
"""
import asyncio
import itertools
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable

from asgiref.sync import SyncToAsync, async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

log = logging.getLogger(__name__)

Message = tuple[str, dict]

# -- groups (names allow [a-z0-9._-]) -----------------------------------------------------------------

ALERTS_GROUP = "alerts.all"  # alerts.change: an alert opened, closed or was acknowledged
POOLS_GROUP = "pools.all"  # pools.change: a pool was registered, changed or removed (every open page)
# inventory.summary: which pools changed lately (every open page; each sender process at most every SUMMARY_INTERVAL)
SUMMARY_GROUP = "pools.summary"
# The close code of a socket whose user may not (or may no longer) see what it streams: pages do not retry.
CLOSE_FORBIDDEN = 4403


def pool_group(pool_uuid: str) -> str:
    """A pool's changes: inventory.change / inventory.resync (the watcher), protection.change. Followed by the
    pages that show the pool's VMs (its tree nodes, its table, one of its objects)."""
    return f"pool.{pool_uuid}"


def run_group(run_id: int) -> str:
    """One workflow run's progress: protection.progress."""
    return f"workflow.{run_id}"


def user_group(user_id: int) -> str:
    """Every open socket of one user: access.change."""
    return f"user.{user_id}"


# -- messages: each event type is built here, handled by a consumer method of the same name ------------


def inventory_change(*, pool: str, cls: str, uuid: str, op: str = "mod") -> Message:
    """One XAPI object of ``pool`` (uuid) was added, modified or deleted (op: add, mod, del)."""
    return inventory_changes(pool=pool, changes={cls: {uuid: op}})


def inventory_changes(*, pool: str, changes: dict[str, dict[str, str]]) -> Message:
    """Objects of ``pool`` were added, modified or deleted: {cls: {uuid: op}}. The watcher sends one per batch, not
    one per object: a message costs the channel layer and every following socket about the same whatever it
    holds, and a socket's channel holds a bounded number of them (channels_redis drops the rest)."""
    return pool_group(pool), {"type": "inventory.change", "pool": pool, "changes": changes}


def merged_changes(*, pool: str, messages: Iterable[Message]) -> Message:
    """One inventory.change holding the changes of many (the last op of an object wins)."""
    changes: dict[str, dict[str, str]] = {}
    for _group, event in messages:
        for cls, objects in event["changes"].items():
            changes.setdefault(cls, {}).update(objects)
    return inventory_changes(pool=pool, changes=changes)


def inventory_resync(*, pool: str) -> Message:
    """The pool was read again from scratch: pages showing it rebuild."""
    return pool_group(pool), {"type": "inventory.resync", "pool": pool}


def protection_change(*, pool: str, vm: str) -> Message:
    """The protection of VM ``vm`` (uuid) of ``pool`` changed: its icons, row and page re-render."""
    return pool_group(pool), {"type": "protection.change", "pool": pool, "vm": vm}


def pools_change(*, pool: str, op: str = "mod") -> Message:
    """Pool ``pool`` (uuid) was registered, got its uuid, changed or was removed (op: add, mod, del): open pages
    join the groups of the pools their user may see now, and leave the others."""
    return POOLS_GROUP, {"type": "pools.change", "pool": pool, "op": op}


def protection_progress(*, run: int) -> Message:
    return run_group(run), {"type": "protection.progress", "run": run}


def alerts_change(*, alert: int) -> Message:
    return ALERTS_GROUP, {"type": "alerts.change", "alert": alert}


def access_change(*, user: int) -> Message:
    """What ``user`` may see or do may have changed (groups, permissions, account): their sockets look again
    and close, or re-render with what is left."""
    return user_group(user), {"type": "access.change", "user": user}


def inventory_summary(*, pools: dict[str, dict[str, list[str]]]) -> Message:
    """These pools changed since the sender's last summary: {pool uuid: {cls: [ops]}} ("resync": everything may
    have). Sent by ``send_now`` itself, throttled, after messages to pools' groups: for the pages that show those
    pools only by their labels (header chip, folded tree node, home card, the summary's counts)."""
    return SUMMARY_GROUP, {"type": "inventory.summary", "pools": pools}


def emit(message: Message) -> None:
    """Send one (group, event) pair, built by a function above, after commit."""
    emit_many([message])


def emit_many(messages: Iterable[Message]) -> None:
    """Send many (group, event) pairs after commit, in one trip to the channel layer."""
    batch = list(messages)
    if batch:
        transaction.on_commit(lambda: send_now(batch))


# -- sequence numbers: a socket tells a lost message from a quiet group ------------------------------------------
#
# channels_redis drops a message for a channel that holds ``capacity`` of them already (logged at INFO, nothing
# else). Each message to a pool's group carries this process's stream id and a number that grows by one per
# message this process sends to that group: a consumer that sees a number skip knows it lost one, and rebuilds
# what it shows of that pool, rather than show it stale.
STREAM = secrets.token_hex(6)
_sequences: dict[str, itertools.count] = {}
_sequences_lock = threading.Lock()


def _numbered(group: str, event: dict) -> dict:
    with _sequences_lock:
        counter = _sequences.setdefault(group, itertools.count(1))
        return {**event, "stream": STREAM, "seq": next(counter)}


def send_now(messages: list[Message]) -> None:
    """Send at once (outside a transaction). A channel-layer failure is logged, never raised:
    the database stays the truth and a page resyncs when its socket reconnects. Messages to a pool's group are
    numbered, and followed (throttled) by the pool's summary."""
    if get_channel_layer() is None:
        return
    _deliver([(group, _numbered(group, event) if _is_pool(group) else event) for group, event in messages])
    for group, event in messages:
        if _is_pool(group):
            _summaries.poke(event["pool"], classes_changed(event))


def _is_pool(group: str) -> bool:
    return group.startswith("pool.")


def _deliver(messages: list[Message]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        if _under_event_loop():
            async_to_sync(_send_all)(layer, messages)
        else:
            _sender.run(_send_all(layer, messages))
    except Exception:  # Redis down must not fail the write that was already committed
        log.exception("realtime: could not send %d message(s)", len(messages))


def _under_event_loop() -> bool:
    """Is this a thread that sync_to_async runs for a live event loop of this process (a view or a consumer's read,
    under daphne)? ``async_to_sync`` then goes back to that loop, as asgiref decides it."""
    threadlocal = SyncToAsync.threadlocal
    loop = getattr(threadlocal, "main_event_loop", None)
    return (loop is not None and getattr(threadlocal, "main_event_loop_pid", None) == os.getpid()
            and loop.is_running())


class SenderLoop:
    """An event loop on a thread of its own, for the senders of a process that runs none (the watcher, a worker).

    ``async_to_sync`` called from such a thread runs each call in a new event loop, and channels_redis keeps its
    connections per event loop: every batch of the watcher then opened a Redis connection of its own (with redis-py's
    handshake, which reads the package's metadata from disk) and closed it. Under the load of nineteen busy pools,
    that was a tenth of a watcher's time. Here the connections live as long as the loop. Made again in a child
    process (a fork has no copy of the thread)."""

    TIMEOUT = 30.0  # seconds: a send that takes longer has failed (the socket's own timeout is as long)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = 0

    def run(self, coroutine):
        """Run ``coroutine`` on the loop and return its result (or raise what it raised)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._running())
        try:
            return future.result(self.TIMEOUT)
        except TimeoutError:
            future.cancel()
            raise

    def _running(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="realtime-sender", daemon=True).start()
                self._loop, self._pid = loop, os.getpid()
            return self._loop


_sender = SenderLoop()


async def _send_all(layer, messages: list[Message]) -> None:
    for group, event in messages:
        await layer.group_send(group, event)


# -- pool summaries: throttled, for the pages that show a pool only by its labels ---------------------------------

SUMMARY_INTERVAL = 0.5  # seconds: how stale a folded pool's labels may be, and at most two messages a second each


def classes_changed(event: dict) -> dict[str, set[str]]:
    """{cls: ops} of what an event of a pool's group says changed: the content of the pool's next summary."""
    if event["type"] == "inventory.change":
        return {cls: set(objects.values()) for cls, objects in event["changes"].items()}
    if event["type"] == "protection.change":
        return {"protection": {"mod"}}
    return {"resync": {"resync"}}


class SummaryThrottle:
    """At most one summary every ``interval`` for all the pools of this process: the first change after a quiet
    interval is told at once, later ones at the end of the interval, merged (by a timer thread, so that the last
    change is told even if every pool then falls quiet). A watcher of twenty busy pools thus costs each open page
    two messages a second, not forty: a page's channel holds a bounded number of messages, and what one page
    reads in a second is bounded by the channel layer's round trips."""

    def __init__(self, interval: float, send=None) -> None:
        self.interval = interval
        self._send = send or (lambda message: _deliver([message]))
        self._lock = threading.Lock()
        self._last = float("-inf")  # when the last summary went
        self._due: dict[str, dict[str, set[str]]] | None = None  # what changed since, while a timer is set

    def poke(self, pool: str, classes: dict[str, set[str]]) -> None:
        with self._lock:
            if self._due is not None:
                for cls, ops in classes.items():
                    self._due.setdefault(pool, {}).setdefault(cls, set()).update(ops)
                return
            wait = self._last + self.interval - time.monotonic()
            if wait > 0:
                self._due = {pool: {cls: set(ops) for cls, ops in classes.items()}}
                timer = threading.Timer(wait, self._fire)
                timer.daemon = True
                timer.start()
                return
            self._last = time.monotonic()
        self._send(_summary({pool: classes}))

    def _fire(self) -> None:
        with self._lock:
            due, self._due = self._due or {}, None
            self._last = time.monotonic()
        self._send(_summary(due))


def _summary(pools: dict[str, dict[str, set[str]]]) -> Message:
    return inventory_summary(pools={p: {c: sorted(ops) for c, ops in classes.items()} for p, classes in pools.items()})


_summaries = SummaryThrottle(SUMMARY_INTERVAL)


def client_message(text: str | None, *, max_size: int) -> dict | None:
    """A page's WebSocket message as a JSON object, or None for anything else (empty, too big, not JSON,
    not an object): consumers ignore what they cannot read rather than fail the socket."""
    if not text or len(text) > max_size:
        return None
    try:
        message = json.loads(text)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None
