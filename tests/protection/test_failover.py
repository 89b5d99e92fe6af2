"""A host with a Level 1 VM crashes: XAPI HA restarts the VM, the console records it and mails it.

Real parts only: xapisim, the watcher, a Celery worker and beat on Redis, PostgreSQL, and an SMTP
server on loopback receiving the mail.
"""
from __future__ import annotations

import time

from alerts.models import Alert, Recipient
from inventory.models import VM, Host
from protection.models import FailoverEvent, Protection
from tests.support import agile_running_vm, db_activity, dump_logs, register_pool, shared_sr, wait_for, wait_run


def test_host_crash_restarts_level1_vm_elsewhere_records_failover_and_mails_once_then_clears(
    xapisim, admin_api, console_env, start_proc, smtp_server
):
    pool = register_pool(xapisim)
    Recipient.objects.create(email="ops@example.org", name="Ops")
    procs = [start_proc("worker", console_env), start_proc("beat", console_env), start_proc("watcher", console_env)]
    vm = agile_running_vm(pool)
    host = vm.resident_on
    response = admin_api.post("/api/v1/protections/", {
        "vm": vm.pk, "level": 1,
        "settings": {"heartbeat_sr": shared_sr(pool).uuid, "failures_to_tolerate": 1},
    }, format="json")
    assert response.status_code == 202, response.content
    run = wait_run(response.json()["id"])
    assert run.state == "succeeded", (run.error_message, dump_logs(*procs))
    # The watcher mirrors what the workflow did.
    wait_for(lambda: VM.objects.filter(pk=vm.pk, ha_restart_priority="restart").exists(), timeout=20,
             message="the VM's restart priority in the inventory")

    xapisim.control("POST", f"/sim/hosts/{host.name_label}/crash")

    event = wait_for(
        lambda: FailoverEvent.objects.filter(vm_uuid=vm.uuid, state="restarted").first(), timeout=40,
        interval=0.2, message=lambda: (
            f"the failover event of {vm.name_label} (its events: "
            f"{list(FailoverEvent.objects.filter(vm_uuid=vm.uuid).values_list('state', flat=True))}; in the mirror: "
            f"{VM.objects.filter(pk=vm.pk).values('power_state', 'resident_on__name_label').first()})\n"
            f"{dump_logs(*procs)}\n{db_activity()}"
        ),
    )
    vm.refresh_from_db()
    assert vm.power_state == "Running" and vm.resident_on_id not in (None, host.pk)
    assert event.from_host_id == host.pk and event.from_host_name == host.name_label
    assert event.to_host_id == vm.resident_on_id
    assert event.detected_at <= event.restarted_at and event.downtime_seconds >= 0
    wait_for(lambda: Protection.objects.get(vm=vm).status in ("protected", "degraded"), timeout=10,
             message="the protection back to protected or degraded")

    host_mail = smtp_server.wait(condition="host_lost", kind="raised", timeout=30)[0]
    vm_mail = smtp_server.wait(condition="vm_restarted", kind="raised", timeout=30)[0]
    assert host.name_label in host_mail["Subject"] and pool.name_label in host_mail["Subject"]
    body = vm_mail.get_payload(decode=True).decode()
    assert vm.name_label in body and host.name_label in body and "Downtime:" in body
    assert f"running on {host.name_label} -> running on {event.to_host_name}" in body
    time.sleep(3)  # more sweeps and watcher batches pass: still one mail each
    assert len(smtp_server.matching(condition="host_lost", kind="raised")) == 1
    assert len(smtp_server.matching(condition="vm_restarted", kind="raised")) == 1
    assert Alert.objects.filter(condition="host_lost", state="open").count() == 1

    xapisim.control("POST", f"/sim/hosts/{host.name_label}/power-on")
    wait_for(lambda: Host.objects.filter(pk=host.pk, live=True).exists(), timeout=30,
             message="the host live again")
    smtp_server.wait(condition="host_lost", kind="cleared", timeout=30)
    smtp_server.wait(condition="vm_restarted", kind="cleared", timeout=30)
    time.sleep(2)
    assert len(smtp_server.matching(condition="host_lost", kind="cleared")) == 1
    assert len(smtp_server.matching(condition="vm_restarted", kind="cleared")) == 1
    assert not Alert.objects.filter(condition__in=["host_lost", "vm_restarted"], state="open").exists()
