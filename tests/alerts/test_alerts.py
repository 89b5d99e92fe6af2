"""Alerts: raised once, folded, cleared once; recipients and their conditions; acknowledging; mail."""
from __future__ import annotations

import pytest

from alerts import services
from alerts.models import Alert, Delivery, Recipient
from eac.audit import AuditEntry
from tests.inventory.factories import make_pool
from tests.support import Mailbox, free_port, wait_for


@pytest.mark.django_db
def test_a_condition_is_raised_once_duplicates_fold_and_it_clears_once():
    pool = make_pool()
    Recipient.objects.create(email="all@example.org")
    Recipient.objects.create(email="hosts@example.org", conditions=["host_lost"])
    Recipient.objects.create(email="vms@example.org", conditions=["vm_restarted"])
    Recipient.objects.create(email="off@example.org", enabled=False)
    alert, raised = services.alert_raise(condition="host_lost", object_key="host:1", pool=pool, host_name="h1",
                                         message="Host h1 is lost.")
    again, raised_again = services.alert_raise(condition="host_lost", object_key="host:1", pool=pool,
                                               message="Host h1 is lost.")
    assert raised and not raised_again and again.pk == alert.pk and again.occurrences == 2
    assert sorted(Delivery.objects.filter(kind="raised").values_list("email", flat=True)) == [
        "all@example.org", "hosts@example.org"]
    # Another object or another condition is another alert.
    services.alert_raise(condition="host_lost", object_key="host:2", pool=pool, message="Host h2 is lost.")
    services.alert_raise(condition="vm_restarted", object_key="host:1", pool=pool, message="x")
    assert Alert.objects.filter(state="open").count() == 3

    assert services.alert_clear(condition="host_lost", object_key="host:1", message="back").state == "cleared"
    assert services.alert_clear(condition="host_lost", object_key="host:1") is None
    assert Delivery.objects.filter(alert=alert, kind="cleared").count() == 2
    # Raised again later: a new alert, new mails.
    new, raised = services.alert_raise(condition="host_lost", object_key="host:1", pool=pool, message="lost again")
    assert raised and new.pk != alert.pk


@pytest.mark.django_db
def test_operator_lists_and_acknowledges_alerts_but_cannot_change_recipients(operator_api, admin_api):
    alert, _ = services.alert_raise(condition="pool_unreachable", object_key="pool:x", message="unreachable")
    listed = operator_api.get("/api/v1/alerts/", {"state": "open"}).json()
    assert [a["id"] for a in listed["results"]] == [alert.pk]
    response = operator_api.post(f"/api/v1/alerts/{alert.pk}/acknowledge/")
    assert response.status_code == 200 and response.json()["acknowledged_by"] == "oscar-operator"
    assert AuditEntry.objects.filter(action="alert_ack", username="oscar-operator").exists()
    assert operator_api.post("/api/v1/alert-recipients/", {"email": "x@example.org"}, format="json").status_code == 403
    assert operator_api.post("/api/v1/alerts/test/", {}, format="json").status_code == 403
    assert operator_api.get("/api/v1/alerts/", {"acknowledged": "true"}).json()["count"] == 1


@pytest.mark.django_db
def test_recipients_are_managed_through_the_api_with_clear_errors(admin_api):
    created = admin_api.post("/api/v1/alert-recipients/",
                             {"email": "ops@example.org", "conditions": ["host_lost", "vm_restart_failed"]},
                             format="json")
    assert created.status_code == 201, created.content
    assert created.json()["conditions"] == ["host_lost", "vm_restart_failed"]
    duplicate = admin_api.post("/api/v1/alert-recipients/", {"email": "OPS@example.org"}, format="json")
    assert duplicate.status_code == 400 and "already" in str(duplicate.json())
    unknown = admin_api.post("/api/v1/alert-recipients/", {"email": "b@example.org", "conditions": ["nope"]},
                             format="json")
    assert unknown.status_code == 400 and "conditions" in unknown.json()
    assert admin_api.post("/api/v1/alert-recipients/", {"email": "not-an-address"}, format="json").status_code == 400
    pk = created.json()["id"]
    patched = admin_api.patch(f"/api/v1/alert-recipients/{pk}/", {"enabled": False}, format="json")
    assert patched.status_code == 200 and patched.json()["enabled"] is False
    assert Recipient.objects.get(pk=pk).conditions == ["host_lost", "vm_restart_failed"]
    assert admin_api.delete(f"/api/v1/alert-recipients/{pk}/").status_code == 204
    everything = admin_api.post("/api/v1/alert-recipients/", {"email": "all@example.org"}, format="json").json()
    assert "plan_overcommitted" in everything["conditions"] and "test" not in everything["conditions"]


def test_send_test_alert_proves_the_mail_path_through_a_real_worker(admin_api, console_env, start_proc,
                                                                   smtp_server):
    start_proc("worker", console_env)
    Recipient.objects.create(email="ops@example.org")
    response = admin_api.post("/api/v1/alerts/test/", {}, format="json")
    assert response.status_code == 202 and response.json()["recipients"] == ["ops@example.org"]
    (mail,) = smtp_server.wait(kind="test", timeout=20)
    assert mail["To"] == "ops@example.org" and "[eAC] TEST" in mail["Subject"]
    assert "alice-admin" in mail.get_content()
    wait_for(lambda: Delivery.objects.filter(state="sent").count() == 1, message="the delivery marked sent")


def test_mail_is_retried_until_the_smtp_server_answers_and_sent_once(admin_api, console_env, start_proc):
    """SMTP down when the alert is raised: the task retries with backoff, the row stays pending, and
    the mail goes out once the server is up."""
    from aiosmtpd.controller import Controller

    port = free_port()
    env = dict(console_env, EMAIL_URL=f"smtp://127.0.0.1:{port}")
    start_proc("worker", env)
    Recipient.objects.create(email="ops@example.org")
    alert, _ = services.alert_raise(condition="host_lost", object_key="host:z", host_name="xcp-z",
                                    message="Host xcp-z is lost.")
    delivery = wait_for(lambda: Delivery.objects.filter(alert=alert, attempts__gte=1, state="pending").first(),
                        timeout=20, message="a failed attempt")
    assert "Connection refused" in delivery.last_error or "Errno" in delivery.last_error
    box = Mailbox(port=port)
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        (mail,) = box.wait(condition="host_lost", kind="raised", timeout=30)
        assert "xcp-z" in mail["Subject"]
        sent = wait_for(lambda: Delivery.objects.filter(pk=delivery.pk, state="sent").first(), timeout=10,
                        message="the delivery marked sent")
        assert sent.attempts >= 2
        services.delivery_sweep()  # nothing pending: nothing resent
        import time

        time.sleep(1.5)
        assert len(box.messages) == 1
    finally:
        controller.stop()
