"""The protection WebSocket: Operators cannot protect through it, Administrators can; progress is pushed."""
from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from console.routing import websocket_urlpatterns
from protection.models import Protection, WorkflowRun
from tests.inventory.factories import make_disk, make_host, make_pbd, make_pool, make_sr, make_vm

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def vm():
    pool = make_pool()
    hosts = [make_host(pool) for _ in range(2)]
    shared = make_sr(pool, shared=True, name_label="shared")
    for host in hosts:
        make_pbd(host, shared)
    vm = make_vm(pool, host=hosts[0], name_label="web-ws")
    make_disk(vm, shared)
    vm.shared_sr = shared
    return vm


async def _talk(user, path: str, message: dict | None = None, expect: int = 0) -> tuple[bool, list[str]]:
    """Connect, send ``message``, wait for ``expect`` answers (generously: the machine may be busy), then
    collect whatever else comes within half a second."""
    communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), path)
    communicator.scope["user"] = user
    connected, _ = await communicator.connect(timeout=20)
    received = []
    if connected:
        if message is not None:
            await communicator.send_json_to(message)
        for _ in range(expect):
            received.append(await communicator.receive_from(timeout=20))
        while not await communicator.receive_nothing(timeout=0.5):
            received.append(await communicator.receive_from())
        await communicator.disconnect(timeout=20)
    else:
        # A refused consumer is left waiting for nothing: stop it here, or it deadlocks the event loop's close.
        await communicator.wait(timeout=1)
    return connected, received


def protect_message(vm) -> dict:
    return {"action": "protect", "vm": vm.pk, "level": 1, "settings": {"heartbeat_sr": vm.shared_sr.uuid}}


def test_operator_cannot_protect_through_the_websocket(operator_user, vm):
    connected, received = async_to_sync(_talk)(operator_user, "/ws/protection/", protect_message(vm), 1)
    assert connected
    assert len(received) == 1 and 'data-ok="false"' in received[0] and "Administrators" in received[0]
    assert not WorkflowRun.objects.exists() and not Protection.objects.exists()


def test_administrator_protects_through_the_websocket_and_sees_the_run(admin_user, vm):
    connected, received = async_to_sync(_talk)(admin_user, "/ws/protection/", protect_message(vm), 1)
    assert connected and 'data-ok="true"' in received[0]
    run = WorkflowRun.objects.get()
    assert f'data-run="{run.pk}"' in received[0]
    assert Protection.objects.get(vm=vm).status == "protecting"
    assert run.created_by == admin_user


def test_anonymous_and_users_without_a_role_are_refused_at_the_handshake(django_user_model, vm):
    from django.contrib.auth.models import AnonymousUser

    assert async_to_sync(_talk)(AnonymousUser(), "/ws/protection/")[0] is False
    nobody = django_user_model.objects.create_user("nobody")
    assert async_to_sync(_talk)(nobody, "/ws/protection/")[0] is False


def test_following_a_run_sends_its_card_with_progress(operator_user, admin_user, vm):
    from protection import services

    run = services.protection_start(vm=vm, level=1, settings={"heartbeat_sr": vm.shared_sr.uuid},
                                    requested_by=admin_user)
    connected, received = async_to_sync(_talk)(operator_user, f"/ws/protection/?runs={run.pk}", None, 1)
    assert connected
    assert len(received) == 1 and f'id="run-{run.pk}"' in received[0] and "<progress" in received[0]
