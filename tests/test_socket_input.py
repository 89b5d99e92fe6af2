"""Whatever a page's socket sends (malformed JSON, wrong types, unknown actions, huge frames), the consumers
stay up, answer in words where an answer is due, and keep serving the same socket afterwards."""
from __future__ import annotations

import json

import pytest
from channels.testing import WebsocketCommunicator

from console.asgi import application
from eac.realtime import inventory_change
from tests.channels_support import ORIGIN, connect, deliver, receive_until, run, session_cookie
from tests.inventory.factories import make_pool, make_vm

pytestmark = pytest.mark.django_db(transaction=True)

JUNK = [
    " ", "{", "null", "[]", "42", '"text"', "{}", "\x00\xff", "{" * 5000, json.dumps({"view": 123}),
    json.dumps({"view": "vm:../../etc", "open": "pool-x", "rows": [1, None, {}], "rendered_at": "yesterday"}),
    json.dumps({"rendered_at": 1e308}), json.dumps({"rendered_at": -1e308}), json.dumps({"open": ["x"] * 50_000}),
    "x" * 200_000,
]
PROTECTION_JUNK = [
    {"action": "explode"}, {"action": "protect"}, {"action": "protect", "vm": "abc"},
    {"action": "protect", "vm": None}, {"action": "protect", "vm": 10**30}, {"action": "protect", "vm": [1]},
    {"action": "unprotect", "protection": "1; DROP TABLE"}, {"action": "unprotect", "protection": -1},
]


def test_the_live_socket_ignores_junk_and_still_follows_the_page(admin_user):
    pool = make_pool()
    vm = make_vm(pool, name_label="web-1")
    headers = [ORIGIN, session_cookie(admin_user)]

    async def scenario():
        communicator, connected = await connect(headers)
        assert connected
        for text in JUNK:
            await communicator.send_to(text_data=text)
        await communicator.send_to(bytes_data=b"\x00" * 1024)
        said = []
        while not await communicator.receive_nothing(timeout=0.5):
            said.append(await communicator.receive_from())
        # At most "resync" (a render time it cannot read is treated as stale); the socket is still open.
        assert all('id="live-control" data-action="resync"' in text for text in said), said
        # The same socket still follows its page: a change of the VM it shows re-renders the VM's panel.
        await communicator.send_json_to({"view": f"vm:{vm.uuid}", "open": [], "rows": [vm.uuid]})
        await deliver(inventory_change(pool=pool.uuid, cls="vm", uuid=vm.uuid))
        text = await receive_until(communicator, lambda t: f'id="vm-{vm.uuid}"' in t, timeout=10)
        assert "web-1" in text
        await communicator.disconnect()

    run(scenario)


def test_the_protection_socket_answers_junk_with_a_sentence_and_stays_open(admin_user):
    headers = [ORIGIN, session_cookie(admin_user)]

    async def scenario():
        communicator = WebsocketCommunicator(application, "/ws/protection/", headers=headers)
        connected, _ = await communicator.connect(timeout=10)
        assert connected
        for text in JUNK:
            await communicator.send_to(text_data=text)
        assert await communicator.receive_nothing(timeout=0.5)
        for message in PROTECTION_JUNK:
            await communicator.send_json_to(message)
        answers = []
        while not await communicator.receive_nothing(timeout=1.0):
            answers.append(await communicator.receive_from())
        # Unknown actions are ignored; every malformed protect/unprotect gets a refusal in words.
        assert len(answers) == len(PROTECTION_JUNK) - 1, answers
        assert all('data-ok="false"' in a and "role=\"status\"" in a for a in answers), answers
        await communicator.disconnect()

    run(scenario)
