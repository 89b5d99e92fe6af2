"""Protection and alerts pages: the wizard, the plan, runs, alerts, recipients, the audit log."""
from __future__ import annotations

import pytest

from alerts import services as alert_services
from alerts.models import Alert, Recipient
from eac.audit import AuditEntry
from protection.models import Protection, WorkflowRun

pytestmark = pytest.mark.django_db


def wizard_url(*vms) -> str:
    return "/protection/protect/?" + "&".join(f"vm={vm.uuid}" for vm in vms)


def test_wizard_shows_levels_with_reasons_preflight_and_settings(admin_client, pool_setup):
    page = admin_client.get(wizard_url(pool_setup["agile"], pool_setup["pinned"])).content.decode()
    assert "Level 1 — basic restart" in page and "Level 2 — component fault tolerance" in page
    assert "Level 3 — system fault tolerance" in page and "Not yet" not in page
    assert 'name="level" value="3" ' in page and 'value="3" disabled' not in page
    assert "VM restarted on a surviving host" in page  # the comparison table
    assert 'id="preflight-' + pool_setup["agile"].uuid + '" data-can-proceed="true"' in page
    assert 'id="preflight-' + pool_setup["pinned"].uuid + '" data-can-proceed="false"' in page
    assert "Local storage of host 1" in page
    assert "iSCSI shared" in page  # heartbeat SR choice, HA being off
    assert "Check the failover plan holds with the VM" in page


def test_wizard_protects_several_vms_and_shows_their_runs(admin_client, pool_setup):
    from tests.inventory.factories import make_disk, make_vm

    second = make_vm(pool_setup["pool"], host=pool_setup["hosts"][2], name_label="web-2")
    make_disk(second, pool_setup["shared"])
    response = admin_client.post("/protection/protect/", {
        "vm": [pool_setup["agile"].uuid, second.uuid], "level": "1", "restart_priority": "restart",
        "order": "1", "start_delay": "0", "heartbeat_sr": pool_setup["shared"].uuid, "failures_to_tolerate": "1",
    })
    assert response.status_code == 302
    runs = list(WorkflowRun.objects.order_by("pk"))
    assert len(runs) == 2 and response["Location"].endswith(f"?ids={runs[0].pk},{runs[1].pk}")
    page = admin_client.get(response["Location"]).content.decode()
    assert f'ws-connect="/ws/protection/?runs={runs[0].pk},{runs[1].pk}"' in page
    assert f'id="run-{runs[0].pk}"' in page and "<progress" in page
    assert AuditEntry.objects.filter(action="protect", via="ui").count() == 2


def test_wizard_refusal_says_why_and_starts_nothing(admin_client, pool_setup):
    response = admin_client.post("/protection/protect/", {
        "vm": pool_setup["pinned"].uuid, "level": "1", "heartbeat_sr": pool_setup["shared"].uuid,
    })
    assert response.status_code == 400
    assert "Local storage of host 1" in response.content.decode()
    assert not WorkflowRun.objects.exists()


def test_operator_sees_the_wizard_but_cannot_protect_through_the_ui(operator_client, pool_setup):
    page = operator_client.get(wizard_url(pool_setup["agile"]))
    assert page.status_code == 200
    assert "only Administrators can protect VMs" in page.content.decode()
    response = operator_client.post("/protection/protect/", {
        "vm": pool_setup["agile"].uuid, "level": "1", "heartbeat_sr": pool_setup["shared"].uuid,
    })
    assert response.status_code == 403
    assert not WorkflowRun.objects.exists() and not Protection.objects.exists()


def test_pool_plan_page_shows_the_plan_and_refuses_an_unmeetable_target_with_the_reason(
    admin_client, pool_setup
):
    from tests.inventory.factories import GiB, make_disk, make_vm

    pool = pool_setup["pool"]
    pool.ha_enabled = True
    pool.save()
    big = make_vm(pool, host=pool_setup["hosts"][0], name_label="big-db", memory_static_max=40 * GiB,
                  ha_restart_priority="restart")
    make_disk(big, pool_setup["shared"])
    page = admin_client.get(f"/protection/pools/{pool.pk}/plan/").content.decode()
    assert 'id="plan-max">0<' in page and "big-db" in page and "40.0" in page
    response = admin_client.post(f"/protection/pools/{pool.pk}/plan/", {"failures_to_tolerate": "1"})
    assert response.status_code == 409
    assert "cannot tolerate 1 host failure" in response.content.decode()
    assert not WorkflowRun.objects.exists()


def test_alerts_page_lists_open_alerts_and_an_operator_acknowledges(operator_client, operator_user):
    alert, _ = alert_services.alert_raise(condition="host_lost", object_key="host:a", host_name="xcp-a",
                                          message="Host xcp-a is lost.")
    page = operator_client.get("/alerts/").content.decode()
    assert "Host xcp-a is lost." in page and "Acknowledge" in page
    response = operator_client.post(f"/alerts/{alert.pk}/acknowledge/", {"next": "/alerts/"})
    assert response.status_code == 302
    assert Alert.objects.get(pk=alert.pk).acknowledged_by == operator_user
    alert_services.alert_clear(condition="host_lost", object_key="host:a", message="back")
    assert "Host xcp-a is lost." in operator_client.get("/alerts/?state=cleared").content.decode()


def test_recipients_page_lets_administrators_choose_conditions_and_refuses_operators(
    admin_client, operator_user, client
):
    response = admin_client.post("/alerts/recipients/", {"action": "add", "email": "ops@example.org",
                                                          "conditions": ["host_lost", "vm_restarted"]})
    assert response.status_code == 302
    recipient = Recipient.objects.get()
    assert recipient.conditions == ["host_lost", "vm_restarted"]
    bad = admin_client.post("/alerts/recipients/", {"action": "add", "email": "nope"})
    assert bad.status_code == 400 and "valid email" in bad.content.decode()
    assert AuditEntry.objects.filter(action="recipient").exists()
    audit = admin_client.get("/protection/audit/").content.decode()
    assert "ops@example.org" in audit and "alice-admin" in audit
    client.force_login(operator_user)
    assert client.post("/alerts/recipients/", {"action": "add", "email": "x@example.org"}).status_code == 403
    assert client.get("/alerts/recipients/").status_code == 200


def test_users_outside_both_groups_and_anonymous_see_no_protection_page(client, django_user_model, pool_setup):
    assert client.get("/protection/").status_code == 302  # to the login page
    nobody = django_user_model.objects.create_user("nobody", password="x")
    client.force_login(nobody)
    assert client.get("/protection/").status_code == 403
    assert client.get("/alerts/").status_code == 403
