"""Realtime helper: the one way to push an event to browsers.

Senders call ``emit`` (or ``emit_many``) inside their transaction; the message
leaves only once the data it describes is committed, so a consumer that reads
the database on receipt always sees the change.
"""
import json
import logging
from collections.abc import Iterable

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

log = logging.getLogger(__name__)

Message = tuple[str, dict]

# -- groups (names allow [a-z0-9._-]) -----------------------------------------------------------------

ALERTS_GROUP = "alerts.all"  # alerts.change: an alert opened, closed or was acknowledged
POOLS_GROUP = "pools.all"  # pools.change: a pool was registered, changed or removed (every open page)
# The close code of a socket whose user may not (or may no longer) see what it streams: pages do not retry.
CLOSE_FORBIDDEN = 4403


def pool_group(pool_uuid: str) -> str:
    """A pool's changes: inventory.change / inventory.resync (the watcher), protection.change."""
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
    return pool_group(pool), {"type": "inventory.change", "pool": pool, "cls": cls, "uuid": uuid, "op": op}


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


def emit(message: Message) -> None:
    """Send one (group, event) pair, built by a function above, after commit."""
    emit_many([message])


def emit_many(messages: Iterable[Message]) -> None:
    """Send many (group, event) pairs after commit, in one trip to the channel layer."""
    batch = list(messages)
    if batch:
        transaction.on_commit(lambda: send_now(batch))


def send_now(messages: list[Message]) -> None:
    """Send at once (outside a transaction). A channel-layer failure is logged, never raised:
    the database stays the truth and a page resyncs when its socket reconnects."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(_send_all)(layer, messages)
    except Exception:  # Redis down must not fail the write that was already committed
        log.exception("realtime: could not send %d message(s)", len(messages))


async def _send_all(layer, messages: list[Message]) -> None:
    for group, event in messages:
        await layer.group_send(group, event)


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
