"""A worker killed in the middle of a workflow: another worker resumes the run where it stopped."""
from __future__ import annotations

from django.utils import timezone

from inventory.models import Host
from protection.engine import workflow_run_execute
from protection.models import Protection, WorkflowRun, WorkflowStep
from protection.tasks import protection_sweep
from tests.support import agile_running_vm, dump_logs, register_pool, shared_sr, wait_for, wait_run, xapi_login


def test_worker_killed_mid_step_resumes_on_another_worker_and_no_finished_step_runs_again(
    xapisim, admin_api, console_env, start_proc
):
    pool = register_pool(xapisim)
    master = Host.objects.get(pool=pool, is_master=True)
    first = start_proc("worker", console_env)
    vm = agile_running_vm(pool)
    # Every XAPI answer takes 0.4 s: the worker can be caught in the middle of a step.
    xapisim.control("POST", f"/sim/hosts/{master.name_label}/slow", {"delay_ms": 400})
    response = admin_api.post("/api/v1/protections/", {
        "vm": vm.pk, "level": 1, "settings": {"order": 5, "heartbeat_sr": shared_sr(pool).uuid},
    }, format="json")
    assert response.status_code == 202, response.content
    run_id = response.json()["id"]
    # Kill the worker once the step has written down what the VM had, before it finishes.
    step = wait_for(
        lambda: WorkflowStep.objects.filter(run_id=run_id, name="apply_settings", state="running",
                                            result__has_key="previous").first(),
        timeout=60, interval=0.05, message=lambda: f"apply_settings half done\n{dump_logs(first)}",
    )
    first.kill()
    xapisim.control("POST", f"/sim/hosts/{master.name_label}/slow", {"delay_ms": 0})
    run = WorkflowRun.objects.get(pk=run_id)
    assert run.state == "running" and step.attempts == 1

    # Nothing happens until the dead worker's lease lapses; then the sweeper hands the run over. (Checked
    # before the second worker starts: its start-up may take longer than the test's 3 s lease.)
    assert protection_sweep()["resumed"] == 0
    second = start_proc("worker", console_env)
    wait_for(lambda: WorkflowRun.objects.get(pk=run_id).lease_until < timezone.now(), timeout=10,
             message="the lease to lapse")
    assert protection_sweep()["resumed"] == 1
    run = wait_run(run_id)
    assert run.state == "succeeded", (run.error_message, dump_logs(first, second))
    assert run.claims == 2
    attempts = dict(run.steps.values_list("name", "attempts"))
    assert attempts == {"check_agile": 1, "check_plan": 1, "enable_ha": 1, "apply_settings": 2, "verify": 1}
    # What the VM had before is what the first attempt read, not what it had set before dying.
    protection = Protection.objects.get(vm=vm)
    assert protection.status == "protected"
    assert protection.previous_settings == {"ha_restart_priority": "", "order": 0, "start_delay": 0}
    session = xapi_login(xapisim.url)
    ref = session.xenapi.VM.get_by_uuid(vm.uuid)
    assert session.xenapi.VM.get_ha_restart_priority(ref) == "restart"
    assert session.xenapi.VM.get_order(ref) == "5"
    session.xenapi.session.logout()
    # A late copy of the task (the broker redelivering the dead worker's message) finds nothing to do.
    assert workflow_run_execute(run_id=run_id, worker="late-redelivery") == "not-claimed"


def test_a_run_that_keeps_killing_its_worker_fails_after_the_attempt_cap(admin_user, transactional_db, settings):
    from inventory.models import VM
    from protection import engine, services
    from tests.inventory.factories import make_host, make_pool

    pool = make_pool()
    host = make_host(pool)
    vm = VM.objects.create(pool=pool, uuid="11111111-2222-3333-4444-555555555555", ref="OpaqueRef:vm",
                           name_label="stubborn", power_state="Running", resident_on=host)
    run = services.protection_start(vm=vm, level=1, settings={}, requested_by=admin_user, preflight=False)
    settings.EAC_WORKFLOW_MAX_CLAIMS = 2
    # Two workers took it and died (their leases lapsed).
    WorkflowRun.objects.filter(pk=run.pk).update(state="running", claims=2, lease_until=timezone.now())
    assert engine.workflow_run_execute(run_id=run.pk, worker="third") == "failed"
    run.refresh_from_db()
    assert run.state == "failed" and run.error_code == "TOO_MANY_ATTEMPTS" and "Gave up after 2" in run.error_message
    assert Protection.objects.get(vm=vm).status == "failed"
