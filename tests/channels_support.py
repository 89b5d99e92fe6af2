"""Talking to the live consumer through the real ASGI stack (session auth, origin check), and feeding it
the channel-layer messages of ``eac.realtime``'s builders, as the senders' ``emit`` does after commit."""
from __future__ import annotations

import re
import time

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.test import Client

from console.asgi import application
from eac.realtime import Message, classes_changed, inventory_summary, pool_group

ORIGIN = (b"origin", b"http://127.0.0.1")


def session_cookie(user) -> tuple[bytes, bytes]:
    client = Client()
    client.force_login(user)
    return (b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode())


def run(scenario):
    return async_to_sync(scenario)()


async def connect(headers) -> tuple[WebsocketCommunicator, bool]:
    communicator = WebsocketCommunicator(application, "/ws/live/", headers=headers)
    connected, _ = await communicator.connect(timeout=5)
    if not connected:
        # A refused consumer still waits for the disconnect: left waiting, it can hang the event loop's close.
        await communicator.disconnect()
    return communicator, connected


async def deliver(*messages: Message) -> None:
    """Send (group, event) pairs made by ``eac.realtime``'s builders, the way ``send_now`` sends them: a message to
    a pool's group is followed by the pool's summary (here at once, not throttled, and unnumbered)."""
    layer = get_channel_layer()
    for group, event in messages:
        await layer.group_send(group, event)
        if group == pool_group(event.get("pool", "")):
            classes = {cls: sorted(ops) for cls, ops in classes_changed(event).items()}
            await layer.group_send(*inventory_summary(pools={event["pool"]: classes}))


async def receive_until(communicator, predicate, timeout=5.0) -> str:
    """Messages until one satisfies ``predicate``; returns all of them joined."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = await communicator.receive_from(timeout=max(0.05, deadline - time.monotonic()))
        except Exception:  # the communicator's timeout, or the socket closed
            break
        seen.append(text)
        if predicate(text):
            return "\n".join(seen)
    raise AssertionError(f"no matching message; got {[t[:300] for t in seen]!r}")


def element(html: str, dom_id: str) -> str:
    match = re.search(rf'<(\w+) id="{dom_id}".*?</\1>', html, re.S)
    assert match, f"no element #{dom_id} in {html[:500]}"
    return match.group(0)
