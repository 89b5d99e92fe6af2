"""The console survives its own parts failing: Redis and PostgreSQL restarted under it, the watcher killed in
the middle of a batch, two watchers started on one pool.

Real services throughout: the console's own processes (daphne, a Celery worker and beat, ``manage.py
watch_pools``) as subprocesses, xapisim, an SMTP server on loopback, and a Redis or a PostgreSQL of the test's
own whenever the test stops one (the machine's shared servers are never touched). The mail tests run the
delivery sweep every second (``EAC_MAIL_SWEEP_INTERVAL``) and let it resend a mail no task took after a second.
"""
from __future__ import annotations

import re
import socket
import time

import pytest
from django.conf import settings
from rest_framework.authtoken.models import Token

from alerts.models import Alert, Delivery, Recipient
from inventory.choices import ConnectionState
from inventory.models import VM, Pool
from protection.models import WorkflowRun, WorkflowStep
from tests.browser_support import Server
from tests.channels_support import session_cookie
from tests.restart_support import (
    PostgresCluster,
    PrivateDatabase,
    RedisServer,
    api_post,
    copy_schema,
    live_socket,
    lock_waiters,
    manage_shell,
    mirror_matches,
    pool_lock_holders,
    table_held,
    together,
    writing_backends,
)
from tests.support import dump_logs, register_pool, start_sim, wait_for, xapi_login

pytestmark = pytest.mark.django_db(transaction=True)

# How long a test waits for the console to catch up: generous, for a loaded machine.
PATIENCE = 30
FAST_SWEEPS = {"EAC_MAIL_SWEEP_INTERVAL": "1", "EAC_MAIL_RESEND_AFTER": "1"}


@pytest.fixture
def console(start_proc, tmp_path):
    """``console(env, *kinds)``: the console's processes of those kinds ("web" is daphne, the others are
    ``start_proc``'s), started at once; at the end of the test they are all stopped at once too (each takes a
    second or two)."""
    started = []

    def start_one(env: dict[str, str], kind: str):
        if kind != "web":
            proc = start_proc(kind, env)
            started.append(proc)
            return proc
        server = Server(settings.STATIC_ROOT, env)
        server.proc.log = tmp_path / "daphne.log"
        started.append(server.proc)
        return server.start()

    yield lambda env, *kinds: together(*(lambda kind=kind: start_one(env, kind) for kind in kinds))
    together(*(proc.stop for proc in started))


@pytest.fixture
def private_redis(tmp_path):
    server = RedisServer(tmp_path / "redis.log").start()
    yield server
    server.stop()


@pytest.fixture
def private_pg(tmp_path):
    """A PostgreSQL cluster of the test's own with the console's schema, and reads of its database."""
    cluster = PostgresCluster(tmp_path / "postgres.log").init()
    db = PrivateDatabase(cluster)
    try:
        copy_schema(cluster)
        yield cluster, db
    finally:
        db.close()
        cluster.destroy()


def row_power(text: str, uuid: str) -> str | None:
    """The power label of VM ``uuid``'s table row in a pushed fragment, if the fragment has the row."""
    match = re.search(rf'<tr id="row-vm-{uuid}".*?<td class="c-power">.*?<span>([^<]+)</span></span>', text, re.S)
    return match.group(1) if match else None


def vm_call(sim, method: str, name: str):
    session = xapi_login(sim.url)
    try:
        vm = session.xenapi.VM.get_by_name_label(name)[0]
        getattr(session.xenapi.VM, method)(vm)
    finally:
        session.xenapi.session.logout()


def following(watcher, since: int = 0) -> bool:
    """The watcher (re)did its full sync: it follows the pool's events from then on."""
    return "full sync from" in watcher.output()[since:]


def after_sweeps(worker, count: int) -> None:
    """Wait until the worker ran ``count`` more delivery sweeps: time for a mail sent twice to show."""
    done = re.compile(r"delivery_sweep\[[^]]+\] succeeded")
    seen = len(done.findall(worker.output()))
    wait_for(lambda: len(done.findall(worker.output())) >= seen + count, timeout=PATIENCE,
             message=f"{count} more delivery sweeps")  # fmt: skip


# -- Redis restarted -------------------------------------------------------------------------------------


def test_redis_restarted_sockets_reconnect_and_resync_celery_reconnects_and_alert_mail_goes_out_once(
    xapisim, admin_user, console_env, console, smtp_server, private_redis
):
    # Every process on the private Redis: channel layer, Celery broker, cache.
    env = dict(console_env, REDIS_URL=private_redis.url, **FAST_SWEEPS)
    pool = register_pool(xapisim)
    Recipient.objects.create(email="ops@example.org", conditions=["host_lost"])
    token = Token.objects.create(user=admin_user).key
    server, worker, beat, watcher = console(env, "web", "worker", "beat", "watcher")
    procs = (server.proc, worker, beat, watcher)
    wait_for(lambda: following(watcher), timeout=PATIENCE, message="the watcher's full sync")
    cookie = session_cookie(admin_user)[1].decode()
    before, after = (VM.objects.get(pool=pool, name_label=name) for name in ("web-02", "web-03"))

    # A page's socket gets live changes.
    first = live_socket(server.url, cookie, timeout=PATIENCE)
    first.send({"view": "vms", "rows": [before.uuid], "rendered_at": time.time()})
    vm_call(xapisim, "hard_shutdown", "web-02")
    first.receive_until(lambda text: row_power(text, before.uuid) == "Halted", timeout=PATIENCE)
    rendered_at = time.time()

    private_redis.stop()
    # The socket is cut (its consumer lost the channel layer): the page's script reconnects.
    wait_for(first.closed.done, timeout=PATIENCE, message="the socket cut")
    # A host is lost meanwhile: the watcher writes it, protection raises the alert and writes its mail's row,
    # but the mail's task cannot be queued.
    xapisim.control("POST", "/sim/hosts/xcp-host-4/crash")
    raised = wait_for(lambda: Delivery.objects.filter(alert__condition="host_lost", kind="raised").first(),
                      timeout=PATIENCE,
                      message=lambda: f"the alert and its mail's row\n{dump_logs(*procs)}")  # fmt: skip
    wait_for(lambda: f"alert mail {raised.pk} to ops@example.org: not queued" in watcher.output(), timeout=PATIENCE,
             message=lambda: f"the mail's task refused\n{dump_logs(watcher)}")  # fmt: skip
    assert Delivery.objects.get(pk=raised.pk).state == "pending"
    private_redis.start()

    # The page reconnects: its socket is accepted again and, the pool having changed since the page was
    # rendered, told to resync. The watcher's next change reaches it.
    second = live_socket(server.url, cookie, timeout=PATIENCE)
    second.send({"view": "vms", "rows": [after.uuid], "rendered_at": rendered_at})
    second.receive_until(lambda text: 'data-action="resync"' in text, timeout=PATIENCE)
    vm_call(xapisim, "hard_shutdown", "web-03")
    second.receive_until(lambda text: row_power(text, after.uuid) == "Halted", timeout=PATIENCE)

    # Celery reconnected: a task sent after the restart (the web's test mail) runs.
    status, body = api_post(server.url, "/api/v1/alerts/test/", token, {"email": "ops@example.org"})
    assert status == 202, body
    smtp_server.wait(kind="test", timeout=PATIENCE)
    # The mail whose task was never queued: sent by the sweep, once.
    (mail,) = smtp_server.wait(condition="host_lost", kind="raised", timeout=PATIENCE)
    assert "xcp-host-4" in mail["Subject"]
    wait_for(lambda: Delivery.objects.get(pk=raised.pk).state == "sent", timeout=PATIENCE, message="sent")
    after_sweeps(worker, 2)
    assert len(smtp_server.matching(condition="host_lost")) == 1
    assert Alert.objects.filter(condition="host_lost").count() == 1
    first.close()
    second.close()


# -- PostgreSQL restarted ----------------------------------------------------------------------------------

SETUP = """
from alerts.models import Recipient
from inventory.services import pool_create
from tests.support import make_user
make_user("alice-admin", "Administrators")
Recipient.objects.create(email="ops@example.org")
print(pool_create(name="Demo pool", url="{url}", username="root", password="demo", verify_tls=False).pk)
"""

# Protect a running VM that is not on xcp-host-4 (the host the test crashes).
PROTECT = """
from django.contrib.auth.models import User
from inventory.models import VM, Pool
from protection.services import protection_start
from tests.support import agile_running_vm, shared_sr
pool = Pool.objects.get(pk={pool})
on_host_4 = VM.objects.filter(resident_on__name_label="xcp-host-4").values_list("pk", flat=True)
run = protection_start(vm=agile_running_vm(pool, exclude=on_host_4), level=1,
                       settings={{"order": 5, "heartbeat_sr": shared_sr(pool).uuid}},
                       requested_by=User.objects.get(username="alice-admin"))
print(run.pk)
"""


def test_postgresql_restarted_the_watcher_resyncs_a_workflow_resumes_and_no_alert_is_lost_or_sent_twice(
    xapisim, console_env, console, smtp_server, private_pg
):
    cluster, db = private_pg
    env = dict(console_env, DATABASE_URL=cluster.url, **FAST_SWEEPS)
    pool_id = int(manage_shell(env, SETUP.format(url=xapisim.url)))
    worker, beat, watcher = procs = console(env, "worker", "beat", "watcher")
    wait_for(lambda: following(watcher), timeout=PATIENCE, message="the watcher's full sync")

    # A host lost before the restart: raised and mailed.
    xapisim.control("POST", "/sim/hosts/xcp-host-4/crash")
    smtp_server.wait(condition="host_lost", kind="raised", timeout=PATIENCE)
    # A protection in flight (every XAPI answer slowed down, so that it is caught in the middle of a step).
    xapisim.control("POST", "/sim/hosts/xcp-host-1/slow", {"delay_ms": 300})
    run_id = int(manage_shell(env, PROTECT.format(pool=pool_id)))
    wait_for(lambda: db.read(WorkflowStep.objects.filter(run_id=run_id, state="running", position__gte=1).exists),
             timeout=PATIENCE,
             message=lambda: f"the workflow in the middle of a step\n{dump_logs(*procs)}")  # fmt: skip

    cluster.stop()
    # While the database is down: a VM shut down, a halted one destroyed, the lost host back.
    vm_call(xapisim, "hard_shutdown", "build-agent-1")
    gone = next(vm["uuid"] for vm in xapisim.state()["vms"] if vm["name"] == "dev-sandbox")
    vm_call(xapisim, "destroy", "dev-sandbox")
    xapisim.control("POST", "/sim/hosts/xcp-host-4/power-on")
    xapisim.control("POST", "/sim/hosts/xcp-host-1/slow", {"delay_ms": 0})
    cluster.start()

    # The workflow resumes (the sweeper hands it over once the lease of the cut attempt lapsed) and succeeds.
    run = wait_for(lambda: db.read(WorkflowRun.objects.filter(pk=run_id, state__in=("succeeded", "failed")).first),
                   timeout=60, interval=0.2, message=lambda: f"the run to finish\n{dump_logs(*procs)}")  # fmt: skip
    assert run.state == "succeeded", (run.error_message, dump_logs(*procs))
    assert run.claims == 2
    # The watcher resynced: the mirror is the pool's, without the destroyed VM.
    wait_for(lambda: db.read(mirror_matches, xapisim, pool_id), timeout=PATIENCE, interval=0.5,
             message=lambda: f"the mirror equal to the pool\n{dump_logs(watcher)}")  # fmt: skip
    vms = VM.objects.filter(pool_id=pool_id)
    assert db.read(vms.filter(uuid=gone).count) == 0
    assert db.read(lambda: vms.get(name_label="build-agent-1").power_state) == "Halted"
    # The host came back while the database was down: the alert clears, mailed once; the raise is not mailed
    # again by the resync.
    smtp_server.wait(condition="host_lost", kind="cleared", timeout=PATIENCE)
    wait_for(lambda: db.read(lambda: not Delivery.objects.exclude(state="sent").exists()), timeout=PATIENCE,
             message="every mail marked sent")
    after_sweeps(worker, 2)
    assert len(smtp_server.matching(condition="host_lost", kind="raised")) == 1
    assert len(smtp_server.matching(condition="host_lost", kind="cleared")) == 1
    assert db.read(Alert.objects.filter(condition="host_lost").count) == 1
    assert db.read(Delivery.objects.count) == len(smtp_server.messages)


# -- the watcher killed --------------------------------------------------------------------------------


def vm_states_match(sim, pool_id: int) -> bool:
    """Every VM's power state and host are xapisim's."""
    mirrored = {uuid: (state, host) for uuid, state, host in
                VM.objects.filter(pool_id=pool_id).values_list("uuid", "power_state", "resident_on__name_label")}
    return mirrored == {vm["uuid"]: (vm["power_state"], vm["host"]) for vm in sim.state()["vms"]}


def test_watcher_killed_in_the_middle_of_a_batch_and_of_its_full_sync_converges_without_duplicate_rows(
    console_env, console
):
    # A pool big enough that losing two hosts is a batch of hundreds of objects, and a full sync takes a while.
    sim = start_sim("generated", hosts=6, vms=300)
    try:
        pool = register_pool(sim, name="Big pool")
        (watcher,) = console(console_env, "watcher")
        wait_for(lambda: following(watcher), timeout=PATIENCE, message="the watcher's full sync")
        hosts = [h["name"] for h in sim.state()["hosts"] if not h["master"]][:2]
        # Killed while it writes the hosts' loss (their VMs halted, disks and interfaces detached): the VM table
        # held, the batch waits in the middle of its transaction until the kill, whatever the machine's load (a
        # kill as soon as a write transaction was seen came after its commit once, under CI's load).
        with table_held(VM):
            for host in hosts:
                sim.control("POST", f"/sim/hosts/{host}/crash")
            wait_for(lambda: not any(h["live"] for h in sim.state()["hosts"] if h["name"] in hosts),
                     timeout=PATIENCE, interval=0.01, message="the hosts declared dead")  # fmt: skip
            wait_for(lock_waiters, timeout=PATIENCE, interval=0.005, message="the watcher writing the batch")
            watcher.kill()
        # Negative control: the batch was cut before its commit, the mirror still has the hosts' VMs running.
        assert not vm_states_match(sim, pool.pk)

        # Started again (once the cut transaction is gone), and killed in the middle of its full sync.
        wait_for(lambda: not writing_backends(), timeout=PATIENCE, message="the cut transaction rolled back")
        log_at = len(watcher.output())
        watcher.start()
        wait_for(writing_backends, timeout=PATIENCE, interval=0.005, message="the watcher writing its full sync")
        watcher.kill()
        assert not following(watcher, log_at)

        wait_for(lambda: not writing_backends(), timeout=PATIENCE, message="the cut transaction rolled back")
        # Started once more: the mirror converges, one row per object (the rows of each class are the uuids of
        # get_all_records, duplicates included), every VM where xapisim has it.
        watcher.start()
        wait_for(lambda: mirror_matches(sim, pool.pk) and vm_states_match(sim, pool.pk), timeout=PATIENCE,
                 interval=0.5, message=lambda: f"the mirror equal to the pool\n{dump_logs(watcher)}")  # fmt: skip
        running = next(vm for vm in sim.state()["vms"]
                       if vm["power_state"] == "Running" and not vm["is_control_domain"])  # fmt: skip
        vm_call(sim, "hard_shutdown", running["name"])
        wait_for(lambda: VM.objects.get(pool=pool, uuid=running["uuid"]).power_state == "Halted",
                 timeout=PATIENCE, message="the next change applied")  # fmt: skip
    finally:
        sim.stop()


# -- two watchers on one pool ------------------------------------------------------------------------------


def test_a_second_watcher_on_the_same_pool_waits_and_takes_over_when_the_first_dies(xapisim, console_env, console):
    pool = register_pool(xapisim)
    (first,) = console(console_env, "watcher")
    wait_for(lambda: following(first), timeout=PATIENCE, message="the first watcher's full sync")
    (second,) = console(console_env, "watcher")
    wait_for(lambda: "another watcher holds it" in second.output(), timeout=PATIENCE,
             message=lambda: f"the second watcher waiting\n{dump_logs(first, second)}")  # fmt: skip
    # One lock, the first's; the second names its holder, and neither syncs nor follows the pool.
    holder = f"eac-watcher {socket.gethostname()}:{first.pid}"
    assert pool_lock_holders(pool.pk) == [holder]
    assert holder in second.output()
    vm_call(xapisim, "hard_shutdown", "web-02")
    wait_for(lambda: VM.objects.get(pool=pool, name_label="web-02").power_state == "Halted", timeout=PATIENCE,
             message="the first watcher applying a change")  # fmt: skip
    assert "watching" not in second.output() and not following(second)

    first.kill()
    wait_for(lambda: following(second), timeout=PATIENCE,
             message=lambda: f"the second taking over\n{dump_logs(second)}")
    assert "taking over" in second.output()
    assert pool_lock_holders(pool.pk) == [f"eac-watcher {socket.gethostname()}:{second.pid}"]
    vm_call(xapisim, "hard_shutdown", "web-03")
    wait_for(lambda: VM.objects.get(pool=pool, name_label="web-03").power_state == "Halted", timeout=PATIENCE,
             message="the second watcher applying a change")  # fmt: skip
    assert Pool.objects.get(pk=pool.pk).connection_state == ConnectionState.CONNECTED
