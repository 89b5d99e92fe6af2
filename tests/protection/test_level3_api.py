"""Level 3 through the REST API and the wizard: offered beside Levels 1 and 2, its epoch length bounded (a bad value
a 400 or a form error naming it, never a 500), a VM that cannot be checkpointed refused with the reason in words, and
nothing recorded (no protection, no run) when refused. Level 2's requests are unchanged (test_level2_api.py)."""
from __future__ import annotations

import html

import pytest

from eac.audit import AuditEntry
from protection.choices import EPOCH_MS_DEFAULT, Level
from protection.models import Protection, WorkflowRun
from protection.workflows import LEVEL2_WORKFLOWS, LEVEL3_WORKFLOWS, steps_for
from tests.inventory.factories import (
    GiB,
    make_disk,
    make_host,
    make_network,
    make_nic,
    make_pbd,
    make_pool,
    make_sr,
    make_vm,
)

pytestmark = pytest.mark.django_db
PROTECT_STEPS = [s.name for s in LEVEL3_WORKFLOWS["protect"]]


@pytest.fixture
def pair():
    """Hosts A and B, AM peers; a 1-vCPU VM with one NIC runs on A, its disk on A's local SR; B has room."""
    pool = make_pool()
    a = make_host(pool, name_label="host-a", memory_free=16 * GiB)
    b = make_host(pool, name_label="host-b", memory_free=16 * GiB)
    for host, peer in ((a, b), (b, a)):
        host.am_url, host.am_peer = f"http://{host.address}:7480", peer.uuid
        host.save()
    local_a = make_sr(pool, shared=False, name_label="Local storage of host-a")
    local_b = make_sr(pool, shared=False, name_label="Local storage of host-b",
                      physical_size=100 * GiB, physical_utilisation=10 * GiB)
    make_pbd(a, local_a)
    make_pbd(b, local_b)
    net = make_network(pool, name_label="Pool-wide network")
    vm = make_vm(pool, host=a, name_label="ledger", vcpus_max=1, memory_static_max=2 * GiB,
                 memory_dynamic_max=2 * GiB, memory_dynamic_min=2 * GiB)
    make_disk(vm, local_a, virtual_size=10 * GiB)
    make_nic(vm, net, device="0")
    return {"pool": pool, "a": a, "b": b, "vm": vm, "net": net, "local_b": local_b}


def protect(client, vm, **settings):
    return client.post("/api/v1/protections/", {"vm": vm.pk, "level": 3, "settings": settings}, format="json")


def checks(client, vm, **query) -> dict[str, dict]:
    response = client.get("/api/v1/protections/preflight/", {"vm": vm.pk, "level": 3, **query})
    assert response.status_code == 200, response.content
    return response.json()


def nothing_recorded() -> bool:
    return not Protection.objects.exists() and not WorkflowRun.objects.exists()


def test_protect_at_level3_records_the_epoch_and_queues_level2s_steps_with_a_check_of_the_vm(admin_api, pair):
    response = protect(admin_api, pair["vm"], epoch_ms=120)
    assert response.status_code == 202, response.content
    run = response.json()
    assert [s["name"] for s in run["steps"]] == PROTECT_STEPS
    assert ["check_vm", *[s.name for s in LEVEL2_WORKFLOWS["protect"]]] == PROTECT_STEPS
    assert run["params"] == {"level": 3, "primary_host": pair["a"].uuid, "secondary_host": pair["b"].uuid,
                             "secondary_memory": 2 * GiB, "secondary_sr": pair["local_b"].uuid,
                             "epoch_ms": 120}
    protection = Protection.objects.get(vm=pair["vm"])
    assert protection.level == Level.SYSTEM_FT and protection.epoch_ms == 120
    assert protection.secondary_host == pair["b"]
    shown = admin_api.get(f"/api/v1/protections/{protection.pk}/").json()
    assert shown["level"] == 3 and shown["epoch_ms"] == 120
    assert AuditEntry.objects.get(action="protect", vm=pair["vm"]).detail["settings"]["epoch_ms"] == 120


def test_the_epoch_length_defaults_to_50_ms(admin_api, pair):
    response = protect(admin_api, pair["vm"])
    assert response.status_code == 202, response.content
    assert response.json()["params"]["epoch_ms"] == EPOCH_MS_DEFAULT == 50
    assert Protection.objects.get().epoch_ms == 50


@pytest.mark.parametrize("epoch", [19, 501, 0, -50, 10**30, "fifty", 50.5, [], {"ms": 50}, True])
def test_a_bad_epoch_length_is_a_400_naming_it_and_records_nothing(admin_api, pair, epoch):
    response = protect(admin_api, pair["vm"], epoch_ms=epoch)
    assert response.status_code == 400, (epoch, response.status_code, response.content)
    assert "epoch_ms" in response.json()["settings"], response.json()
    assert nothing_recorded()


@pytest.mark.parametrize("epoch", [19, 501, "x"])
def test_a_bad_epoch_length_in_the_preflight_query_is_a_400(admin_api, pair, epoch):
    response = admin_api.get("/api/v1/protections/preflight/", {"vm": pair["vm"].pk, "level": 3, "epoch_ms": epoch})
    assert response.status_code == 400 and "epoch_ms" in response.json()


def test_the_service_refuses_a_bad_epoch_that_did_not_come_through_a_form(admin_user, pair):
    """The service is the last word (it serves the socket and the shell too): no int() crash, a ValidationError."""
    from django.core.exceptions import ValidationError

    from protection import services

    for epoch in ("abc", float("nan"), float("inf"), 20.5, object(), 501, 19):
        with pytest.raises(ValidationError) as refused:
            services.protection_start(vm=pair["vm"], level=3, settings={"epoch_ms": epoch}, requested_by=admin_user)
        assert "epoch_ms" in refused.value.message_dict
    run = services.protection_start(vm=pair["vm"], level=3, settings={"epoch_ms": "20"}, requested_by=admin_user)
    assert run.params["epoch_ms"] == 20


def test_a_vm_with_two_vcpus_is_refused_saying_checkpointing_captures_one(admin_api, pair):
    pair["vm"].vcpus_max = 2
    pair["vm"].save()
    body = checks(admin_api, pair["vm"])
    vcpus = next(c for c in body["checks"] if c["name"] == "vcpus")
    assert body["can_proceed"] is False and vcpus["blocking"] is True
    assert "2 vCPUs (VM.VCPUs_max)" in vcpus["message"]
    assert "checkpointing captures one vCPU's state" in vcpus["message"]
    response = protect(admin_api, pair["vm"])
    assert response.status_code == 409, response.content
    assert any("checkpointing captures one vCPU's state" in r for r in response.json()["reasons"])
    assert nothing_recorded()
    # The same VM at Level 2 is fine: only checkpointing needs one vCPU.
    assert admin_api.post("/api/v1/protections/", {"vm": pair["vm"].pk, "level": 2}, format="json").status_code == 202


def test_a_vm_with_two_disks_is_refused_as_its_epochs_would_commit_apart(admin_api, pair):
    make_disk(pair["vm"], pair["vm"].vbds.first().vdi.sr, virtual_size=GiB, userdevice="1")
    body = checks(admin_api, pair["vm"])
    disks = next(c for c in body["checks"] if c["name"] == "level3-disks")
    assert body["can_proceed"] is False and disks["blocking"] is True and "2 disks" in disks["message"]
    response = protect(admin_api, pair["vm"])
    assert response.status_code == 409, response.content
    assert any("Level 3 checkpoints a VM with one disk" in r for r in response.json()["reasons"])
    assert nothing_recorded()
    assert admin_api.post("/api/v1/protections/", {"vm": pair["vm"].pk, "level": 2}, format="json").status_code == 202


def test_a_vm_without_a_network_interface_is_refused_with_the_reason(admin_api, pair):
    pair["vm"].vifs.all().delete()
    response = protect(admin_api, pair["vm"])
    assert response.status_code == 409
    assert any("0 network interface(s)" in r and "1 to 8" in r for r in response.json()["reasons"])
    for n in range(1, 10):
        make_nic(pair["vm"], pair["net"], device=str(n))
    response = protect(admin_api, pair["vm"])
    assert response.status_code == 409 and any("9 network interface(s)" in r for r in response.json()["reasons"])
    assert nothing_recorded()


def test_the_preflight_says_level3s_checks_in_words(admin_api, pair):
    body = checks(admin_api, pair["vm"], epoch_ms=200)
    got = {c["name"]: c for c in body["checks"]}
    assert body["can_proceed"] is True, body
    assert {"vcpus", "nics", "epoch", "secondary", "memory", "storage"} <= set(got)
    assert "Level 3" in got["level"]["message"] and "keep their sessions" in got["level"]["message"]
    assert "every 200 ms" in got["epoch"]["message"]
    assert body["level3"] == {"epoch_ms": 200, "epoch_min": 20, "epoch_max": 500, "vcpus_max": 1}
    assert body["level2"]["secondary_host"] == pair["b"].uuid
    assert all(c["message"].endswith(".") for c in body["checks"])
    level2 = admin_api.get("/api/v1/protections/preflight/", {"vm": pair["vm"].pk, "level": 2}).json()
    assert level2["level3"] is None and "vcpus" not in {c["name"] for c in level2["checks"]}


def test_level3_unprotect_and_swap_are_level2s_workflows(admin_api, pair):
    assert protect(admin_api, pair["vm"]).status_code == 202
    WorkflowRun.objects.update(state="succeeded")
    protection = Protection.objects.get()
    Protection.objects.filter(pk=protection.pk).update(status="protected")
    # the swap's own checks (the peer on both links) answer first: no AM has been read for this protection
    swap = admin_api.post(f"/api/v1/protections/{protection.pk}/swap/")
    assert swap.status_code == 409 and "both links" in str(swap.json()), swap.content
    response = admin_api.delete(f"/api/v1/protections/{protection.pk}/")
    assert response.status_code == 202, response.content
    assert response.json()["params"] == {"level": 3}
    assert [s["name"] for s in response.json()["steps"]] == [s.name for s in LEVEL2_WORKFLOWS["unprotect"]]
    assert steps_for("swap", 3) == LEVEL2_WORKFLOWS["swap"]
    assert steps_for("protect", 2) == LEVEL2_WORKFLOWS["protect"]


def test_level3_over_a_level2_protection_is_refused_until_it_is_unprotected(admin_api, pair):
    Protection.objects.create(vm=pair["vm"], pool=pair["pool"], level=2, status="protected")
    response = protect(admin_api, pair["vm"])
    assert response.status_code == 409 and "unprotect it first, then protect it at Level 3" in response.json()["detail"]


# -- the wizard ------------------------------------------------------------------------------------------


def wizard(vm, **params) -> str:
    return "/protection/protect/?" + "&".join([f"vm={vm.uuid}", *(f"{k}={v}" for k, v in params.items())])


def test_wizard_offers_level3_with_its_epoch_its_checks_and_its_steps(admin_client, pair):
    page = admin_client.get(wizard(pair["vm"], level=3, epoch_ms=80)).content.decode()
    assert 'name="level" value="3" checked' in page
    assert 'id="id_epoch_ms" name="epoch_ms" type="number" min="20" max="500" step="1" value="80"' in page
    assert f'id="preflight-{pair["vm"].uuid}" data-can-proceed="true"' in page
    assert "A checkpoint every 80 ms" in page and "vCPUs" in page
    for step in LEVEL3_WORKFLOWS["protect"]:
        assert html.escape(step.label) in page


def test_wizard_refuses_a_bad_epoch_with_a_sentence_and_starts_nothing(admin_client, pair):
    for value, words in (("10", "greater than or equal to 20"), ("900", "less than or equal to 500"),
                         ("fast", "Enter a whole number")):
        response = admin_client.post("/protection/protect/", {"vm": pair["vm"].uuid, "level": "3",
                                                              "epoch_ms": value})
        assert response.status_code == 400, (value, response.status_code)
        assert "Epoch length (ms): " in response.content.decode() and words in response.content.decode()
    assert nothing_recorded()


def test_wizard_refuses_a_two_vcpu_vm_in_words(admin_client, pair):
    pair["vm"].vcpus_max = 2
    pair["vm"].save()
    response = admin_client.post("/protection/protect/", {"vm": pair["vm"].uuid, "level": "3"})
    assert response.status_code == 400
    assert html.escape("checkpointing captures one vCPU's state") in response.content.decode()
    assert nothing_recorded()


def test_wizard_protects_at_level3_with_the_epoch_given(admin_client, pair):
    response = admin_client.post("/protection/protect/", {"vm": pair["vm"].uuid, "level": "3", "epoch_ms": "40"})
    assert response.status_code == 302, response.content.decode()[-2000:]
    run = WorkflowRun.objects.get()
    assert run.params["epoch_ms"] == 40 and run.params["level"] == 3
    assert [s.name for s in run.steps.order_by("position")] == PROTECT_STEPS
