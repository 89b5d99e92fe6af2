"""The Level 2 fault table end to end with the console, on the live bed (``python -m xapisim --preset demo --live``):
the console's real watcher, Celery worker and beat, mail through aiosmtpd; ``vpn-gw`` (a live guest on xcp-host-4,
whose AM peer is xcp-host-3: neither is the pool's master) protected at Level 2 through the REST API, a client in the
bed's client namespace writing records to it (``Writer``: each acknowledged once on disk); then one fault per test,
and what the console shows (Protection status, components, alerts, mail) and what the client sees.

One bed, one watcher, worker, beat and SMTP server for the module (a live bed takes seconds to build); each test
protects the VM and unprotects it at its end. Conditions are waited on with deadlines; the figures of interest
(fault → console state, crash → serving) are printed (``-s`` shows them), not asserted. Root only.
"""
from __future__ import annotations

import contextlib
import sys
import time
import uuid
from datetime import timedelta

import pytest
from aiosmtpd.controller import Controller
from django.test import override_settings
from django.utils import timezone
from rest_framework.test import APIClient

from alerts.choices import AlertState, Condition
from alerts.keys import component_key
from alerts.models import Alert
from console.details import host_detail
from console.nodes import tree_children, vm_node
from console.table import vm_table_queryset
from inventory.models import VM, Pool
from protection.am_client import AMClient
from protection.choices import ProtectionStatus
from protection.models import FailoverEvent, ProtectedDisk, Protection
from protection.workflows import SECONDARY_SUFFIX
from tests.protection.test_level2_live import pytestmark as pytestmark  # root, ip and nft
from tests.support import Mailbox, Proc, free_port, make_user, register_pool, subprocess_env, wait_for, wait_run
from tests.xapisim.level2_support import Writer, bed_state, connect, master_session
from tests.xapisim.test_live import Live, start_live

VM_NAME = "vpn-gw"  # a live guest on xcp-host-4; its AM's peer is xcp-host-3 (host 1 is the master)
HEALTH = {"EAC_AM_HEALTH_INTERVAL": "0.5", "EAC_AM_HEALTH_TIMEOUT": "2", "EAC_AM_POLL_INTERVAL": "0.2",
          "EAC_AM_SYNC_TIMEOUT": "240", "EAC_L2_FAILOVER_GRACE": "30"}


@contextlib.contextmanager
def _test_database(django_db_blocker):
    """The test database: pytest-django's when another test of the session asked for one, otherwise made here
    (pytest-django makes one only for tests marked django_db, and a mark would flush the module's rows after
    each test while the watcher and the worker use them)."""
    from django.db import connection
    from django.test.utils import setup_databases, teardown_databases

    with django_db_blocker.unblock():
        if connection.settings_dict["NAME"] == connection.creation._get_test_db_name():
            yield
            return
        config = setup_databases(verbosity=0, interactive=False, aliases={"default"})
        try:
            yield
        finally:
            teardown_databases(config, verbosity=0)


def _use_queue(name: str) -> None:
    from eac.celery import app

    app.conf.task_default_queue = name
    for attr in ("queues", "default_queue", "router"):
        app.amqp.__dict__.pop(attr, None)
    app.amqp._rtable = None


@pytest.fixture(scope="module")
def stack(tmp_path_factory, django_db_blocker, console_settings):
    """The live bed, the pool registered, an administrator and a mail recipient, and the console's processes:
    watcher, worker, beat and the AM follower."""
    from alerts.models import Recipient
    from eac.celery import app

    tmp = tmp_path_factory.mktemp("faults")
    box = Mailbox(port=free_port())
    smtp = Controller(box, hostname="127.0.0.1", port=box.port)
    smtp.start()
    old_queue = app.conf.task_default_queue
    queue = f"eactest-{uuid.uuid4().hex[:12]}"
    _use_queue(queue)
    cmd = start_live(tmp)
    procs: list[Proc] = []
    live = None
    with _test_database(django_db_blocker):
        try:
            live = Live(cmd)
            token_file = live.bed["hosts"][0]["am"]["token_file"]
            with override_settings(EAC_AM_TOKEN_FILE=token_file):
                pool = register_pool(cmd)
                admin = make_user("alice-admin", "Administrators")
                Recipient.objects.create(email="ops@example.org")
                env = subprocess_env(
                    CELERY_TASK_DEFAULT_QUEUE=queue, EMAIL_URL=box.url, EAC_WORKFLOW_LEASE="3",
                    EAC_WORKFLOW_RETRY_DELAY="0.2", EAC_MAIL_RETRY_DELAY="0.5", EAC_SWEEP_INTERVAL="1",
                    EAC_EVENT_TIMEOUT="5", LOG_LEVEL="INFO", EAC_AM_TOKEN_FILE=token_file, **console_settings)
                procs.append(Proc("watcher", [sys.executable, "manage.py", "watch_pools", "--poll", "1"], env=env,
                                  ready=None, log=tmp / "watcher.log").start())
                procs.append(Proc("worker", [sys.executable, "-m", "celery", "-A", "eac", "worker", "-Q", queue,
                                             "--pool=solo", "-n", f"{queue}@%h", "--without-gossip",
                                             "--without-mingle", "--without-heartbeat", "-l", "INFO"],
                                  env=env, ready="ready.", log=tmp / "worker.log").start())
                procs.append(Proc("beat", [sys.executable, "-m", "celery", "-A", "eac", "beat", "-l", "INFO", "-s",
                                           str(tmp / "beat.schedule"), "--scheduler",
                                           "celery.beat:PersistentScheduler"],
                                  env=env, ready="beat: Starting", log=tmp / "beat.log").start())
                procs.append(Proc("follower", [sys.executable, "manage.py", "follow_ams"], env=env,
                                  ready="follow_ams: following", log=tmp / "follower.log").start())
                yield {"cmd": cmd, "live": live, "pool": pool, "admin": admin, "mail": box, "procs": procs,
                       "tmp": tmp}
        finally:
            for proc in reversed(procs):
                proc.stop()
            if live is not None:
                with contextlib.suppress(Exception):
                    live.session.xenapi.session.logout()
            cmd.stop()
            smtp.stop()
            _use_queue(old_queue)
            from django.core.management import call_command

            call_command("flush", interactive=False, verbosity=0)


@pytest.fixture
def api(stack, django_db_blocker):
    """An administrator's REST client; the test may use the database (the module's, flushed at its end)."""
    with django_db_blocker.unblock():
        client = APIClient()
        client.force_authenticate(stack["admin"])
        yield client


def _logs(stack) -> str:
    return "\n".join(f"--- {p.name}\n{p.output()[-4000:]}" for p in stack["procs"])


def _get(pk: int) -> Protection:
    return Protection.objects.select_related("failed_over_to", "secondary_host").get(pk=pk)


def _states(protection: Protection) -> dict[str, str]:
    return {c["id"]: c["state"] for c in protection.components}


def _until(pk: int, test, timeout: float, message: str) -> Protection:
    try:
        return wait_for(lambda: (p := _get(pk)) and test(p) and p, timeout=timeout, interval=0.2, message=message)
    except AssertionError as exc:
        last = _get(pk)
        raise AssertionError(f"{exc}: the protection is {last.status} ({last.status_reason}); components "
                             f"{[(c['id'], c['state'], c['detail']) for c in last.components]}") from None


@pytest.fixture
def protected(stack, api):
    """VM_NAME protected at Level 2 through the API by the worker, polled protected, a Writer writing to it; at
    the end the writer stopped and the VM unprotected (the bed as the next test wants it)."""
    pool, live = stack["pool"], stack["live"]
    vm = VM.objects.get(pool=pool, name_label=VM_NAME)
    primary = vm.resident_on
    secondary = pool.hosts.get(uuid=primary.am_peer)
    assert not primary.is_master and not secondary.is_master
    response = api.post("/api/v1/protections/", {"vm": vm.uuid, "level": 2}, format="json")
    assert response.status_code == 202, response.content
    run = wait_run(response.json()["id"], timeout=240)
    assert run.state == "succeeded", "\n".join(
        f"{s.name}: {s.state} {s.error_code} {s.message}" for s in run.steps.order_by("position")) + _logs(stack)
    protection = Protection.objects.get(vm=vm)
    protection = _until(protection.pk, lambda p: p.status == ProtectionStatus.PROTECTED and p.components
                        and set(_states(p).values()) == {"ok"}, 60, "the beat's poll: every component ok")
    writer = Writer(live, live.ip(VM_NAME), identify=True)
    writer.start()
    wait_for(lambda: writer.count() >= 20, timeout=30, message="records acknowledged through the primary's AM")
    alerts_before = set(Alert.objects.values_list("pk", flat=True))
    yield {"vm": vm, "primary": primary, "secondary": secondary, "protection": protection, "writer": writer,
           "alerts_before": alerts_before}
    writer.stop()
    current = Protection.objects.filter(vm=vm).first()
    if current is not None and current.failed_over_to_id is None:  # after a failover unprotect is refused
        stop = api.delete(f"/api/v1/protections/{current.pk}/")
        assert stop.status_code == 202, stop.content
        done = wait_run(stop.json()["id"], timeout=120)
        assert done.state == "succeeded", "\n".join(
            f"{s.name}: {s.state} {s.error_code} {s.message}" for s in done.steps.order_by("position"))
        wait_for(lambda: not Protection.objects.filter(vm=vm).exists(), timeout=10, message="unprotected")


def _new_alerts(ctx, **filters):
    return Alert.objects.filter(**filters).exclude(pk__in=ctx["alerts_before"])


def _mails(stack, alert: Alert, kind: str) -> list:
    return [m for m in stack["mail"].matching(kind=kind) if m["X-eAC-Alert"] == str(alert.pk)]


def _all_acked_readable(live, ip: str, writer: Writer) -> dict:
    """The acknowledged records the guest now at ``ip`` does not give back (it should give back all)."""
    with writer._lock:
        acked = dict(writer.acked)
    conn = connect(live, ip)
    try:
        return {seq: rec for seq, rec in acked.items() if conn.ask(f"GET {seq}") != f"VAL {seq} {rec}"}
    finally:
        conn.close()


def test_a_cut_availability_link_is_redundancy_lost_once_and_cleared_once_and_the_client_sees_nothing(
        stack, protected):
    cmd, vm, primary = stack["cmd"], protected["vm"], protected["primary"]
    pk, writer = protected["protection"].pk, protected["writer"]
    connections = writer.connections
    cut_at = time.monotonic()
    cmd.control("POST", f"/sim/hosts/{primary.name_label}/links/a", {"up": False})
    try:
        cut = _until(pk, lambda p: _states(p).get("link:a") == "degraded", 30, "link A shown degraded")
        shown = time.monotonic() - cut_at
        assert cut.status == ProtectionStatus.DEGRADED and "link A" in cut.status_reason
        assert _states(cut)["link:b"] == "ok" and _states(cut)["peer"] == "degraded"
        key = component_key(vm, "link:a")
        alert = wait_for(lambda: _new_alerts(protected, condition=Condition.REDUNDANCY_LOST, object_key=key).first(),
                         timeout=10, message="the link's alert")
        assert alert.state == AlertState.OPEN and VM_NAME in alert.message
        raised = wait_for(lambda: _mails(stack, alert, "raised"), timeout=20, message="the link's alert mailed")
        mailed = time.monotonic() - cut_at
        before = writer.count()
        wait_for(lambda: writer.count() >= before + 20, timeout=20, message="writes on with one link")
    finally:
        cmd.control("POST", f"/sim/hosts/{primary.name_label}/links/a", {"up": True})
    back = _until(pk, lambda p: p.status == ProtectionStatus.PROTECTED, 60, "protected again with link A back")
    assert set(_states(back).values()) == {"ok"}
    link_alerts = _new_alerts(protected, condition=Condition.REDUNDANCY_LOST, object_key=key)
    assert link_alerts.count() == 1 and link_alerts.get().state == AlertState.CLEARED  # raised once, cleared once
    wait_for(lambda: _mails(stack, alert, "cleared"), timeout=20, message="the clearance mailed")
    assert len(_mails(stack, alert, "raised")) == len(raised) == 1 and len(_mails(stack, alert, "cleared")) == 1
    # The client saw nothing: no error, no reconnection.
    assert writer.errors == [] and writer.connections == connections
    print(f"\nlink A cut: shown degraded after {shown:.2f} s, alert mailed after {mailed:.2f} s; "
          f"{writer.count()} records, {writer.connections} connection(s)")


def test_both_links_cut_with_the_witness_reachable_keep_one_copy_serving_and_never_two(stack, protected):
    """Both availability links of the primary cut, the witness reachable by both: the primary's AM goes on
    alone (the witness outdates the peer), the secondary's is refused the disks: the copy stays paused, the
    client's connection carries on. Shown and alerted; with the links back, resync, then protected again."""
    cmd, live, vm, primary = stack["cmd"], stack["live"], protected["vm"], protected["primary"]
    secondary, pk, writer = protected["secondary"], protected["protection"].pk, protected["writer"]
    connections = writer.connections
    copy = live.api.VM.get_by_uuid(protected["protection"].secondary_vm_uuid)
    for link in ("a", "b"):
        cmd.control("POST", f"/sim/hosts/{primary.name_label}/links/{link}", {"up": False})
    try:
        lost = _until(pk, lambda p: _states(p).get("peer") == "failed" and _states(p).get("link:a") != "ok"
                      and _states(p).get("link:b") != "ok", 30, "the peer and both links shown lost")
        assert lost.status == ProtectionStatus.DEGRADED and lost.failed_over_to_id is None, lost.status_reason
        wait_for(lambda: _new_alerts(protected, condition=Condition.REDUNDANCY_LOST,
                                     object_key=component_key(vm, "peer")).exists(), timeout=10,
                 message="the peer's alert")
        before = writer.count()
        deadline = time.monotonic() + 5  # the witness's lease and grace, and more: the copy must stay paused
        while time.monotonic() < deadline or writer.count() < before + 50:
            assert live.api.VM.get_power_state(copy) == "Paused", "two running copies"
            assert live.running_guest(VM_NAME + SECONDARY_SUFFIX) is None, "a guest of the copy runs"
            assert time.monotonic() < deadline + 20, "the primary stopped acknowledging"
            time.sleep(0.2)
        with AMClient(secondary.am_url) as am:  # the console's own client and token (EAC_AM_TOKEN_FILE)
            roles = {d.resource: (am.resource_or_none(d.resource) or {}).get("role")
                     for d in ProtectedDisk.objects.filter(protection_id=pk)}
        assert roles and "Primary" not in roles.values(), roles
    finally:
        for link in ("a", "b"):
            cmd.control("POST", f"/sim/hosts/{primary.name_label}/links/{link}", {"up": True})
    back = _until(pk, lambda p: p.status == ProtectionStatus.PROTECTED, 120, "protected again with the links back")
    assert set(_states(back).values()) == {"ok"}, back.components
    assert writer.errors == [] and writer.connections == connections
    assert _all_acked_readable(live, live.ip(VM_NAME), writer) == {}
    assert not _new_alerts(protected, condition=Condition.FAILOVER_DONE).exists()


def test_a_crash_of_the_secondary_host_leaves_the_primary_running_degraded_until_it_is_back_and_resynced(
        stack, protected):
    cmd, live, vm, secondary = stack["cmd"], stack["live"], protected["vm"], protected["secondary"]
    primary, pk, writer = protected["primary"], protected["protection"].pk, protected["writer"]
    connections = writer.connections
    crashed_at = time.monotonic()
    cmd.control("POST", f"/sim/hosts/{secondary.name_label}/crash")
    try:
        lost = _until(pk, lambda p: _states(p).get("peer") == "failed", 30, "the peer shown lost")
        shown = time.monotonic() - crashed_at
        states = _states(lost)
        assert lost.status == ProtectionStatus.DEGRADED, lost.status_reason
        assert states[f"am@{secondary.uuid}"] == "unknown" and states[f"disk:0@{secondary.uuid}"] == "unknown"
        assert states[f"disk:0@{primary.uuid}"] == "degraded"  # UpToDate, not mirrored
        assert lost.failed_over_to_id is None
        peer = wait_for(lambda: _new_alerts(protected, condition=Condition.REDUNDANCY_LOST,
                                            object_key=component_key(vm, "peer")).first(),
                        timeout=10, message="the peer's alert")
        assert peer.state == AlertState.OPEN
        wait_for(lambda: _mails(stack, peer, "raised"), timeout=20, message="the peer's alert mailed")
        before = writer.count()
        wait_for(lambda: writer.count() >= before + 20, timeout=20, message="the primary writing on alone")
    finally:
        cmd.control("POST", f"/sim/hosts/{secondary.name_label}/power-on")
    powered_at = time.monotonic()
    # The AMs resync. (The secondary VM is unknown until the watcher has mirrored its host live again.)
    synced = _until(pk, lambda p: _states(p).get(f"disk:0@{secondary.uuid}") == "ok"
                    and _states(p).get("peer") == "ok" and _states(p).get("secondary-vm") != "unknown", 120,
                    "the replica resynced and the secondary host seen live")
    resynced = time.monotonic() - powered_at
    copy_state = _states(synced).get("secondary-vm")
    # The secondary VM, halted with its host, is started paused there again by the console (EAC_L2_AUTO_RESERVE).
    copy = live.api.VM.get_by_uuid(synced.secondary_vm_uuid)
    wait_for(lambda: live.api.VM.get_power_state(copy) == "Paused", timeout=60,
             message="the console to start the secondary VM paused again")
    back = _until(pk, lambda p: p.status == ProtectionStatus.PROTECTED, 60, "protected again")
    assert set(_states(back).values()) == {"ok"}, back.components
    peer.refresh_from_db()
    assert peer.state == AlertState.CLEARED
    assert _new_alerts(protected, condition=Condition.REDUNDANCY_LOST, object_key=peer.object_key).count() == 1
    assert not _new_alerts(protected, state=AlertState.OPEN).exists(), list(
        _new_alerts(protected, state=AlertState.OPEN).values_list("object_key", "message"))
    wait_for(lambda: _mails(stack, peer, "cleared"), timeout=20, message="the clearance mailed")
    assert writer.errors == [] and writer.connections == connections
    assert _all_acked_readable(stack["live"], stack["live"].ip(VM_NAME), writer) == {}
    print(f"\nsecondary host crash: peer shown lost after {shown:.2f} s; replica resynced {resynced:.2f} s after "
          f"the power-on (secondary VM then {copy_state}); {writer.count()} records, "
          f"{writer.connections} connection(s)")


def test_a_failed_disk_of_the_primary_is_served_from_the_peer_then_repaired_and_resynced(stack, protected, api):
    cmd, vm, primary = stack["cmd"], protected["vm"], protected["primary"]
    pk, writer = protected["protection"].pk, protected["writer"]
    connections = writer.connections
    failed_at = time.monotonic()
    cmd.control("POST", f"/sim/hosts/{primary.name_label}/disk", {"failed": True})
    try:
        before = writer.count()
        failed = _until(pk, lambda p: _states(p).get(f"disk:0@{primary.uuid}") == "failed", 30,
                        "the primary's disk shown failed")
        shown = time.monotonic() - failed_at
        assert failed.status == ProtectionStatus.DEGRADED, failed.status_reason
        assert "served from the replica" in failed.status_reason
        key = component_key(vm, f"disk:0@{primary.uuid}")
        alert = wait_for(lambda: _new_alerts(protected, condition=Condition.REDUNDANCY_LOST, object_key=key).first(),
                         timeout=10, message="the disk's alert")
        wait_for(lambda: _mails(stack, alert, "raised"), timeout=20, message="the disk's alert mailed")
        wait_for(lambda: writer.count() >= before + 20, timeout=20, message="writes on, served by the peer")
        assert writer.errors == [] and writer.connections == connections
    finally:
        cmd.control("POST", f"/sim/hosts/{primary.name_label}/disk", {"failed": False})
    response = api.post(f"/api/v1/protections/{pk}/repair/", {"disk": "0"}, format="json")
    assert response.status_code == 202, response.content
    repaired_at = time.monotonic()
    back = _until(pk, lambda p: p.status == ProtectionStatus.PROTECTED, 180, "protected again after the repair")
    resynced = time.monotonic() - repaired_at
    assert set(_states(back).values()) == {"ok"}, back.components
    alert.refresh_from_db()
    assert alert.state == AlertState.CLEARED
    assert _new_alerts(protected, condition=Condition.REDUNDANCY_LOST, object_key=key).count() == 1
    wait_for(lambda: _mails(stack, alert, "cleared"), timeout=20, message="the clearance mailed")
    before = writer.count()
    wait_for(lambda: writer.count() >= before + 20, timeout=20, message="writes on after the repair")
    assert writer.errors == [] and writer.connections == connections
    assert _all_acked_readable(stack["live"], stack["live"].ip(VM_NAME), writer) == {}
    print(f"\nprimary disk failure: shown failed after {shown:.2f} s; protected again {resynced:.2f} s after the "
          f"repair; {writer.count()} records, no error, {writer.connections} connection(s)")


CRASH_VM = "web-02"  # a live guest on xcp-host-2, whose AM's peer is xcp-host-1 (the master: no host crashes here)


def test_a_guest_crash_on_the_primary_restarts_the_vm_from_its_copy_on_the_secondary_with_every_record(
        stack, api):
    """The guest dies on a live primary host (``/sim/vms/<vm>/crash``: XAPI halts it with ``VM_CRASHED``): the
    console swaps the disks' roles and unpauses the copy on the secondary host; every acknowledged record is
    there, same IP and MAC; the failover is recorded and alerted; the console starts the VM's own record paused
    on the former primary, the standby of its copy: protected again. An owner's shutdown is not restarted."""
    cmd, live, pool = stack["cmd"], stack["live"], stack["pool"]
    vm = VM.objects.get(pool=pool, name_label=CRASH_VM)
    primary = vm.resident_on
    secondary = pool.hosts.get(uuid=primary.am_peer)
    alerts_before = {"alerts_before": set(Alert.objects.values_list("pk", flat=True))}
    response = api.post("/api/v1/protections/", {"vm": vm.uuid, "level": 2}, format="json")
    assert response.status_code == 202, response.content
    run = wait_run(response.json()["id"], timeout=240)
    assert run.state == "succeeded", "\n".join(
        f"{s.name}: {s.state} {s.error_code} {s.message}" for s in run.steps.order_by("position")) + _logs(stack)
    pk = Protection.objects.get(vm=vm).pk
    _until(pk, lambda p: p.status == ProtectionStatus.PROTECTED and set(_states(p).values()) == {"ok"}, 60,
           "every component ok")
    # Its owner's shutdown is not a crash: the VM stays halted, the copy paused.
    own = live.api.VM.get_by_uuid(vm.uuid)
    live.api.VM.clean_shutdown(own)
    halted = wait_for(lambda: VM.objects.filter(pk=vm.pk, power_state="Halted").exists() and timezone.now(),
                      timeout=20, message="the watcher to see the VM halted")
    _until(pk, lambda p: p.components_checked_at and p.components_checked_at > halted + timedelta(seconds=2), 30,
           "the console's polls since the shutdown")
    copy = live.api.VM.get_by_uuid(Protection.objects.get(pk=pk).secondary_vm_uuid)
    assert live.api.VM.get_power_state(copy) == "Paused" and not FailoverEvent.objects.filter(vm=vm).exists()
    live.api.VM.start_on(own, live.api.host.get_by_uuid(primary.uuid), False, False)
    ip, mac = live.ip(CRASH_VM), wait_for(lambda: (live.guest(CRASH_VM) or {}).get("mac"), timeout=20,
                                          message="the guest started again")
    writer = Writer(live, ip, identify=True)
    writer.start()
    try:
        wait_for(lambda: writer.count() >= 20, timeout=30, message="records acknowledged through the primary's AM")
        crashed_at = time.monotonic()
        cmd.control("POST", f"/sim/vms/{CRASH_VM}/crash")
        copy_name = CRASH_VM + SECONDARY_SUFFIX
        served = wait_for(lambda: writer.acked_by(copy_name, after=crashed_at), timeout=60,
                          message="a record acknowledged by the copy")
        serving = served[0] - crashed_at
        guest = live.guest(copy_name)
        assert guest["host"] == secondary.name_label and guest["ip"] == ip and guest["mac"] == mac
        _until(pk, lambda p: p.failed_over_to_id == secondary.pk, 60, "the failover recorded")
        recorded = time.monotonic() - crashed_at
        alert = wait_for(lambda: _new_alerts(alerts_before, condition=Condition.FAILOVER_DONE,
                                             object_key=component_key(vm, "failover")).first(),
                         timeout=10, message="the failover's alert")
        assert f"crashed on {primary.name_label}" in alert.message and secondary.name_label in alert.message
        event = FailoverEvent.objects.filter(vm=vm).order_by("-pk").first()
        assert event.state == FailoverEvent.State.RESTARTED and event.to_host_id == secondary.pk
        before = writer.count()
        wait_for(lambda: writer.count() >= before + 20, timeout=20, message="more records on the copy")
        assert _all_acked_readable(live, ip, writer) == {}
        assert writer.errors == []
        # The console starts the VM's own record paused on the former primary: the standby of its copy.
        back = _until(pk, lambda p: p.status == ProtectionStatus.PROTECTED, 60, "protected again, with a standby")
        assert live.api.VM.get_power_state(live.api.VM.get_by_uuid(vm.uuid)) == "Paused"
        assert _states(back)["standby-vm"] == "ok" and set(_states(back).values()) == {"ok"}, back.components
        assert _new_alerts(alerts_before, condition=Condition.FAILOVER_DONE).count() == 1
        assert not _new_alerts(alerts_before, condition=Condition.FAILOVER_FAILED).exists()
    finally:
        writer.stop()
    print(f"\nguest crash on the primary: first record acknowledged by the copy {serving:.2f} s after the crash; "
          f"failover recorded after {recorded:.2f} s; {writer.count()} records, {writer.connections} connection(s), "
          "none lost")


def test_a_crash_of_the_primary_host_fails_over_to_the_secondary_vm_with_every_acknowledged_record(
        stack, protected, api):
    """Last of the module: the primary host is powered on again at its end, the VM then unprotected."""
    cmd, live, pool, vm = stack["cmd"], stack["live"], stack["pool"], protected["vm"]
    primary, secondary = protected["primary"], protected["secondary"]
    pk, writer = protected["protection"].pk, protected["writer"]
    ip = live.ip(VM_NAME)
    mac = live.guest(VM_NAME)["mac"]
    crashed_at = time.monotonic()
    cmd.control("POST", f"/sim/hosts/{primary.name_label}/crash")
    try:
        before = writer.count()
        # (the primary's guest answers until the crash call has killed it: the copy's first answer is the measure)
        served = wait_for(lambda: writer.acked_by(VM_NAME + SECONDARY_SUFFIX, after=crashed_at), timeout=30,
                          message="a record acknowledged by the copy after the crash")
        serving = served[0] - crashed_at
        done = _until(pk, lambda p: p.failed_over_to_id == secondary.pk, 60, "the failover recorded")
        recorded = time.monotonic() - crashed_at
        assert done.failed_over_at is not None and f"runs on {secondary.name_label}" in done.status_reason
        assert done.status != ProtectionStatus.FAILED, done.status_reason
        alert = wait_for(lambda: _new_alerts(protected, condition=Condition.FAILOVER_DONE,
                                             object_key=component_key(vm, "failover")).first(),
                         timeout=10, message="the failover's alert")
        assert primary.name_label in alert.message and secondary.name_label in alert.message
        wait_for(lambda: _mails(stack, alert, "raised"), timeout=20, message="the failover mailed")
        mailed = time.monotonic() - crashed_at
        event = FailoverEvent.objects.filter(vm=vm).order_by("-pk").first()
        assert event is not None, "a FailoverEvent of the failover"
        wait_for(lambda: writer.count() >= before + 20, timeout=20, message="more records on the secondary")
        # Raised once, however many polls since.
        assert _new_alerts(protected, condition=Condition.FAILOVER_DONE).count() == 1
        assert not _new_alerts(protected, condition=Condition.FAILOVER_FAILED).exists()

        # The secondary VM runs on the secondary host, same MAC and IP, from the mirrored disk.
        guest = wait_for(lambda: next((g for g in bed_state(cmd.url)["guests"]
                                       if g["vm"] == VM_NAME + SECONDARY_SUFFIX), None),
                         timeout=10, message="the secondary's guest")
        assert guest["host"] == secondary.name_label and guest["ip"] == ip and guest["mac"] == mac
        names = {writer.names.get(n) for n in set(writer.acked_on)}
        assert VM_NAME + SECONDARY_SUFFIX in names
        assert _all_acked_readable(live, ip, writer) == {}
        assert writer.errors == []

        # The console shows the protected VM, by its own name, running on the secondary host (the tree, the VM
        # table, the host's page), and its copy not beside it.
        wait_for(lambda: VM.objects.filter(uuid=done.secondary_vm_uuid, power_state="Running",
                                           resident_on__uuid=secondary.uuid).exists(),
                 timeout=20, message="the watcher to see the secondary VM running")
        under = tree_children(pools=Pool.objects.all(), key=f"host-{secondary.uuid}")
        shown = [(n.name, n.host_name, n.power_state) for n in under.nodes if n.name.startswith(VM_NAME)]
        assert shown == [(VM_NAME, secondary.name_label, "Running")], shown
        halted = tree_children(pools=Pool.objects.all(), key=f"halted-{pool.uuid}")
        assert all(not n.name.startswith(VM_NAME) for n in halted.nodes)
        rows = [vm_node(v) for v in vm_table_queryset(user=stack["admin"]).filter(name_label__startswith=VM_NAME)]
        assert [(n.name, n.hosts_label, n.power_state) for n in rows] == [(VM_NAME, secondary.name_label,
                                                                           "Running")]
        host_page = host_detail(user=stack["admin"], uuid=secondary.uuid)
        assert VM_NAME in [n.name for n in host_page.vms]
        assert VM_NAME + SECONDARY_SUFFIX not in [n.name for n in host_page.vms]
        body = api.get(f"/api/v1/protections/{pk}/").json()
        assert body["failed_over_to"] == secondary.uuid
        # Unprotect would destroy the VM's running copy: refused, with why.
        refused = api.delete(f"/api/v1/protections/{pk}/")
        assert refused.status_code == 409 and "runs from its secondary copy" in refused.content.decode()
    finally:
        writer.stop()
        cmd.control("POST", f"/sim/hosts/{primary.name_label}/power-on")
        wait_for(lambda: master_session(live) is not None, timeout=20, message="a master")
    print(f"\nprimary host crash: first record acknowledged by the secondary {serving:.2f} s after the crash; "
          f"failover recorded after {recorded:.2f} s, mailed after {mailed:.2f} s; {writer.count()} records, "
          f"none lost")
