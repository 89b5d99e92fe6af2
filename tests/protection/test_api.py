"""The protection REST API: who may do what, and every refusal a 4xx with its reasons."""
from __future__ import annotations

import pytest

from eac.audit import AuditEntry
from protection.models import Protection, WorkflowRun
from tests.inventory.factories import GiB, make_disk, make_vm
from tests.support import protection_states

pytestmark = pytest.mark.django_db


def protect(client, vm, **settings):
    return client.post("/api/v1/protections/", {"vm": vm.pk, "level": 1, "settings": settings}, format="json")


def test_administrator_protect_returns_202_with_the_run_and_its_steps(admin_api, pool_setup):
    response = protect(admin_api, pool_setup["agile"], heartbeat_sr=pool_setup["shared"].uuid, order=2)
    assert response.status_code == 202, response.content
    run = response.json()
    assert run["state"] == "pending" and run["kind"] == "protect" and run["vm"] == pool_setup["agile"].pk
    assert [s["state"] for s in run["steps"]] == ["pending"] * 5
    assert run["params"]["order"] == 2 and run["params"]["failures_to_tolerate"] == 1
    protection = Protection.objects.get(vm=pool_setup["agile"])
    assert protection.status == "protecting"
    # Being set up is not a loss of redundancy: shown as a candidate for Level 1, not degraded.
    assert protection_states([pool_setup["agile"].pk]) == {pool_setup["agile"].pk: (1, "candidate")}
    got = admin_api.get(f"/api/v1/workflow-runs/{run['id']}/").json()
    assert got["id"] == run["id"] and len(got["steps"]) == 5
    assert AuditEntry.objects.filter(action="protect", username="alice-admin").exists()


def test_operator_sees_protections_but_cannot_protect_or_unprotect(operator_api, admin_api, pool_setup):
    response = protect(operator_api, pool_setup["agile"], heartbeat_sr=pool_setup["shared"].uuid)
    assert response.status_code == 403
    assert "Administrators" in response.json()["detail"]
    assert not WorkflowRun.objects.exists()
    protect(admin_api, pool_setup["agile"], heartbeat_sr=pool_setup["shared"].uuid)
    protection = Protection.objects.get()
    WorkflowRun.objects.update(state="succeeded")
    Protection.objects.update(status="protected")
    assert operator_api.get("/api/v1/protections/").status_code == 200
    assert operator_api.delete(f"/api/v1/protections/{protection.pk}/").status_code == 403
    assert Protection.objects.get().status == "protected"
    assert operator_api.put(f"/api/v1/pools/{pool_setup['pool'].pk}/failover-plan/",
                            {"failures_to_tolerate": 1}, format="json").status_code == 403


def test_anonymous_gets_nothing(client, pool_setup):
    assert client.get("/api/v1/protections/").status_code in (401, 403)
    assert client.post("/api/v1/protections/", {}).status_code in (401, 403)
    assert client.get(f"/api/v1/pools/{pool_setup['pool'].pk}/failover-plan/").status_code in (401, 403)


def test_level_3_without_availability_managers_is_refused_with_the_reason(admin_api, pool_setup):
    response = admin_api.post("/api/v1/protections/", {"vm": pool_setup["agile"].pk, "level": 3}, format="json")
    assert response.status_code == 400
    assert "has no Availability Manager: Level 3 needs one" in str(response.json())


def test_vm_on_local_storage_is_refused_with_409_naming_the_sr(admin_api, pool_setup):
    response = protect(admin_api, pool_setup["pinned"], heartbeat_sr=pool_setup["shared"].uuid)
    assert response.status_code == 409
    body = response.json()
    assert any("Local storage of host 1" in reason for reason in body["reasons"])
    assert not Protection.objects.exists()


@pytest.mark.parametrize("payload, field", [
    ({"vm": 999999, "level": 1}, "vm"),
    ({"vm": "not-a-vm", "level": 1}, "vm"),
    ({"level": 1}, "vm"),
    ({"vm": "VM", "level": 7}, "level"),
    ({"vm": "VM", "level": 1, "settings": {"order": -1}}, "settings"),
    ({"vm": "VM", "level": 1, "settings": {"restart_priority": "always"}}, "settings"),
    ({"vm": "VM", "level": 1, "settings": {"heartbeat_sr": "no-such-sr"}}, "heartbeat_sr"),
    ({"vm": "VM", "level": 1, "settings": {"heartbeat_sr": "SHARED", "failures_to_tolerate": 9}},
     "failures_to_tolerate"),
])
def test_bad_input_is_a_400_naming_the_field(admin_api, pool_setup, payload, field):
    payload = {k: (pool_setup["agile"].pk if v == "VM" else v) for k, v in payload.items()}
    if "settings" in payload:
        payload["settings"] = {k: (pool_setup["shared"].uuid if v == "SHARED" else v)
                               for k, v in payload["settings"].items()}
    response = admin_api.post("/api/v1/protections/", payload, format="json")
    assert response.status_code == 400, response.content
    assert field in str(response.json())


def test_ha_off_without_a_heartbeat_sr_is_a_400_that_asks_for_one(admin_api, pool_setup):
    response = protect(admin_api, pool_setup["agile"])
    assert response.status_code == 400
    assert "heartbeat" in str(response.json())


def test_a_second_request_while_a_run_is_active_is_a_409(admin_api, pool_setup):
    assert protect(admin_api, pool_setup["agile"], heartbeat_sr=pool_setup["shared"].uuid).status_code == 202
    response = protect(admin_api, pool_setup["agile"], heartbeat_sr=pool_setup["shared"].uuid)
    assert response.status_code == 409
    assert "already running" in response.json()["detail"]


def test_preflight_says_why_a_vm_cannot_be_protected(admin_api, pool_setup):
    ok = admin_api.get("/api/v1/protections/preflight/", {"vm": pool_setup["agile"].pk, "level": 1}).json()
    assert ok["can_proceed"] is True
    assert [c["name"] for c in ok["checks"]][:3] == ["level", "agility", "plan"]
    assert ok["heartbeat_srs"] == [{"uuid": pool_setup["shared"].uuid, "name_label": "iSCSI shared"}]
    bad = admin_api.get("/api/v1/protections/preflight/", {"vm": pool_setup["pinned"].pk, "level": 1}).json()
    assert bad["can_proceed"] is False
    agility = next(c for c in bad["checks"] if c["name"] == "agility")
    assert not agility["ok"] and "Local storage of host 1" in agility["message"]
    level3 = admin_api.get("/api/v1/protections/preflight/", {"vm": pool_setup["agile"].pk, "level": 3}).json()
    assert level3["can_proceed"] is False


def test_failover_plan_shows_what_would_not_restart_and_refuses_an_unmeetable_target(admin_api, pool_setup):
    pool = pool_setup["pool"]
    pool.ha_enabled = True
    pool.ha_host_failures_to_tolerate = 1
    pool.save()
    hosts = pool_setup["hosts"]
    for i, host in enumerate(hosts):
        host.memory_free = [2 * GiB, 2 * GiB, 6 * GiB][i]
        host.save()
    big = make_vm(pool, host=hosts[2], name_label="big-db", memory_static_max=8 * GiB, ha_restart_priority="restart")
    make_disk(big, pool_setup["shared"])
    plan = admin_api.get(f"/api/v1/pools/{pool.pk}/failover-plan/").json()
    assert plan["configured_failures_to_tolerate"] == 1 and plan["max_failures_to_tolerate"] == 0
    assert plan["holds"] is False
    (shortfall,) = plan["shortfalls"]
    assert shortfall["failed_hosts"] == [hosts[2].name_label]
    assert shortfall["vms"][0]["name"] == "big-db" and shortfall["missing_memory"] == 8 * GiB
    response = admin_api.put(f"/api/v1/pools/{pool.pk}/failover-plan/", {"failures_to_tolerate": 1}, format="json")
    assert response.status_code == 409
    assert "big-db" in response.json()["reasons"][0]
    assert AuditEntry.objects.filter(action="set_ftt_refused").exists()
    ok = admin_api.put(f"/api/v1/pools/{pool.pk}/failover-plan/", {"failures_to_tolerate": 0}, format="json")
    assert ok.status_code == 202 and ok.json()["kind"] == "set_ftt"
    assert admin_api.put(f"/api/v1/pools/{pool.pk}/failover-plan/", {"failures_to_tolerate": "x"},
                         format="json").status_code == 400
    assert admin_api.get("/api/v1/pools/999999/failover-plan/").status_code == 404


def test_openapi_schema_describes_the_protection_endpoints(admin_api):
    response = admin_api.get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    paths = response.json()["paths"]
    for path in ("/api/v1/protections/", "/api/v1/protections/{id}/", "/api/v1/workflow-runs/{id}/",
                 "/api/v1/pools/{id}/failover-plan/", "/api/v1/alerts/", "/api/v1/alert-recipients/",
                 "/api/v1/alerts/{id}/acknowledge/", "/api/v1/alerts/test/"):
        assert path in paths, path
    assert "202" in paths["/api/v1/protections/"]["post"]["responses"]
    assert "409" in paths["/api/v1/protections/"]["post"]["responses"]


def test_tree_annotations_follow_the_protection_status(pool_setup):
    from inventory.models import VM
    from protection.selectors import vm_annotate_protection

    agile, pinned = pool_setup["agile"], pool_setup["pinned"]

    def state(vm):
        row = vm_annotate_protection(VM.objects.filter(pk=vm.pk)).get()
        return row.prot_level, row.prot_health, row.prot_status

    assert state(agile) == (None, "unprotected", "candidate")
    assert state(pinned) == (None, "unprotected", "unprotected")
    protection = Protection.objects.create(vm=agile, pool=agile.pool, status="protected")
    assert state(agile) == (1, "good", "level1")
    assert protection_states([agile.pk, pinned.pk]) == {agile.pk: (1, "good"), pinned.pk: (None, "unprotected")}
    for status, health in (("failing_over", "degraded"), ("degraded", "degraded"), ("failed", "failed")):
        Protection.objects.filter(pk=protection.pk).update(status=status)
        assert state(agile) == (1, health, "degraded")


@pytest.mark.parametrize("payload", [
    {"vm": {"id": 1}, "level": 1}, {"vm": True, "level": 1}, {"vm": "VM", "level": 1, "settings": []},
    {"vm": "VM", "level": "one"}, {"vm": "VM", "level": 1, "settings": {"order": "x"}}, [], "garbage",
])
def test_malformed_requests_are_400s_never_500s(admin_api, pool_setup, payload):
    if isinstance(payload, dict):
        payload = {k: (pool_setup["agile"].pk if v == "VM" else v) for k, v in payload.items()}
    response = admin_api.post("/api/v1/protections/", payload, format="json")
    assert response.status_code == 400, response.content
    assert admin_api.get("/api/v1/protections/preflight/").status_code == 400
    assert admin_api.get("/api/v1/protections/preflight/", {"vm": "x" * 70}).status_code == 400
    assert admin_api.delete("/api/v1/protections/424242/").status_code == 404


def test_a_vm_being_unprotected_still_shows_its_level_as_good_until_the_run_ends(admin_api, pool_setup):
    response = protect(admin_api, pool_setup["agile"], heartbeat_sr=pool_setup["shared"].uuid, order=2)
    assert response.status_code == 202, response.content
    Protection.objects.filter(vm=pool_setup["agile"]).update(status="unprotecting")
    # XAPI keeps restarting the VM until the unprotect steps have run.
    assert protection_states([pool_setup["agile"].pk]) == {pool_setup["agile"].pk: (1, "good")}


def test_a_pool_being_removed_refuses_new_protections_and_plan_changes_with_409(admin_api, pool_setup):
    from django.utils import timezone

    pool = pool_setup["pool"]
    pool.removing_since = timezone.now()
    pool.save(update_fields=["removing_since"])
    response = protect(admin_api, pool_setup["agile"], heartbeat_sr=pool_setup["shared"].uuid)
    assert response.status_code == 409 and "being removed" in str(response.json()), response.content
    response = admin_api.put(f"/api/v1/pools/{pool.pk}/failover-plan/", {"failures_to_tolerate": 1}, format="json")
    assert response.status_code == 409 and "being removed" in str(response.json()), response.content
    assert not WorkflowRun.objects.exists()
