"""Realtime helper: the one way to push an event to browsers.

Senders call ``emit`` (or ``emit_many``) inside their transaction; the message
leaves only once the data it describes is committed, so a consumer that reads
the database on receipt always sees the change.
"""
import logging
from collections.abc import Iterable

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

log = logging.getLogger(__name__)

Message = tuple[str, dict]


def pool_group(pool_uuid: str) -> str:
    """Channel-layer group of a pool's changes (group names allow [a-z0-9._-])."""
    return f"pool.{pool_uuid}"


def emit(group: str, event: dict) -> None:
    """Send ``event`` (a dict with a ``type`` like ``inventory.change``) to ``group`` after commit."""
    emit_many([(group, event)])


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
