"""The planned swap's request, without a pool: what makes it a workflow run and what refuses it, with a sentence.

The console's side of test_level2_health.py (a pool in the database, the two AMs on loopback, a VM protected at
Level 2 on hosta with hostb as its secondary), with its paused copy on hostb. No worker runs: the run is made and
waits (tests/protection/test_level2_swap.py runs it end to end on the live bed).
"""
from __future__ import annotations

import pytest

from eac.audit import AuditAction
from eac.models import AuditEntry
from inventory.choices import PowerState
from protection.choices import ProtectionStatus, RunKind
from protection.models import Protection, WorkflowRun
from protection.workflows import SECONDARY_SUFFIX, steps_for
from tests.inventory.factories import make_vm
from tests.protection import test_level2_health as health_tests

ams = health_tests.ams
_poll, _states = health_tests._poll, health_tests._states


@pytest.fixture
def swappable(ams, settings, db):
    """test_level2_health's records, with the secondary VM paused on hostb: every component ok."""
    settings.EAC_AM_TOKEN_FILE, settings.EAC_AM_TOKEN = "", ams.token
    records = health_tests._records(ams)
    vm, b = records["vm"], records["b"]
    copy = make_vm(records["pool"], host=b, name_label=vm.name_label + SECONDARY_SUFFIX, power_state=PowerState.PAUSED)
    Protection.objects.filter(pk=records["protection"].pk).update(secondary_vm_uuid=copy.uuid)
    protection = _poll(Protection.objects.get(pk=records["protection"].pk))
    assert protection.status == ProtectionStatus.PROTECTED and set(_states(protection).values()) == {"ok"}
    return {**records, "protection": protection, "copy": copy}


def test_a_swap_request_is_a_named_workflow_run_and_the_protection_waits_for_it(swappable, admin_api):
    protection, a, b = swappable["protection"], swappable["a"], swappable["b"]
    response = admin_api.post(f"/api/v1/protections/{protection.pk}/swap/")
    assert response.status_code == 202, response.content
    body = response.json()
    run = WorkflowRun.objects.get(pk=body["run"])
    assert run.kind == RunKind.SWAP and run.protection_id == protection.pk and run.state == "pending"
    assert [s.name for s in run.steps.order_by("position")] == [s.name for s in steps_for(RunKind.SWAP, 2)]
    assert run.params["from_host"] == a.uuid and run.params["to_host"] == b.uuid and run.params["swapped"] is True
    assert run.params["status_before"] == ProtectionStatus.PROTECTED
    waiting = Protection.objects.get(pk=protection.pk)
    assert waiting.status == ProtectionStatus.PROTECTING and "from hosta to hostb" in waiting.status_reason
    assert _poll(waiting).components == protection.components  # the health poll leaves it to the workflow
    entry = AuditEntry.objects.filter(action=AuditAction.LEVEL2_ACTION).latest("pk")
    assert entry.detail["action"] == "swap" and entry.detail["run"] == run.pk
    again = admin_api.post(f"/api/v1/protections/{protection.pk}/swap/")
    assert again.status_code == 409 and "protecting" in again.content.decode()


@pytest.mark.parametrize(("change", "words"), [
    ("failed_over", "after a failover"),
    ("vm_halted", "only a running VM is swapped"),
    ("vm_elsewhere", "not on its primary host hosta"),
    ("copy_halted", "does not wait paused on hostb"),
    ("failed", "wait until it is protected or degraded"),
])
def test_a_swap_that_cannot_be_done_is_refused_with_a_sentence_and_nothing_queued(swappable, admin_api, change,
                                                                                   words):
    protection, vm, b = swappable["protection"], swappable["vm"], swappable["b"]
    if change == "failed_over":
        Protection.objects.filter(pk=protection.pk).update(failed_over_to=b)
    elif change == "vm_halted":
        vm.power_state, vm.resident_on = PowerState.HALTED, None
        vm.save()
    elif change == "vm_elsewhere":
        vm.resident_on = b
        vm.save()
    elif change == "copy_halted":
        copy = swappable["copy"]
        copy.power_state, copy.resident_on = PowerState.HALTED, None
        copy.save()
        _poll(protection)
    elif change == "failed":
        Protection.objects.filter(pk=protection.pk).update(status=ProtectionStatus.FAILED)
    response = admin_api.post(f"/api/v1/protections/{protection.pk}/swap/")
    assert response.status_code == 409 and words in response.content.decode(), response.content
    assert not WorkflowRun.objects.filter(kind=RunKind.SWAP).exists()
    assert Protection.objects.get(pk=protection.pk).status != ProtectionStatus.PROTECTING


def test_unprotect_is_refused_while_swapped(swappable, admin_api, operator_api):
    protection = swappable["protection"]
    assert operator_api.post(f"/api/v1/protections/{protection.pk}/swap/").status_code == 403
    Protection.objects.filter(pk=protection.pk).update(swapped=True)
    refused = admin_api.delete(f"/api/v1/protections/{protection.pk}/")
    assert refused.status_code == 409 and "swap it back first" in refused.content.decode()
    assert not WorkflowRun.objects.exists()
