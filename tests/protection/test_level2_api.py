"""Level 2 through the REST API and the wizard: the preflight in words, and every bad request refused with a
sentence and a 4xx before anything is recorded (no protection, no run)."""
from __future__ import annotations

import html

import pytest

from eac.audit import AuditEntry
from protection.choices import Level
from protection.models import Protection, WorkflowRun
from protection.selectors import vm_protection_states
from protection.workflows import LEVEL2_WORKFLOWS
from tests.inventory.factories import GiB, make_disk, make_host, make_pbd, make_pool, make_sr, make_vm

pytestmark = pytest.mark.django_db
MiB = 2**20
PROTECT_STEPS = [s.name for s in LEVEL2_WORKFLOWS["protect"]]


@pytest.fixture
def pair():
    """Hosts A and B, AM peers; C has an AM paired with D, which has none. A VM runs on A, its disk on A's
    local SR (not agile: Level 2 does not care); B has a local SR with room for the replica."""
    pool = make_pool()
    a = make_host(pool, name_label="host-a", memory_free=16 * GiB)
    b = make_host(pool, name_label="host-b", memory_free=16 * GiB)
    c = make_host(pool, name_label="host-c", memory_free=16 * GiB)
    d = make_host(pool, name_label="host-d", memory_free=16 * GiB)
    for host, peer in ((a, b), (b, a), (c, d)):
        host.am_url, host.am_peer = f"http://{host.address}:7480", peer.uuid
        host.save()
    local_a = make_sr(pool, shared=False, name_label="Local storage of host-a")
    local_b = make_sr(pool, shared=False, name_label="Local storage of host-b",
                      physical_size=100 * GiB, physical_utilisation=10 * GiB)
    make_pbd(a, local_a)
    make_pbd(b, local_b)
    vm = make_vm(pool, host=a, name_label="db-01", memory_static_max=4 * GiB, memory_dynamic_max=4 * GiB,
                 memory_dynamic_min=2 * GiB)
    make_disk(vm, local_a, virtual_size=20 * GiB)
    return {"pool": pool, "a": a, "b": b, "c": c, "d": d, "vm": vm, "local_b": local_b}


def protect(client, vm, **settings):
    return client.post("/api/v1/protections/", {"vm": vm.pk, "level": 2, "settings": settings}, format="json")


def preflight(client, vm, **query):
    response = client.get("/api/v1/protections/preflight/", {"vm": vm.pk, "level": 2, **query})
    assert response.status_code == 200, response.content
    return response.json()


def checks(body) -> dict[str, dict]:
    return {c["name"]: c for c in body["checks"]}


def test_preflight_suggests_the_am_peer_and_says_every_check_in_words(admin_api, pair):
    body = preflight(admin_api, pair["vm"])
    assert body["can_proceed"] is True, body
    got = checks(body)
    assert set(got) == {"level", "power", "disks", "am", "secondary", "footprint", "memory", "storage", "links"}
    assert "agility" not in got  # a VM on local storage is fine at Level 2
    assert all(c["message"].endswith(".") and c["title"] for c in body["checks"])
    assert "host-b" in got["secondary"]["message"] and "suggested" in got["secondary"]["message"]
    assert "Local storage of host-b" in got["storage"]["message"] and "90.0 GiB free" in got["storage"]["message"]
    assert "4096 MiB" in got["footprint"]["message"]
    level2 = body["level2"]
    assert level2["secondary_host"] == pair["b"].uuid and level2["secondary_sr"] == pair["local_b"].uuid
    assert level2["secondary_memory"] == 4 * GiB and level2["memory_minimum"] == 2 * GiB
    assert [h["name_label"] for h in level2["secondary_hosts"]] == ["host-b", "host-c"]  # D has no AM
    assert [h["suggested"] for h in level2["secondary_hosts"]] == [True, False]


def test_a_lower_footprint_is_accepted_with_a_warning_that_the_vm_restarts_with_less(admin_api, pair):
    body = preflight(admin_api, pair["vm"], secondary_memory=3 * GiB)
    footprint = checks(body)["footprint"]
    assert body["can_proceed"] is True
    assert footprint["ok"] is False and footprint["blocking"] is False
    assert "restarts with less memory" in footprint["message"]
    response = protect(admin_api, pair["vm"], secondary_memory=3 * GiB)
    assert response.status_code == 202, response.content
    assert response.json()["params"]["secondary_memory"] == 3 * GiB


def test_protect_at_level2_records_the_pair_and_queues_the_level2_steps(admin_api, pair):
    response = protect(admin_api, pair["vm"])
    assert response.status_code == 202, response.content
    run = response.json()
    assert [s["name"] for s in run["steps"]] == PROTECT_STEPS
    assert run["params"] == {"level": 2, "primary_host": pair["a"].uuid, "secondary_host": pair["b"].uuid,
                             "secondary_memory": 4 * GiB, "secondary_sr": pair["local_b"].uuid}
    protection = Protection.objects.get(vm=pair["vm"])
    assert protection.level == Level.COMPONENT_FT and protection.status == "protecting"
    assert protection.secondary_host == pair["b"] and protection.secondary_memory == 4 * GiB
    shown = admin_api.get(f"/api/v1/protections/{protection.pk}/").json()
    assert shown["secondary_host"] == pair["b"].uuid and shown["disks"] == []
    # The console's "Hosts" column names the secondary.
    assert vm_protection_states([pair["vm"]])[pair["vm"].pk].secondary_host == "host-b"
    assert AuditEntry.objects.filter(action="protect", vm=pair["vm"]).exists()
    # A second Level 2 request, once this one is done, is refused until the VM is unprotected.
    WorkflowRun.objects.update(state="failed")
    again = protect(admin_api, pair["vm"])
    assert again.status_code == 409 and "unprotect it first" in again.json()["detail"]


def test_unprotect_at_level2_queues_the_level2_undo_steps(admin_api, pair):
    protect(admin_api, pair["vm"])
    WorkflowRun.objects.update(state="failed")
    protection = Protection.objects.get(vm=pair["vm"])
    response = admin_api.delete(f"/api/v1/protections/{protection.pk}/")
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["params"] == {"level": 2}
    assert [s["name"] for s in body["steps"]] == [s.name for s in LEVEL2_WORKFLOWS["unprotect"]]


def test_level2_over_a_level1_protection_is_refused_until_it_is_unprotected(admin_api, pair):
    Protection.objects.create(vm=pair["vm"], pool=pair["pool"], level=1, status="protected")
    response = protect(admin_api, pair["vm"])
    assert response.status_code == 409
    assert "Level 1 protection" in response.json()["detail"] and "unprotect it first" in response.json()["detail"]
    assert not WorkflowRun.objects.exists()


def _no_disk_vm(pair):
    return make_vm(pair["pool"], host=pair["a"], name_label="diskless")


def _halted_vm(pair):
    vm = make_vm(pair["pool"], name_label="halted")
    make_disk(vm, pair["local_b"])
    return vm


def _vm_on_host_without_am(pair):
    vm = make_vm(pair["pool"], host=pair["d"], name_label="on-d")
    make_disk(vm, pair["local_b"])
    return vm


def _starve_b(pair):
    pair["b"].memory_free = 1 * GiB
    pair["b"].save()
    return pair["vm"]


def _fill_local_sr_of_b(pair):
    pair["local_b"].physical_utilisation = 95 * GiB
    pair["local_b"].save()
    return pair["vm"]


@pytest.mark.parametrize("make, settings, status, field, words", [
    (None, {"secondary_host": "A"}, 400, "secondary_host", "another host than the one the VM runs on"),
    (None, {"secondary_host": "D"}, 400, "secondary_host", "host-d has no Availability Manager"),
    (None, {"secondary_host": "C"}, 400, "secondary_host", "host-c is not the AM peer of host-a (its peer is host-b)"),
    (None, {"secondary_host": "00000000-0000-0000-0000-000000000000"}, 400, "secondary_host", "No host"),
    (None, {"secondary_memory": 1 * GiB}, 400, "secondary_memory", "below the VM's dynamic minimum (2048 MiB)"),
    (None, {"secondary_memory": 8 * GiB}, 400, "secondary_memory", "more than the VM's memory"),
    (None, {"secondary_memory": "lots"}, 400, "secondary_memory", "valid integer"),
    (_vm_on_host_without_am, {}, 400, "secondary_host", "host-d has no Availability Manager"),
    (_no_disk_vm, {}, 409, None, "The VM has no disk"),
    (_halted_vm, {"secondary_host": "B"}, 409, None, "The VM is halted"),
    (_starve_b, {}, 409, None, "host-b has 1.0 GiB free; the secondary VM needs 4.0 GiB"),
    (_fill_local_sr_of_b, {}, 409, None, "has 5.0 GiB free; the replicas need 20.0 GiB"),
])
def test_bad_level2_requests_are_refused_with_a_sentence_and_nothing_is_started(
    admin_api, pair, make, settings, status, field, words
):
    vm = make(pair) if make else pair["vm"]
    hosts = {"A": pair["a"].uuid, "B": pair["b"].uuid, "C": pair["c"].uuid, "D": pair["d"].uuid}
    settings = {k: hosts.get(v, v) if isinstance(v, str) else v for k, v in settings.items()}
    response = protect(admin_api, vm, **settings)
    assert response.status_code == status, response.content
    body = response.json()
    text = str(body)
    assert words in text, text
    if status == 400:
        assert field in text
    else:
        assert any(words in reason for reason in body["reasons"]), body
    assert not Protection.objects.exists() and not WorkflowRun.objects.exists()


def test_the_am_token_appears_in_no_api_answer(admin_api, pair, settings):
    settings.EAC_AM_TOKEN = "tok-" + "s3cr3t" * 4
    protect(admin_api, pair["vm"])
    answers = [admin_api.get(path).content.decode() for path in (
        "/api/v1/protections/", "/api/v1/workflow-runs/", f"/api/v1/hosts/{pair['a'].pk}/",
        f"/api/v1/protections/preflight/?vm={pair['vm'].pk}&level=2")]
    assert all(a and "s3cr3t" not in a for a in answers)
    assert pair["a"].am_url in answers[2]  # the AM's address is shown; its token never is


# -- the wizard ------------------------------------------------------------------------------------------


def wizard(vm, **params) -> str:
    return "/protection/protect/?" + "&".join([f"vm={vm.uuid}", *(f"{k}={v}" for k, v in params.items())])


def test_wizard_offers_level2_with_its_checks_choices_and_steps(admin_client, pair):
    page = admin_client.get(wizard(pair["vm"], level=2)).content.decode()
    assert 'name="level" value="2" checked' in page
    assert 'name="level" value="3" ' in page  # Level 3 is offered beside it
    assert f'id="preflight-{pair["vm"].uuid}" data-can-proceed="true"' in page
    for title in ("Secondary host", "Memory on the secondary", "Storage on the secondary", "AM links"):
        assert title in page
    assert f'<option value="{pair["b"].uuid}" >host-b (AM peer)</option>' in page
    assert "after a failover the VM restarts with that much memory only" in page
    for step in LEVEL2_WORKFLOWS["protect"]:
        assert html.escape(step.label) in page
    lower = admin_client.get(wizard(pair["vm"], level=2, secondary_memory_mib=3072)).content.decode()
    assert "restarts with less memory" in lower


def test_wizard_refuses_a_bad_secondary_with_a_sentence_and_starts_nothing(admin_client, pair):
    response = admin_client.post("/protection/protect/", {"vm": pair["vm"].uuid, "level": "2",
                                                          "secondary_host": pair["c"].uuid})
    assert response.status_code == 400
    assert "host-c is not the AM peer of host-a" in response.content.decode()
    response = admin_client.post("/protection/protect/", {"vm": pair["vm"].uuid, "level": "2",
                                                          "secondary_memory_mib": "1024"})
    assert response.status_code == 400
    assert html.escape("below the VM's dynamic minimum") in response.content.decode()
    assert not WorkflowRun.objects.exists() and not Protection.objects.exists()


def test_wizard_protects_at_level2_with_the_suggested_peer(admin_client, pair):
    response = admin_client.post("/protection/protect/", {"vm": pair["vm"].uuid, "level": "2",
                                                          "secondary_memory_mib": "3072"})
    assert response.status_code == 302, response.content.decode()[-2000:]
    run = WorkflowRun.objects.get()
    assert run.params["secondary_host"] == pair["b"].uuid and run.params["secondary_memory"] == 3072 * MiB
    assert [s.name for s in run.steps.order_by("position")] == PROTECT_STEPS
