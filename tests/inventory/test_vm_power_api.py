"""Start and Shut down through the REST API (automation): the same service as the VM page's buttons, a real
Celery worker and xapisim behind it; bad requests get a 4xx with a sentence."""
from __future__ import annotations

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from eac.audit import AuditAction, AuditEntry
from inventory.models import VM
from inventory.watcher import sync_once
from tests.support import dump_logs, register_pool, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def api_for(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


def power(client: APIClient, vm: VM, action: str):
    return client.post(f"/api/v1/vms/{vm.pk}/power/", {"action": action}, format="json")


def test_an_administrator_starts_and_shuts_down_a_vm_through_the_api(xapisim, admin_user, console_env,
                                                                     start_proc):
    pool = register_pool(xapisim)
    vm = VM.objects.get(pool=pool, name_label="dev-sandbox")
    worker = start_proc("worker", console_env)
    api = api_for(admin_user)

    def state_is(expected: str) -> bool:
        sync_once(pool)  # what the watcher does, in this process
        return VM.objects.get(pk=vm.pk).power_state == expected

    response = power(api, vm, "start")
    assert response.status_code == 202, response.content
    assert response.json() == {"vm": vm.pk, "action": "start", "detail": "Queued for a worker."}
    try:
        wait_for(lambda: state_is("Running"), timeout=20, interval=0.3, message="the VM to run")
    except AssertionError:
        raise AssertionError(dump_logs(worker)) from None
    assert AuditEntry.objects.filter(vm=vm, action=AuditAction.VM_START, via="api").exists()
    # Starting it again is refused at once: the console knows it runs.
    again = power(api, vm, "start")
    assert again.status_code == 409 and "running" in again.json()["detail"]
    assert power(api, VM.objects.get(pk=vm.pk), "shutdown").status_code == 202
    wait_for(lambda: state_is("Halted"), timeout=20, interval=0.3, message="the VM to halt")


def test_power_requests_an_operator_or_bad_input_cannot_make(xapisim, admin_user, operator_user):
    pool = register_pool(xapisim)
    vm = VM.objects.get(pool=pool, name_label="dev-sandbox")
    assert power(api_for(operator_user), vm, "start").status_code == 403
    admin = api_for(admin_user)
    bad = power(admin, vm, "reboot")
    assert bad.status_code == 400 and "action" in bad.json()
    assert admin.post(f"/api/v1/vms/{vm.pk}/power/", {}, format="json").status_code == 400
    assert admin.post("/api/v1/vms/99999999/power/", {"action": "start"}, format="json").status_code == 404
    template = VM.objects.filter(pool=pool, is_a_template=True).first()
    if template is not None:
        assert power(admin, template, "start").status_code == 404  # templates are not power-managed here
    assert not AuditEntry.objects.filter(vm=vm).exists()
