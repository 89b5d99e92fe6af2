"""A right taken away while a socket is open takes effect on that socket at once.

The live pages' socket (``/ws/live/``) and protection's (``/ws/protection/``) check the user when they
open. When a user is removed from a group, loses ``inventory.view_pool`` (their own or their group's), is
deactivated or deleted, ``eac.receivers`` sends ``access.change`` to that user's sockets after commit, and
each checks again on the database: it closes with 4403 if the user may no longer see what it streams, or
carries on with the rights that are left. Real sockets through the ASGI stack, on the Redis channel layer.
"""
from __future__ import annotations

import asyncio

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import Group
from django.db import transaction

from console.asgi import application
from eac.permissions import ADMINISTRATORS, OPERATORS
from eac.realtime import CLOSE_FORBIDDEN
from tests.channels_support import ORIGIN, run, session_cookie
from tests.inventory.factories import make_disk, make_host, make_pbd, make_pool, make_sr, make_vm
from tests.roles import role_group, role_user, view_pool

pytestmark = pytest.mark.django_db(transaction=True)

WAIT = 15.0  # generous: several test runs share this machine


async def open_socket(cookie, path: str) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(application, path, headers=[ORIGIN, cookie])
    connected, _ = await communicator.connect(timeout=WAIT)
    assert connected, f"{path} refused the user before anything was revoked"
    return communicator


async def close_code(communicator: WebsocketCommunicator) -> int | None:
    """Wait (up to WAIT) for the server to close the socket, skipping what it sends first; its close code."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        try:
            message = await communicator.receive_output(timeout=max(0.01, deadline - loop.time()))
        except TimeoutError:
            raise AssertionError(f"the socket was still open {WAIT:.0f} s after the right was revoked") from None
        if message["type"] == "websocket.close":
            return message.get("code")


async def received_until(communicator: WebsocketCommunicator, text: str) -> str:
    """Messages (up to WAIT) until one contains ``text``."""
    while True:
        try:
            message = await communicator.receive_from(timeout=WAIT)
        except TimeoutError:
            raise AssertionError(f"no message with {text!r} within {WAIT:.0f} s") from None
        if text in message:
            return message


def db(function, *args, **kwargs):
    """Run an ORM call from the scenario (autocommit: the receivers' messages leave as it returns)."""
    return database_sync_to_async(function)(*args, **kwargs)


@pytest.fixture
def pool():
    pool = make_pool(name="Revocation pool")
    make_vm(pool, host=make_host(pool, is_master=True), name_label="web-1")
    return pool


def test_viewer_losing_view_pool_has_their_live_socket_closed(pool):
    viewer = role_user("vic-viewer", viewer=True)
    bystander = role_user("ben-bystander", viewer=True)
    cookie, other = session_cookie(viewer), session_cookie(bystander)
    permission = view_pool()

    async def scenario():
        live, theirs = await open_socket(cookie, "/ws/live/"), await open_socket(other, "/ws/live/")
        await db(viewer.user_permissions.remove, permission)
        assert await close_code(live) == CLOSE_FORBIDDEN
        # Negative control: another user's socket heard nothing and is still open.
        assert await theirs.receive_nothing(timeout=0.5)
        await theirs.disconnect()

    run(scenario)


def test_operator_removed_from_operators_has_both_sockets_closed(pool):
    operator = role_user("olga-operator", group=OPERATORS)  # view_pool through the group only
    cookie = session_cookie(operator)
    operators = Group.objects.get(name=OPERATORS)

    async def scenario():
        live, protection = await open_socket(cookie, "/ws/live/"), await open_socket(cookie, "/ws/protection/")
        await db(operator.groups.remove, operators)
        assert await close_code(live) == CLOSE_FORBIDDEN
        assert await close_code(protection) == CLOSE_FORBIDDEN

    run(scenario)


def test_group_losing_view_pool_closes_its_members_live_sockets_only(pool):
    operator = role_user("olga-operator", group=OPERATORS)
    cookie = session_cookie(operator)
    operators, permission = Group.objects.get(name=OPERATORS), view_pool()

    async def scenario():
        live, protection = await open_socket(cookie, "/ws/live/"), await open_socket(cookie, "/ws/protection/")
        await db(operators.permissions.remove, permission)
        assert await close_code(live) == CLOSE_FORBIDDEN
        # Still an Operator: protection's socket (runs' progress) stays.
        assert await protection.receive_nothing(timeout=0.5)
        await protection.disconnect()

    run(scenario)


@pytest.mark.parametrize("revoke", ["deactivate", "delete"])
def test_deactivated_or_deleted_user_has_their_sockets_closed(pool, revoke):
    operator = role_user("olga-operator", group=OPERATORS)
    cookie = session_cookie(operator)

    def take_away():
        if revoke == "delete":
            operator.delete()
        else:
            operator.is_active = False
            operator.save()

    async def scenario():
        live, protection = await open_socket(cookie, "/ws/live/"), await open_socket(cookie, "/ws/protection/")
        await db(take_away)
        assert await close_code(live) == CLOSE_FORBIDDEN
        assert await close_code(protection) == CLOSE_FORBIDDEN

    run(scenario)


def test_administrator_demoted_to_operator_keeps_watching_but_can_no_longer_protect(pool):
    host = pool.hosts.get()
    shared = make_sr(pool, shared=True)
    make_pbd(host, shared)
    vm = make_vm(pool, host=host, name_label="db-1")
    make_disk(vm, shared)
    admin = role_user("adam-admin", group=ADMINISTRATORS)
    role_group(OPERATORS)
    cookie = session_cookie(admin)

    def demote():
        with transaction.atomic():  # one change as the sockets see it: never a moment with no group at all
            admin.groups.remove(Group.objects.get(name=ADMINISTRATORS))
            admin.groups.add(Group.objects.get(name=OPERATORS))

    async def scenario():
        live, protection = await open_socket(cookie, "/ws/live/"), await open_socket(cookie, "/ws/protection/")
        await db(demote)
        # The live page stays, told to re-render (without the Administrators' buttons).
        assert 'data-action="resync"' in await received_until(live, 'id="live-control"')
        await protection.send_json_to({"action": "protect", "vm": vm.pk, "level": 1,
                                       "settings": {"heartbeat_sr": shared.uuid}})
        answer = await received_until(protection, 'id="protection-ws-result"')
        assert 'data-ok="false"' in answer and "Administrators" in answer
        for socket in (live, protection):
            await socket.disconnect()

    run(scenario)
    assert not vm.workflow_runs.exists()
