"""Protect and unprotect through the API, run by a real Celery worker against xapisim."""
from __future__ import annotations

from alerts.models import Alert
from eac.audit import AuditEntry
from inventory.models import VM
from protection.models import Protection, WorkflowRun
from tests.support import (
    agile_running_vm,
    dump_logs,
    protection_states,
    register_pool,
    shared_sr,
    wait_run,
    xapi_login,
)


def local_disk_vm(pool) -> VM:
    return VM.objects.filter(pool=pool, is_a_template=False, is_control_domain=False,
                             vbds__vdi__sr__shared=False).distinct().first()


def test_protect_level1_through_the_api_sets_ha_in_the_pool_and_unprotect_restores_it(
    xapisim, admin_api, console_env, start_proc
):
    pool = register_pool(xapisim)
    worker = start_proc("worker", console_env)
    vm = agile_running_vm(pool)
    response = admin_api.post("/api/v1/protections/", {
        "vm": vm.uuid, "level": 1,
        "settings": {"restart_priority": "restart", "order": 3, "start_delay": 7,
                     "heartbeat_sr": shared_sr(pool).uuid, "failures_to_tolerate": 1},
    }, format="json", REMOTE_ADDR="192.0.2.10")
    assert response.status_code == 202, response.content
    body = response.json()
    assert [s["name"] for s in body["steps"]] == ["check_agile", "check_plan", "enable_ha", "apply_settings",
                                                  "verify"]
    run = wait_run(body["id"])
    assert run.state == "succeeded", (run.error_message, dump_logs(worker))
    assert all(step.state == "done" and step.attempts == 1 for step in run.steps.all())

    detail = admin_api.get(f"/api/v1/workflow-runs/{run.pk}/").json()
    assert detail["progress"] == 1.0 and detail["state"] == "succeeded"

    session = xapi_login(xapisim.url)
    ref = session.xenapi.VM.get_by_uuid(vm.uuid)
    assert session.xenapi.VM.get_ha_restart_priority(ref) == "restart"
    assert session.xenapi.VM.get_order(ref) == "3"
    assert session.xenapi.VM.get_start_delay(ref) == "7"
    pool_ref = session.xenapi.pool.get_all()[0]
    assert session.xenapi.pool.get_ha_enabled(pool_ref) is True
    assert session.xenapi.pool.get_ha_host_failures_to_tolerate(pool_ref) == "1"

    protection = Protection.objects.get(vm=vm)
    assert protection.status == "protected"
    assert protection.ha_enabled_by_console
    assert protection.previous_settings == {"ha_restart_priority": "", "order": 0, "start_delay": 0}
    entry = AuditEntry.objects.get(action="protect", vm=vm)
    assert entry.username == "alice-admin" and entry.remote_addr == "192.0.2.10" and entry.via == "api"

    response = admin_api.delete(f"/api/v1/protections/{protection.pk}/")
    assert response.status_code == 202, response.content
    run = wait_run(response.json()["id"])
    assert run.state == "succeeded", (run.error_message, dump_logs(worker))
    assert session.xenapi.VM.get_ha_restart_priority(ref) == ""
    assert session.xenapi.VM.get_order(ref) == "0"
    assert session.xenapi.VM.get_start_delay(ref) == "0"
    # HA was turned on for this VM only: unprotecting turned it off again.
    assert session.xenapi.pool.get_ha_enabled(pool_ref) is False
    assert not Protection.objects.filter(vm=vm).exists()
    assert AuditEntry.objects.filter(action="unprotected", vm=vm).exists()
    session.xenapi.session.logout()


def test_a_vm_on_local_storage_fails_its_agility_step_with_the_sr_named_in_words(
    xapisim, admin_user, transactional_db
):
    from protection import engine, services

    pool = register_pool(xapisim)
    vm = local_disk_vm(pool)
    assert vm is not None, "the demo pool has a VM on local storage"
    run = services.protection_start(vm=vm, level=1, settings={"heartbeat_sr": shared_sr(pool).uuid},
                                    requested_by=admin_user, preflight=False)
    # The engine itself, in this process: what is tested here is the step and its message.
    assert engine.workflow_run_execute(run_id=run.pk, worker="test") == "failed"
    run.refresh_from_db()
    step = run.steps.get(name="check_agile")
    assert step.state == "failed" and step.error_code == "HA_CONSTRAINT_VIOLATION_SR_NOT_SHARED"
    local = vm.vbds.filter(vdi__sr__shared=False).first().vdi.sr
    assert f"“{local.name_label}”" in step.message and "not shared" in step.message
    assert run.error_code == "HA_CONSTRAINT_VIOLATION_SR_NOT_SHARED"
    assert run.steps.filter(state="pending").count() == 4  # nothing after the failure ran
    protection = Protection.objects.get(vm=vm)
    assert protection.status == "failed" and "not shared" in protection.status_reason
    alert = Alert.objects.get(condition="workflow_failed", object_key=f"vm:{vm.uuid}")
    assert alert.state == "open" and vm.name_label in alert.message
    # A second claim of a finished run does nothing.
    assert engine.workflow_run_execute(run_id=run.pk, worker="other") == "not-claimed"
    assert WorkflowRun.objects.get(pk=run.pk).claims == 1
    # Unprotecting undoes exactly what protecting did: here nothing, so the VM's own order stays.
    session = xapi_login(xapisim.url)
    ref = session.xenapi.VM.get_by_uuid(vm.uuid)
    session.xenapi.VM.set_order(ref, "4")
    stop = services.protection_stop(protection=protection, requested_by=admin_user)
    assert engine.workflow_run_execute(run_id=stop.pk, worker="test") == "succeeded"
    assert session.xenapi.VM.get_order(ref) == "4"
    assert not Protection.objects.filter(vm=vm).exists()
    assert Alert.objects.get(pk=alert.pk).state == "cleared"  # the workflow_failed alert, cleared once
    session.xenapi.session.logout()


def test_transient_xapi_errors_are_retried_with_backoff_until_the_new_master_answers(
    xapisim, admin_user, transactional_db, settings
):
    """The master dies just as the run starts: the first step meets an unreachable pool, waits, retries,
    and goes on once another host has become master."""
    from inventory.models import Host
    from protection import engine, services

    settings.EAC_WORKFLOW_RETRY_DELAY = 0.5
    settings.EAC_WORKFLOW_STEP_RETRIES = 8
    pool = register_pool(xapisim)
    vm = agile_running_vm(pool)
    run = services.protection_start(vm=vm, level=1, settings={"heartbeat_sr": shared_sr(pool).uuid},
                                    requested_by=admin_user)
    master = Host.objects.get(pool=pool, is_master=True)
    xapisim.control("POST", f"/sim/hosts/{master.name_label}/crash")
    assert engine.workflow_run_execute(run_id=run.pk, worker="test") == "succeeded"
    first = run.steps.get(name="check_agile")
    assert first.state == "done" and first.attempts >= 2
    assert all(s.attempts == 1 for s in run.steps.exclude(name="check_agile"))


def test_setting_the_failures_to_tolerate_goes_to_the_pool_or_is_refused_with_the_reason(
    xapisim, admin_user, transactional_db
):
    import pytest

    from inventory.watcher import sync_once
    from protection import engine, selectors, services

    pool = register_pool(xapisim)
    session = xapi_login(xapisim.url)
    pool_ref = session.xenapi.pool.get_all()[0]
    session.xenapi.pool.enable_ha([session.xenapi.SR.get_by_uuid(shared_sr(pool).uuid)], {})
    protected = []
    for vm in VM.objects.filter(pool=pool, power_state="Running", is_control_domain=False):
        if protection_states([vm.pk])[vm.pk][1] == "candidate":
            session.xenapi.VM.set_ha_restart_priority(session.xenapi.VM.get_by_uuid(vm.uuid), "restart")
            protected.append(vm.name_label)
    sync_once(pool)
    pool.refresh_from_db()
    best = selectors.pool_planner(pool).max_failures()
    assert 0 < best < 3, f"the demo pool with {len(protected)} protected VMs tolerates {best}"
    # From the inventory alone, the console's planner agrees with the pool's own answer.
    assert best == int(session.xenapi.pool.ha_compute_max_host_failures_to_tolerate())
    run = services.pool_failures_to_tolerate_set(pool=pool, failures_to_tolerate=best, requested_by=admin_user)
    assert engine.workflow_run_execute(run_id=run.pk, worker="test") == "succeeded"
    assert session.xenapi.pool.get_ha_host_failures_to_tolerate(pool_ref) == str(best)
    with pytest.raises(services.Conflict) as refused:
        services.pool_failures_to_tolerate_set(pool=pool, failures_to_tolerate=best + 1, requested_by=admin_user)
    reason = refused.value.reasons[0]
    assert f"at most {best} host failure" in reason and "cannot restart" in reason
    assert any(name in reason for name in protected)
    assert session.xenapi.pool.get_ha_host_failures_to_tolerate(pool_ref) == str(best)
    session.xenapi.session.logout()
