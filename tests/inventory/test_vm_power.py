"""Start and Shut down from the VM page: an Administrator's request goes to a real Celery worker, which calls
a real xapisim; XAPI's refusal reaches the page (events list, live panel) as a sentence."""
from __future__ import annotations

import json

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.test import Client
from django.urls import reverse
from django.utils.html import escape

from eac.audit import AuditAction, AuditEntry
from inventory.models import VM
from inventory.selectors import xapi_error_sentence
from inventory.watcher import sync_once
from tests.channels_support import ORIGIN, connect, receive_until, session_cookie
from tests.support import dump_logs, register_pool, wait_for, xapi_login

pytestmark = pytest.mark.django_db(transaction=True)
GiB = 1 << 30


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def power_url(vm: VM) -> str:
    return reverse("console:vm_power", args=[vm.uuid])


def break_plan_on_start(sim, vm_name: str) -> None:
    """HA on, four VMs protected, host failures to tolerate at the pool's maximum (2), and ``vm_name`` grown
    to 30 GiB: starting it would leave too little room to restart the protected VMs after two failures."""
    session = xapi_login(sim.url)
    api = session.xenapi
    try:
        for name in ("db-primary", "db-replica", "gitlab", "fileserver"):
            api.VM.set_ha_restart_priority(api.VM.get_by_name_label(name)[0], "restart")
        big = api.VM.get_by_name_label(vm_name)[0]
        size = str(30 * GiB)
        api.VM.set_memory_limits(big, str(GiB), size, size, size)
        shared = next(ref for ref, sr in api.SR.get_all_records().items() if sr["shared"])
        api.pool.enable_ha([shared], {"timeout": "1"})
        pool = api.pool.get_all()[0]
        api.pool.set_ha_host_failures_to_tolerate(pool, api.pool.ha_compute_max_host_failures_to_tolerate())
        assert api.pool.get_ha_host_failures_to_tolerate(pool) == "2"
    finally:
        session.xenapi.session.logout()


def test_administrator_starts_a_halted_vm_and_shuts_it_down(xapisim, admin_user, console_env, start_proc):
    pool = register_pool(xapisim)
    vm = VM.objects.get(pool=pool, name_label="dev-sandbox")
    assert vm.power_state == "Halted"
    worker = start_proc("worker", console_env)
    client = client_for(admin_user)

    page = client.get(reverse("console:vm_detail", args=[vm.uuid])).content.decode()
    assert "act-start" in page and "act-shutdown" not in page

    response = client.post(power_url(vm), {"action": "start"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 302 and response["Location"] == reverse("console:vm_detail", args=[vm.uuid])
    assert AuditEntry.objects.filter(vm=vm, action=AuditAction.VM_START, username=admin_user.username).exists()

    def state_is(expected: str) -> bool:
        sync_once(pool)  # what the watcher does, in this process
        return VM.objects.get(pk=vm.pk).power_state == expected

    try:
        wait_for(lambda: state_is("Running"), timeout=20, interval=0.3, message="the VM to run")
    except AssertionError:
        raise AssertionError(dump_logs(worker)) from None
    page = client.get(reverse("console:vm_detail", args=[vm.uuid])).content.decode()
    assert "act-shutdown" in page and "act-start" not in page

    client.post(power_url(vm), {"action": "shutdown"})
    wait_for(lambda: state_is("Halted"), timeout=20, interval=0.3, message="the VM to halt")
    assert not AuditEntry.objects.filter(vm=vm, action=AuditAction.VM_POWER_REFUSED).exists()


def test_start_that_would_break_the_failover_plan_shows_xapis_refusal_on_the_vm_page(
    xapisim, admin_user, console_env, start_proc
):
    break_plan_on_start(xapisim, "build-agent-4")
    pool = register_pool(xapisim)
    vm = VM.objects.get(pool=pool, name_label="build-agent-4")
    worker = start_proc("worker", console_env)
    client = client_for(admin_user)
    sentence = xapi_error_sentence("HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN", [], pool)
    cookie = session_cookie(admin_user)

    async def scenario() -> str:
        communicator, connected = await connect([ORIGIN, cookie])
        assert connected
        await communicator.send_to(text_data=json.dumps({"view": f"vm:{vm.uuid}", "open": []}))
        response = await sync_to_async(client.post)(power_url(vm), {"action": "start"})
        assert response.status_code == 302
        try:
            html = await receive_until(communicator, lambda text: escape(sentence) in text, timeout=20)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{dump_logs(worker)}") from None
        await communicator.disconnect()
        return html

    pushed = async_to_sync(scenario)()
    assert f'<section id="vm-{vm.uuid}"' in pushed and "Power action refused (alice-admin)" in pushed

    refusal = AuditEntry.objects.get(vm=vm, action=AuditAction.VM_POWER_REFUSED)
    assert refusal.detail == {"action": "start", "code": "HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN",
                              "message": sentence}
    page = client.get(reverse("console:vm_detail", args=[vm.uuid])).content.decode()
    assert escape(sentence) in page
    session = xapi_login(xapisim.url)
    try:
        assert session.xenapi.VM.get_power_state(vm.ref) == "Halted"
    finally:
        session.xenapi.session.logout()


def test_operator_may_not_start_or_shut_down_vms(xapisim, operator_user, celery_queue):
    pool = register_pool(xapisim)
    vm = VM.objects.get(pool=pool, name_label="dev-sandbox")
    client = client_for(operator_user)
    page = client.get(reverse("console:vm_detail", args=[vm.uuid])).content.decode()
    assert "act-start" not in page

    assert client.post(power_url(vm), {"action": "start"}).status_code == 403
    assert not AuditEntry.objects.filter(vm=vm).exists()


def test_bad_or_stale_power_requests_get_a_clear_answer(xapisim, admin_user, celery_queue):
    pool = register_pool(xapisim)
    halted = VM.objects.get(pool=pool, name_label="dev-sandbox")
    client = client_for(admin_user)

    response = client.post(power_url(halted), {"action": "reboot-everything"})
    assert response.status_code == 400 and "Unknown action" in response.content.decode()
    assert client.post(reverse("console:vm_power", args=["not-a-uuid"]), {"action": "start"}).status_code == 404
    assert client.get(power_url(halted)).status_code == 405

    # The page showed Shut down, but the VM halted meanwhile: refused at once, nothing enqueued.
    response = client.post(power_url(halted), {"action": "shutdown"}, follow=True)
    assert response.status_code == 200
    assert "can be shut down only when running" in response.content.decode()
    assert not AuditEntry.objects.filter(vm=halted).exists()
