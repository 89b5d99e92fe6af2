"""The pool watcher, against a live xapisim over HTTP and the real PostgreSQL and Redis.

The watcher runs as a thread of the test process (the same code ``manage.py
watch_pools`` runs), except where the command itself is what is tested.
"""
import logging
import subprocess
import sys
import threading
import time
import xmlrpc.client

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from eac.realtime import inventory_change, inventory_resync, pool_group
from inventory.choices import ConnectionState
from inventory.models import PBD, PIF, SR, VBD, VDI, VIF, VM, Host, Network, Pool
from inventory.services import pool_create, pool_remove_request, pool_remove_rows
from inventory.sync import NULL_REF, RECORD_FIELDS, SPECS, XAPI_CLASSES, PoolMirror
from inventory.watcher import PoolWatcher, Supervisor, full_sync, sync_once
from inventory.xapi import connect
from tests.support import ROOT, Proc, subprocess_env, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

# How long a test waits for a change to reach the database: generous, for a loaded machine. How fast it
# gets there is benchmarks/bench_sync.py's and bench_live.py's business.
PATIENCE = 30
MODELS = {"host": Host, "sr": SR, "pbd": PBD, "network": Network, "pif": PIF, "vm": VM, "vdi": VDI, "vbd": VBD,
          "vif": VIF}


@pytest.fixture
def pool(xapisim):
    return pool_create(name="demo", url=xapisim.url, username="root", password="demo")


@pytest.fixture
def xapi(xapisim):
    """A separate XAPI session, to act on the pool the way another client would."""
    with connect(xapisim.url, "root", "demo") as client:
        yield client


@pytest.fixture
def watch():
    """Start a PoolWatcher thread for a pool; stopped (and its DB connection closed) after the test."""
    started = []

    def start(pool, **kwargs):
        kwargs.setdefault("event_timeout", 5.0)
        kwargs.setdefault("max_delay", 1.0)
        watcher = PoolWatcher(pool, **kwargs)
        watcher.start()
        started.append(watcher)
        return watcher

    yield start
    for watcher in started:
        watcher.stop()
    for watcher in started:
        watcher.join(10)
        assert not watcher.is_alive()


def state(pool):
    return Pool.objects.values_list("connection_state", flat=True).get(pk=pool.pk)


def connected(pool):
    return state(pool) == ConnectionState.CONNECTED


def vm_ref(client, name):
    return client.call("VM.get_by_name_label", name)[0]


def assert_rows_match(client, pool):
    """Every mirrored class has exactly the objects XAPI has (by uuid), and foreign keys are resolved."""
    for cls, model in MODELS.items():
        records = client.call(f"{XAPI_CLASSES[cls]}.get_all_records")
        assert set(model.objects.filter(pool=pool).values_list("uuid", flat=True)) == {
            r["uuid"] for r in records.values()
        }, cls


def test_full_sync_over_xml_rpc_gives_the_same_rows(xapisim, pool, xapi):
    """A pool without JSON-RPC is read over XML-RPC, where 64-bit ints come as strings."""
    sync_once(pool)
    before = {m: sorted(model.objects.filter(pool=pool).values_list(*_columns(model))) for m, model in MODELS.items()}
    Host.objects.filter(pool=pool).update(memory_total=0, cpu_count=0)
    VM.objects.filter(pool=pool).update(memory_static_max=0, vcpus_max=0)
    with connect(xapisim.url, "root", "demo") as client:
        client._json_ok = False  # as after a 404 from /jsonrpc
        full_sync(client, PoolMirror(pool))
    after = {m: sorted(model.objects.filter(pool=pool).values_list(*_columns(model))) for m, model in MODELS.items()}
    assert after == before


def _columns(model):
    return [f.attname for f in model._meta.concrete_fields if f.attname not in ("id", "updated_at")]


def test_initial_load_matches_the_simulator(xapisim, pool, xapi):
    result = sync_once(pool)

    assert_rows_match(xapi, pool)
    sim = xapisim.state()
    assert result.counts["host"] == len(sim["hosts"]) == 4
    assert result.counts["vm"] == len(sim["vms"])
    for host in sim["hosts"]:
        row = Host.objects.get(pool=pool, uuid=host["uuid"])
        assert (row.name_label, row.address, row.live, row.is_master) == (
            host["name"], host["address"], host["live"], host["master"])
        assert row.memory_total > 0
    for vm in sim["vms"]:
        row = VM.objects.select_related("resident_on").get(pool=pool, uuid=vm["uuid"])
        assert (row.name_label, row.power_state) == (vm["name"], vm["power_state"])
        assert (row.resident_on.name_label if row.resident_on else None) == vm["host"]
        assert (row.is_a_template, row.is_control_domain, row.is_a_snapshot) == (
            vm["is_a_template"], vm["is_control_domain"], vm["is_a_snapshot"])
    # Templates, dom0s and snapshots are rows too; flags let the UI leave them out.
    vms = VM.objects.filter(pool=pool)
    assert vms.filter(is_control_domain=True).count() == 4
    assert vms.filter(is_a_template=True, is_a_snapshot=False).exists()
    assert vms.filter(is_a_snapshot=True).exists()
    # References became foreign keys.
    assert not VBD.objects.filter(pool=pool, vm__isnull=True).exists()
    assert not PBD.objects.filter(pool=pool, host__isnull=True).exists()
    assert not PIF.objects.filter(pool=pool, network__isnull=True).exists()
    assert VDI.objects.filter(pool=pool, sr__shared=True, sr__name_label="iSCSI shared storage").exists()

    pool.refresh_from_db()
    assert (pool.uuid, pool.name_label, pool.ha_enabled) == (sim["pool"]["uuid"], "Demo pool",
                                                             sim["pool"]["ha_enabled"])
    assert pool.connection_state == ConnectionState.CONNECTED and pool.last_sync_at is not None

    # A second full sync changes nothing.
    before = list(VM.objects.filter(pool=pool).order_by("uuid").values_list("pk", "uuid", "power_state"))
    sync_once(pool)
    assert list(VM.objects.filter(pool=pool).order_by("uuid").values_list("pk", "uuid", "power_state")) == before


def test_vm_start_stop_clone_destroy_reach_the_database(pool, xapi, watch):
    watch(pool)
    wait_for(lambda: connected(pool), timeout=10, message="connected")
    halted = VM.objects.get(pool=pool, name_label="dev-sandbox")
    assert halted.power_state == "Halted"
    ref = vm_ref(xapi, "dev-sandbox")

    xapi.call("VM.start", ref, False, False)
    row = wait_for(lambda: VM.objects.filter(pk=halted.pk, power_state="Running").select_related("resident_on")
                   .first(), timeout=PATIENCE, message="VM running")
    assert row.resident_on is not None

    xapi.call("VM.clean_shutdown", ref)
    wait_for(lambda: VM.objects.filter(pk=halted.pk, power_state="Halted", resident_on=None).exists(),
             timeout=PATIENCE, message="VM halted")

    clone = xapi.call("VM.clone", ref, "dev-sandbox-clone")
    clone_uuid = xapi.call("VM.get_uuid", clone)
    row = wait_for(lambda: VM.objects.filter(pool=pool, uuid=clone_uuid).first(), timeout=PATIENCE,
                   message="clone row")
    assert row.name_label == "dev-sandbox-clone"
    # Its disks came along, and point at the clone.
    wait_for(lambda: VBD.objects.filter(vm=row).count() == len(xapi.call("VM.get_VBDs", clone)), timeout=PATIENCE,
             message="clone's VBDs")

    xapi.call("VM.destroy", clone)
    wait_for(lambda: not VM.objects.filter(pool=pool, uuid=clone_uuid).exists(), timeout=PATIENCE,
             message="clone row deleted")
    pool.refresh_from_db()
    assert pool.last_event_at is not None


@pytest.fixture
def messages(pool):
    """``receive(expected)``: wait for the (group, event) pair ``expected``, made by eac.realtime's builders,
    on the pool's channel-layer group, skipping other messages."""
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(pool_group(pool.uuid), channel)

    numbers = []  # (stream, seq) of every message received

    def receive(expected, timeout=PATIENCE):
        """``expected``: a (group, event) pair, or a predicate on the event."""
        if callable(expected):
            matches = expected
        else:
            group, event = expected
            assert group == pool_group(pool.uuid), expected
            # Numbered by their sender (eac.realtime), which the builders leave out.
            matches = lambda message: {k: v for k, v in message.items() if k not in ("stream", "seq")} == event  # noqa: E731
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                message = async_to_sync(_receive)(layer, channel, deadline - time.monotonic())
            except TimeoutError:
                break
            seen.append(message)
            numbers.append((message.get("stream"), message.get("seq")))
            if matches(message):
                return message
        raise AssertionError(f"no {expected}; got {seen}")

    receive.numbers = numbers
    yield receive
    async_to_sync(layer.group_discard)(pool_group(pool.uuid), channel)


def test_changes_are_announced_on_the_pool_group(pool, xapi, watch, messages):
    watch(pool)
    # The full sync is announced once, not object by object; then the state change.
    messages(inventory_resync(pool=pool.uuid))
    messages(inventory_change(pool=pool.uuid, cls="pool", uuid=pool.uuid, op="mod"))
    vm = VM.objects.get(pool=pool, name_label="wiki")
    xapi.call("VM.set_name_label", vm_ref(xapi, "wiki"), "wiki-renamed")
    messages(inventory_change(pool=pool.uuid, cls="vm", uuid=vm.uuid, op="mod"))
    assert VM.objects.get(pk=vm.pk).name_label == "wiki-renamed"

    clone = xapi.call("VM.clone", vm_ref(xapi, "dev-sandbox"), "announced-clone")
    clone_uuid = xapi.call("VM.get_uuid", clone)
    # The clone's VM, disks and interfaces come in one batch, announced as one message.
    added = messages(lambda m: m["changes"].get("vm", {}).get(clone_uuid) == "add")
    vbds = set(VBD.objects.filter(vm__uuid=clone_uuid).values_list("uuid", flat=True))
    assert vbds and added["changes"]["vbd"] == dict.fromkeys(vbds, "add")
    xapi.call("VM.destroy", clone)
    messages(lambda m: m["changes"].get("vm", {}).get(clone_uuid) == "del")
    # Numbered by the watcher, one by one: a socket that sees a number skip knows it lost a message.
    streams = {stream for stream, _seq in messages.numbers}
    assert len(streams) == 1 and None not in streams
    seqs = [seq for _stream, seq in messages.numbers]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_a_burst_of_changes_is_announced_as_one_resync(pool, xapi, watch, messages, settings):
    settings.EAC_CHANGE_MESSAGES_MAX = 1
    watch(pool)
    # Connected, after the full sync.
    messages(inventory_change(pool=pool.uuid, cls="pool", uuid=pool.uuid, op="mod"))
    # A clone adds a VM, its disks and its network interfaces: more than one object in a batch.
    xapi.call("VM.clone", vm_ref(xapi, "backup-proxy"), "burst")
    messages(inventory_resync(pool=pool.uuid))
    wait_for(lambda: VM.objects.filter(pool=pool, name_label="burst").exists(), timeout=PATIENCE, message="clone")


async def _receive(layer, channel, timeout):
    import asyncio

    return await asyncio.wait_for(layer.receive(channel), max(timeout, 0.01))


def test_host_and_pif_metrics_update_live_and_carrier(xapisim, pool, watch):
    watch(pool)
    wait_for(lambda: connected(pool), timeout=10, message="connected")
    pif = PIF.objects.filter(pool=pool, device="eth1").select_related("host").first()
    assert pif.carrier
    pif_uuid = pif.uuid
    xapisim.control("POST", f"/sim/pifs/{pif_uuid}/carrier", {"up": False})
    wait_for(lambda: not PIF.objects.get(pk=pif.pk).carrier, timeout=PATIENCE, message="carrier down")
    xapisim.control("POST", f"/sim/pifs/{pif_uuid}/carrier", {"up": True})
    wait_for(lambda: PIF.objects.get(pk=pif.pk).carrier, timeout=PATIENCE, message="carrier up")


def test_simulator_restart_reconnects_and_resyncs(xapisim, pool, xapi, watch):
    watch(pool)
    wait_for(lambda: connected(pool), timeout=10, message="connected")
    # A VM that exists only until the restart (the simulator starts again from its preset).
    clone = xapi.call("VM.clone", vm_ref(xapi, "dev-sandbox"), "short-lived")
    clone_uuid = xapi.call("VM.get_uuid", clone)
    wait_for(lambda: VM.objects.filter(pool=pool, uuid=clone_uuid).exists(), timeout=PATIENCE, message="clone")

    states = [state(pool)]
    stop = threading.Event()

    def record_states():
        from django.db import connection

        try:
            while not stop.is_set():
                current = state(pool)
                if states[-1] != current:
                    states.append(current)
                time.sleep(0.02)
        finally:
            connection.close()

    recorder = threading.Thread(target=record_states)
    recorder.start()
    try:
        xapisim.restart()
        wait_for(lambda: states[-1] == ConnectionState.CONNECTED and ConnectionState.RECONNECTING in states,
                 timeout=15, message="reconnecting, then connected")
    finally:
        stop.set()
        recorder.join()
    assert states[0] == ConnectionState.CONNECTED and states[-1] == ConnectionState.CONNECTED
    assert ConnectionState.RECONNECTING in states

    # Rows are back as the restarted simulator has them: the clone is gone.
    with connect(xapisim.url, "root", "demo") as fresh:
        wait_for(lambda: not VM.objects.filter(pool=pool, uuid=clone_uuid).exists(), timeout=5, message="resync")
        assert_rows_match(fresh, pool)
        # And events flow again.
        fresh.call("VM.set_name_label", vm_ref(fresh, "mail"), "mail-after-restart")
        wait_for(lambda: VM.objects.filter(pool=pool, name_label="mail-after-restart").exists(), timeout=PATIENCE,
                 message="event after restart")


def test_watcher_follows_the_master_to_another_host(xapisim, pool, watch):
    watch(pool, max_delay=0.5)
    wait_for(lambda: connected(pool), timeout=10, message="connected")
    old_master = Host.objects.get(pool=pool, is_master=True)
    assert old_master.name_label == "xcp-host-1"

    xapisim.control("POST", "/sim/hosts/xcp-host-1/crash", base=xapisim.host_url("127.0.0.2"))

    new_url = xapisim.host_url("127.0.0.2")
    wait_for(lambda: Pool.objects.filter(pk=pool.pk, master_url=new_url, connection_state="connected")
             .exists(), timeout=PATIENCE, message="watcher on the new master")
    wait_for(lambda: Host.objects.filter(pool=pool, is_master=True).values_list("name_label", flat=True)
             .first() == "xcp-host-2", timeout=PATIENCE, message="is_master moved")
    assert not Host.objects.get(pk=old_master.pk).live
    # Events flow from the new master.
    with connect(new_url, "root", "demo") as xapi:
        xapi.call("VM.set_name_label", vm_ref(xapi, "gitlab"), "gitlab-on-new-master")
    wait_for(lambda: VM.objects.filter(pool=pool, name_label="gitlab-on-new-master").exists(),
             timeout=PATIENCE, message="event from the new master")


def test_expired_session_logs_in_again_and_resyncs(xapisim, pool, watch, caplog):
    caplog.set_level(logging.INFO, logger="inventory")
    watcher = watch(pool, event_timeout=0.5)
    wait_for(lambda: connected(pool), timeout=10, message="connected")
    first_sync = Pool.objects.get(pk=pool.pk).last_sync_at
    session = wait_for(lambda: watcher._client and watcher._client.session_ref, message="session")
    xmlrpc.client.ServerProxy(xapisim.url).session.logout(session)
    wait_for(lambda: Pool.objects.get(pk=pool.pk).last_sync_at > first_sync, timeout=5, message="resync")
    assert "The session with the pool has expired. Logging in again for a full sync." in caplog.text
    assert connected(pool)


def test_wrong_password_shows_unreachable_with_a_sentence_and_never_the_password(xapisim, pool, watch, caplog):
    caplog.set_level(logging.DEBUG)
    Pool.objects.filter(pk=pool.pk).update(password="Wr0ng-s3cret")
    pool.refresh_from_db()
    watch(pool)
    wait_for(lambda: state(pool) == ConnectionState.UNREACHABLE, timeout=5, message="unreachable")
    pool.refresh_from_db()
    assert pool.last_error == "The pool refused the user name or password."
    assert "Wr0ng-s3cret" not in caplog.text
    assert "refused the user name or password" in caplog.text


def test_passwords_never_reach_the_logs(xapisim, caplog):
    caplog.set_level(logging.DEBUG)
    pool = pool_create(name="lab", url=xapisim.url, username="root", password="demo")
    sync_once(pool)
    with pytest.raises(Exception):  # noqa: B017 - only the logs matter here
        pool_create(name="other", url=xapisim.url, username="root", password="Zq9-unique-secret")
    assert "pool lab added" in caplog.text and "full sync" in caplog.text
    assert "Zq9-unique-secret" not in caplog.text


def test_supervisor_starts_and_stops_watchers_as_pools_come_and_go(xapisim, celery_queue):
    supervisor = Supervisor(poll_interval=0.2, event_timeout=2.0, max_delay=0.5)
    thread = threading.Thread(target=supervisor.run)
    thread.start()
    try:
        pool = pool_create(name="demo", url=xapisim.url, username="root", password="demo")
        wait_for(lambda: connected(pool) and VM.objects.filter(pool=pool).exists(), timeout=10,
                 message="new pool watched")
        watcher = supervisor.watchers[pool.pk]
        pool_remove_request(pool=pool, requested_by=None)  # its task waits in celery_queue: run here instead
        wait_for(lambda: not watcher.is_alive(), timeout=5, message="watcher of the pool being removed stopped")
        assert pool.pk not in supervisor.watchers
        pool_remove_rows(pool_id=pool.pk, watcher_wait=5)
        assert not VM.objects.exists()
    finally:
        supervisor.stop()
        thread.join(15)
    assert not thread.is_alive()


def test_watch_pools_command_once_syncs_and_exits(xapisim, pool):
    proc = subprocess.run(
        [sys.executable, "manage.py", "watch_pools", "--once", "--pool", "demo"],
        cwd=ROOT, env=subprocess_env(LOG_LEVEL="INFO"), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "demo: synced" in proc.stdout
    assert "full sync from" in proc.stderr  # logged at INFO
    assert VM.objects.filter(pool=pool).count() == len(xapisim.state()["vms"])


def test_watch_pools_command_follows_changes_until_terminated(xapisim, pool, xapi, tmp_path):
    proc = Proc("watch_pools", [sys.executable, "manage.py", "watch_pools", "--poll", "0.5"],
                env=subprocess_env(LOG_LEVEL="INFO", EAC_EVENT_TIMEOUT="5"), log=tmp_path / "watch_pools.log").start()
    try:
        wait_for(lambda: connected(pool), timeout=30, message="watcher process connected")
        xapi.call("VM.set_name_label", vm_ref(xapi, "jenkins"), "jenkins-2")
        wait_for(lambda: VM.objects.filter(pool=pool, name_label="jenkins-2").exists(), timeout=PATIENCE,
                 message="change seen by the watcher process")
    finally:
        returncode = proc.stop()
    assert returncode == 0, proc.output()
    assert "watcher: stopped" in proc.output()


def test_the_mirror_reads_only_fields_it_asks_xapi_for():
    """Only RECORD_FIELDS are decoded from XAPI's answers: a field read but not asked for would stay None."""

    class Recording(dict):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def get(self, key, default=None):
            self.seen.add(key)
            return super().get(key, default)

    mirror = PoolMirror(Pool(name="x"))
    for spec in SPECS:
        record = Recording()
        spec.values(mirror, "OpaqueRef:x", record)
        assert record.seen <= set(RECORD_FIELDS[spec.cls]), spec.cls
    for cls, read in (("pool", mirror._pool_fields), ("host_metrics", mirror._host_metrics_of)):
        record = Recording()
        read(record)
        assert record.seen <= set(RECORD_FIELDS[cls]), cls
    record = Recording()
    PoolMirror._remember_side_record(mirror, "pif", "OpaqueRef:p", record)
    assert record.seen <= set(RECORD_FIELDS["pif"])


def test_a_host_whose_free_memory_alone_changed_is_written_and_shown_but_not_given_to_protection_to_judge():
    """On a busy pool every VM started or stopped changes its host's free memory: protection judges such a batch by
    its VMs, not as a change of the pool's hosts (which judged the whole pool, a dozen queries, every batch)."""
    from tests.inventory.factories import big_pool_records, make_pool

    records = big_pool_records(hosts=2, vms=2)
    pool = make_pool(uuid=next(iter(records["pool"].values()))["uuid"])
    mirror = PoolMirror(pool)
    mirror.full_sync(records)
    host = records["host"]["OpaqueRef:host-0"]
    metrics = records["host_metrics"]["OpaqueRef:host_metrics-0"]
    vm = records["vm"]["OpaqueRef:vm-0"]

    def event(cls, ref, snapshot):
        return {"class": cls, "operation": "mod", "ref": ref, "snapshot": snapshot}

    # A VM stops: it, and its host's free memory.
    result = mirror.apply([event("vm", "OpaqueRef:vm-0", {**vm, "power_state": "Halted", "resident_on": NULL_REF}),
                           event("host_metrics", "OpaqueRef:host_metrics-0", {**metrics, "memory_free": "1"})])
    assert result.changed_uuids == {"vm": {vm["uuid"]}, "host": {host["uuid"]}}  # both written and shown
    assert Host.objects.get(uuid=host["uuid"]).memory_free == 1
    assert result.judged_uuids == {"vm": {vm["uuid"]}}

    # The host dies: judged, whatever else changed with it.
    result = mirror.apply([event("host_metrics", "OpaqueRef:host_metrics-0",
                                 {**metrics, "memory_free": "2", "live": False})])
    assert result.judged_uuids == {"host": {host["uuid"]}}
    # Disabled (maintenance): a column of the host's own record.
    result = mirror.apply([event("host", "OpaqueRef:host-0", {**host, "enabled": False})])
    assert result.judged_uuids == {"host": {host["uuid"]}}


def test_a_batch_of_events_writes_the_same_rows_as_values_as_through_the_staging_table(monkeypatch):
    """The upsert sends a few rows as VALUES in one statement, more through COPY and a staging table: both ways write
    every column alike (JSON, timestamps, booleans, foreign keys, NULLs), on insert and on update."""
    from inventory import sync
    from tests.inventory.factories import big_pool_records, make_pool

    def mirrored(values_rows: int) -> dict:
        monkeypatch.setattr(sync, "VALUES_ROWS", values_rows)
        records = big_pool_records(hosts=2, vms=3)
        pool = make_pool(uuid=next(iter(records["pool"].values()))["uuid"])
        mirror = PoolMirror(pool)
        mirror.full_sync(records)
        vm = records["vm"]["OpaqueRef:vm-1"]
        new_vm = {**vm, "uuid": "0c0c0c0c-0000-4000-8000-000000000001", "name_label": "new",
                  "current_operations": {"OpaqueRef:task": "start"}, "power_state": "Halted", "resident_on": NULL_REF}
        events = [
            {"class": "vm", "operation": "mod", "ref": "OpaqueRef:vm-1",
             "snapshot": {**vm, "power_state": "Paused", "current_operations": {"OpaqueRef:t": "clean_shutdown"},
                          "name_label": "it's \"quoted\" % %s", "affinity": NULL_REF}},
            {"class": "vm", "operation": "add", "ref": "OpaqueRef:vm-new", "snapshot": new_vm},
            {"class": "vbd", "operation": "add", "ref": "OpaqueRef:vbd-new",
             "snapshot": {**records["vbd"]["OpaqueRef:vbd-0"], "uuid": "0c0c0c0c-0000-4000-8000-000000000002",
                          "VM": "OpaqueRef:vm-new", "currently_attached": False}},
            {"class": "host_metrics", "operation": "mod", "ref": "OpaqueRef:host_metrics-1",
             "snapshot": {**records["host_metrics"]["OpaqueRef:host_metrics-1"], "memory_free": "12345",
                          "last_updated": "20261207T10:11:12Z"}},
        ]
        result = mirror.apply(events)
        assert result.changed == 4
        rows = {}
        for model in MODELS.values():
            for row in model.objects.filter(pool=pool).values():
                rows[(model.__name__, row["uuid"])] = {k: v for k, v in row.items()
                                                      if k not in ("id", "pool_id", "updated_at", "created_at")
                                                      and not k.endswith("_id")}
        return rows

    as_values, through_copy = mirrored(1000), mirrored(0)
    assert as_values == through_copy
    assert as_values[("VM", "0c0c0c0c-0000-4000-8000-000000000001")]["current_operations"] == {
        "OpaqueRef:task": "start"}
    assert as_values[("Host", _uuid5("host-1"))]["last_heard_at"] is not None


def _uuid5(name: str) -> str:
    import uuid

    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))
