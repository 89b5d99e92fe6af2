"""Removing a pool: marked at once and announced, then deleted in bulk by a worker, one statement per table.

The bulk removal is checked against Django's own cascade (its Collector) on the same rows, which must leave the
database exactly as it does, on PostgreSQL and on SQLite; against another pool's rows, which it must not touch;
against a run that died midway and a watcher still holding the pool; through the REST API and the admin; with a
real Celery worker and a real watcher process; and timed at 10,000 VMs (printed, not asserted: see
benchmarks/bench_pool_removal.py for the figure against its budget)."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db import DatabaseError, connection, connections, transaction
from django.urls import reverse
from rest_framework.test import APIClient

from alerts.models import Alert, Delivery
from eac.audit import AuditAction, AuditEntry
from eac.errors import Conflict
from eac.realtime import POOLS_GROUP, pool_group
from inventory.models import PBD, PIF, SR, VBD, VDI, VIF, VM, Host, Network, Pool
from inventory.removal import DELETE, REFUSE, SET, _chain, removal_plan
from inventory.services import (
    _watcher_gone,
    pool_remove_request,
    pool_remove_rows,
    pool_update,
    pools_removal_resume,
    vm_power_request,
)
from inventory.watch_lock import NAMESPACE, _key
from protection.models import FailoverEvent, ProtectedDisk, Protection, WorkflowRun, WorkflowStep
from tests.channels_support import run
from tests.inventory.factories import make_big_pool, make_pool, make_vm
from tests.inventory.removal_support import (
    differences,
    forget_queue,
    queued_tasks,
    removal_against_cascade,
    seed_pool,
    snapshot,
)
from tests.support import ROOT, dump_logs, register_pool, subprocess_env, wait_for

INVENTORY = [Host, SR, PBD, Network, PIF, VM, VDI, VBD, VIF]


def rows_of(pool_id: int) -> dict[str, int]:
    """How many rows still belong to the pool, or point at it or at its rows, per table."""
    counts = {m.__name__: m.objects.filter(pool_id=pool_id).count() for m in INVENTORY}
    counts["Pool"] = Pool.objects.filter(pk=pool_id).count()
    counts["Protection"] = Protection.objects.filter(pool_id=pool_id).count()
    counts["ProtectedDisk"] = ProtectedDisk.objects.filter(protection__pool_id=pool_id).count()
    counts["WorkflowRun"] = WorkflowRun.objects.filter(pool_id=pool_id).count()
    counts["WorkflowStep"] = WorkflowStep.objects.filter(run__pool_id=pool_id).count()
    counts["FailoverEvent"] = FailoverEvent.objects.filter(pool_id=pool_id).count()
    counts["Alert"] = Alert.objects.filter(pool_id=pool_id).count()
    counts["AuditEntry"] = AuditEntry.objects.filter(pool_id=pool_id).count()
    return {name: n for name, n in counts.items() if n}


def mark(pool: Pool) -> None:
    Pool.objects.filter(pk=pool.pk).update(removing_since=pool.created_at)


# -- the plan ------------------------------------------------------------------------------------------------------


def test_the_plan_deletes_every_table_of_a_pool_children_first_and_nulls_what_only_points_at_it():
    plan = removal_plan()
    print("\n" + "\n".join(map(str, plan)))
    deleted = [step.model for step in plan if step.action == DELETE]
    nulled = {(step.model, step.column) for step in plan if step.action == SET}
    assert set(deleted) == {*INVENTORY, Pool, Protection, ProtectedDisk, WorkflowRun, WorkflowStep, FailoverEvent}
    assert deleted[-1] is Pool
    # What on_delete=SET_NULL keeps: the audit log and the alerts (with their mails) outlive the pool.
    assert {(AuditEntry, "pool"), (AuditEntry, "vm"), (Alert, "pool"), (VBD, "vm"), (VM, "resident_on"),
            (WorkflowRun, "protection"), (FailoverEvent, "to_host")} <= nulled
    assert Delivery not in deleted and Alert not in deleted
    assert not [step for step in plan if step.action == REFUSE]  # no PROTECT relation to a pool today
    # Every statement finds its rows through tables that are still there: those are deleted after it.
    for i, step in enumerate(plan):
        later = {s.model for s in plan[i + 1:] if s.action == DELETE}
        for path in step.paths:
            assert set(_chain(step.model, path)) <= later, f"{step}: {path} goes through a table deleted before"
    assert deleted.index(VBD) < deleted.index(VM) < deleted.index(Host)
    assert deleted.index(WorkflowStep) < deleted.index(WorkflowRun)


@pytest.mark.django_db
def test_rows_that_protect_a_pool_refuse_its_removal_with_a_sentence(admin_user, monkeypatch):
    """No relation to a pool is PROTECT or RESTRICT today: the plan is given one, as if Alert.pool were PROTECT.
    RESTRICT lets go of the rows a cascade deletes anyway (the pool's protections, reached through its VMs too)."""
    import inventory.services
    from inventory.removal import RemovalStep

    pool = seed_pool("doomed")["pool"]
    restricted = RemovalStep(REFUSE, Protection, ("vm__pool",), column="vm", spared=("pool",))
    assert restricted.rows(pool.pk).count() == 0
    protected = RemovalStep(REFUSE, Alert, ("pool",), column="pool")
    monkeypatch.setattr(inventory.services, "removal_plan", lambda: (restricted, protected, *removal_plan()))
    with pytest.raises(Conflict) as refused:
        pool_remove_request(pool=pool, requested_by=admin_user)
    assert refused.value.sentence() == ("doomed cannot be removed. 1 alert refers to it (alerts.Alert.pool): "
                                        "remove it first.")
    assert Pool.objects.get(pk=pool.pk).removing_since is None
    mark(pool)
    with pytest.raises(Conflict):  # and the task, if the row appeared after the request
        pool_remove_rows(pool_id=pool.pk, watcher_wait=0)
    assert VM.objects.filter(pool=pool).count() == 3


# -- the bulk removal ------------------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_bulk_removal_leaves_the_same_rows_as_djangos_cascade(admin_user):
    """The oracle: Django's Collector, on the same two pools, leaves exactly the rows the plan leaves."""
    doomed = seed_pool("doomed", admin_user)["pool"]
    seed_pool("kept", admin_user)
    assert removal_against_cascade(doomed.pk) == {}


@pytest.mark.django_db(transaction=True)
def test_the_bulk_removal_deletes_every_row_of_the_pool_and_nothing_of_another(admin_user):
    doomed = seed_pool("doomed", admin_user)
    kept = seed_pool("kept", admin_user)
    pool = doomed["pool"]
    kept_rows = rows_of(kept["pool"].pk)
    assert set(rows_of(pool.pk)) == {*(m.__name__ for m in INVENTORY), "Pool", "Protection", "WorkflowRun",
                                     "WorkflowStep", "FailoverEvent", "Alert", "AuditEntry"}  # fmt: skip
    before = snapshot()
    mark(pool)

    counts = pool_remove_rows(pool_id=pool.pk, watcher_wait=0)

    assert rows_of(pool.pk) == {}
    assert counts["inventory.VM"] == 3 and counts["inventory.Pool"] == 1 and counts["protection.WorkflowStep"] == 3
    assert rows_of(kept["pool"].pk) == kept_rows
    # What outlives the pool, as on_delete says: the alert and its mail, the audit log (naming it in words).
    alert = Alert.objects.get(pk=doomed["alert"].pk)
    assert alert.pool_id is None and alert.pool_name == "doomed" and alert.deliveries.count() == 1
    lines = AuditEntry.objects.filter(object_repr__in=["doomed-web", "doomed-db"])
    assert lines.count() == 2 and not lines.filter(pool__isnull=False).exists() and not lines.filter(
        vm__isnull=False).exists()
    done = AuditEntry.objects.get(action=AuditAction.POOL_REMOVED)
    assert done.object_repr == "doomed" and done.detail["rows"] == counts
    # Nothing else changed: the rows that differ are the doomed pool's, deleted, or those that pointed at them.
    changed = differences(before, snapshot())
    for label, diff in changed.items():
        assert not any("kept" in row for row in diff["gone"]), f"{label}: a row of the other pool changed"
    assert {label for label, diff in changed.items() if diff["new"]} == {"alerts.Alert", "eac.AuditEntry"}


@pytest.mark.django_db(transaction=True)
def test_a_removal_that_died_midway_left_everything_and_running_it_again_finishes_it():
    pool = seed_pool("doomed")["pool"]
    mark(pool)
    before = rows_of(pool.pk)
    # The database refuses the VMs' DELETE, after the disks and NICs went: the whole transaction is undone.
    with connection.cursor() as cursor:
        cursor.execute("CREATE FUNCTION eac_test_refuse() RETURNS trigger LANGUAGE plpgsql AS "
                       "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$")
        cursor.execute("CREATE TRIGGER eac_test_refuse BEFORE DELETE ON inventory_vm "
                       "FOR EACH STATEMENT EXECUTE FUNCTION eac_test_refuse()")
    try:
        with pytest.raises(DatabaseError, match="refused by the test"):
            pool_remove_rows(pool_id=pool.pk, watcher_wait=0)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TRIGGER eac_test_refuse ON inventory_vm")
            cursor.execute("DROP FUNCTION eac_test_refuse()")
    assert rows_of(pool.pk) == before
    assert pool_remove_rows(pool_id=pool.pk, watcher_wait=0)["inventory.VM"] == 3
    assert rows_of(pool.pk) == {}
    assert pool_remove_rows(pool_id=pool.pk, watcher_wait=0) is None  # done: a redelivered task finds nothing to do


@pytest.mark.django_db(transaction=True)
def test_a_pool_not_marked_for_removal_is_left_alone():
    pool = seed_pool("kept")["pool"]
    before = rows_of(pool.pk)
    assert pool_remove_rows(pool_id=pool.pk, watcher_wait=0) is None
    assert rows_of(pool.pk) == before


@pytest.mark.django_db(transaction=True)
def test_the_removal_waits_for_the_watcher_to_let_go_of_the_pool_then_gives_up_waiting():
    pool = seed_pool("watched")["pool"]
    mark(pool)
    # A watch_pools process holding the pool: its advisory lock, on a session of its own.
    holder = connections.create_connection("default")
    with holder.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s, %s)", [NAMESPACE, _key(pool.pk)])
    outcome: dict = {}

    def remove():
        try:
            outcome["counts"] = pool_remove_rows(pool_id=pool.pk, watcher_wait=30)
            outcome["at"] = time.monotonic()
        finally:
            connection.close()

    try:
        remover = threading.Thread(target=remove)
        remover.start()
        time.sleep(1.0)
        assert remover.is_alive() and Pool.objects.filter(pk=pool.pk).exists()  # waiting
        with holder.cursor() as cursor:
            released = time.monotonic()
            cursor.execute("SELECT pg_advisory_unlock(%s, %s)", [NAMESPACE, _key(pool.pk)])
        remover.join(10)
        assert outcome["counts"]["inventory.Pool"] == 1
        assert outcome["at"] - released < 2.0  # within its 0.2 s poll, plus the deletes

        # A watcher that never lets go holds a removal for watcher_wait seconds only.
        other = seed_pool("stuck")["pool"]
        mark(other)
        with holder.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s, %s)", [NAMESPACE, _key(other.pk)])
        started = time.monotonic()
        assert pool_remove_rows(pool_id=other.pk, watcher_wait=0.5)["inventory.Pool"] == 1
        assert 0.5 <= time.monotonic() - started < 5
    finally:
        holder.close()


# -- the request ---------------------------------------------------------------------------------------------------


async def announced(layer, channel: str) -> list[tuple[str, str | None]]:
    """(type, op) of the events the channel got, until none comes for a second."""
    events = []
    while True:
        try:
            event = await asyncio.wait_for(layer.receive(channel), 1.0)
        except TimeoutError:
            return events
        if event["type"] == "inventory.change":  # {cls: {uuid: op}}: the ops of the pool's own record
            events += [(event["type"], op) for op in event["changes"].get("pool", {}).values()]
        else:
            events.append((event["type"], event.get("op")))


@pytest.mark.django_db(transaction=True)
def test_a_removal_request_marks_audits_announces_and_queues_the_task_once_committed(admin_user, celery_queue):
    pool = seed_pool("doomed")["pool"]

    def request() -> Pool:
        with transaction.atomic():
            returned = pool_remove_request(pool=pool, requested_by=admin_user, via="api", remote_addr="192.0.2.7")
            assert queued_tasks(celery_queue) == []  # nothing leaves before commit
        return returned

    def again() -> Pool:
        return pool_remove_request(pool=Pool.objects.get(pk=pool.pk), requested_by=admin_user)

    async def scenario():
        layer = get_channel_layer()
        channel = await layer.new_channel()
        for group in (POOLS_GROUP, pool_group(pool.uuid)):
            await layer.group_add(group, channel)
        first = await database_sync_to_async(request)()
        events = {"request": await announced(layer, channel)}
        second = await database_sync_to_async(again)()
        events["again"] = await announced(layer, channel)
        await database_sync_to_async(pool_remove_rows)(pool_id=pool.pk, watcher_wait=0)
        events["removed"] = await announced(layer, channel)
        return first, second, events

    try:
        first, second, events = run(scenario)
        tasks = queued_tasks(celery_queue)
    finally:
        forget_queue(celery_queue)
    assert first.removing_since is not None
    line = AuditEntry.objects.get(action=AuditAction.POOL_REMOVE)
    assert (line.user, line.via, line.remote_addr, line.object_repr) == (admin_user, "api", "192.0.2.7", "doomed")
    assert {("pools.change", "mod"), ("inventory.change", "mod")} <= set(events["request"])
    # Again: the same date, no second audit line, nothing a page shows, but the task queued again (it resumes a
    # removal whose task was lost).
    assert second.removing_since == first.removing_since
    assert AuditEntry.objects.filter(action=AuditAction.POOL_REMOVE).count() == 1
    assert events["again"] == []
    assert tasks == [("inventory.tasks.pool_remove", [pool.pk])] * 2
    # Done by the task's code: the pool leaves the pages.
    assert ("pools.change", "del") in events["removed"]


@pytest.mark.django_db(transaction=True)
def test_the_sweep_queues_again_only_removals_that_should_have_ended(celery_queue):
    old, new, kept = make_pool(name="old"), make_pool(name="new"), make_pool(name="kept")
    Pool.objects.filter(pk=old.pk).update(removing_since=old.created_at.replace(year=2000))
    Pool.objects.filter(pk=new.pk).update(removing_since=new.created_at)
    try:
        assert pools_removal_resume() == [old.pk]
        assert queued_tasks(celery_queue) == [("inventory.tasks.pool_remove", [old.pk])]
    finally:
        forget_queue(celery_queue)
    assert Pool.objects.filter(removing_since__isnull=True).get() == kept


@pytest.mark.django_db
def test_a_pool_being_removed_refuses_changes_and_power_actions(admin_user):
    pool = seed_pool("doomed")["pool"]
    vm = make_vm(pool, name_label="halted-vm")
    pool_remove_request(pool=pool, requested_by=admin_user)
    with pytest.raises(Conflict, match="doomed is being removed: it can no longer be changed"):
        pool_update(pool=pool, name="renamed")
    with pytest.raises(Conflict, match="belongs to a pool being removed"):
        vm_power_request(vm=vm, action="start", requested_by=admin_user)
    assert Pool.objects.get(pk=pool.pk).name == "doomed"


# -- the REST API and the admin ----------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_api_delete_answers_202_with_the_pool_marked_and_again_202(admin_api):
    pool = seed_pool("doomed")["pool"]
    url = f"/api/v1/pools/{pool.pk}/"
    first = admin_api.delete(url)
    assert first.status_code == 202, first.content
    body = first.json()
    assert body["id"] == pool.pk and body["name"] == "doomed" and body["removing_since"]
    assert body["host_count"] == 2 and "password" not in body
    again = admin_api.delete(url)
    assert again.status_code == 202 and again.json()["removing_since"] == body["removing_since"]
    assert AuditEntry.objects.filter(action=AuditAction.POOL_REMOVE, via="api").count() == 1
    # Still listed, and shown as being removed, until a worker has deleted it.
    listed = {row["name"]: row for row in admin_api.get("/api/v1/pools/").json()["results"]}
    assert listed["doomed"]["removing_since"] == body["removing_since"]
    assert admin_api.get(url).json()["removing_since"] == body["removing_since"]
    pool_remove_rows(pool_id=pool.pk, watcher_wait=0)
    assert admin_api.get(url).status_code == 404
    assert admin_api.delete(url).status_code == 404


@pytest.mark.django_db
def test_api_refuses_to_change_a_pool_being_removed_with_409(admin_api):
    pool = seed_pool("doomed")["pool"]
    other = make_pool(name="other")
    url = f"/api/v1/pools/{pool.pk}/"
    assert admin_api.get(url).json()["removing_since"] is None
    assert admin_api.delete(url).status_code == 202
    for response in (
        admin_api.patch(url, {"name": "renamed"}, format="json"),
        admin_api.put(url, {"name": "renamed", "url": pool.url, "username": "root"}, format="json"),
    ):
        assert response.status_code == 409, response.content
        assert response.json()["detail"] == "doomed is being removed: it can no longer be changed."
    assert Pool.objects.get(pk=pool.pk).name == "doomed"
    assert admin_api.patch(f"/api/v1/pools/{other.pk}/", {"name": "changed"}, format="json").status_code == 200


@pytest.mark.django_db
def test_admin_removal_counts_what_goes_and_leaves_it_to_a_worker(client, django_user_model):
    admin_client = client  # a superuser (the conftest's admin_user is an Administrator, not staff)
    admin_client.force_login(django_user_model.objects.create_superuser("root", "root@example.org", "pw"))
    pool = seed_pool("doomed")["pool"]
    url = reverse("admin:inventory_pool_delete", args=[pool.pk])
    page = admin_client.get(url)
    assert page.status_code == 200
    text = page.content.decode()
    assert "removed in the background" in text and "VMs: 3" in text
    response = admin_client.post(url, {"post": "yes"})
    assert response.status_code == 302
    assert Pool.objects.get(pk=pool.pk).removing_since is not None
    assert VM.objects.filter(pool=pool).count() == 3  # the worker's job
    assert admin_client.get(reverse("admin:inventory_pool_change", args=[pool.pk])).status_code == 200  # read-only
    assert admin_client.post(reverse("admin:inventory_pool_change", args=[pool.pk]),
                             {"name": "renamed"}).status_code == 403


# -- with a real worker and a real watcher ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_delete_through_the_api_ends_with_the_pool_gone_while_it_was_watched(xapisim, admin_user, console_env,
                                                                             start_proc):
    pool = register_pool(xapisim)
    watcher = start_proc("watcher", console_env)
    wait_for(lambda: not _watcher_gone(pool.pk), timeout=20, message="the watcher to take the pool's lock")
    worker = start_proc("worker", console_env)
    api = APIClient()
    api.force_authenticate(admin_user)
    assert VM.objects.filter(pool=pool).exists()

    response = api.delete(f"/api/v1/pools/{pool.pk}/")
    assert response.status_code == 202, response.content
    try:
        wait_for(lambda: not Pool.objects.filter(pk=pool.pk).exists(), timeout=30, interval=0.2,
                 message="the worker to remove the pool")
    except AssertionError:
        raise AssertionError(dump_logs(worker, watcher)) from None
    time.sleep(1.5)  # a watch_pools poll and more: nothing comes back behind the delete
    assert rows_of(pool.pk) == {}
    assert "stopping its watcher" in watcher.output()
    assert AuditEntry.objects.filter(action=AuditAction.POOL_REMOVED, object_repr="Demo pool").exists()
    assert api.get(f"/api/v1/pools/{pool.pk}/").status_code == 404


# -- SQLite ----------------------------------------------------------------------------------------------------------


def test_the_bulk_removal_agrees_with_djangos_cascade_on_sqlite_too(tmp_path):
    env = subprocess_env(DATABASE_URL=f"sqlite:///{tmp_path / 'removal.sqlite3'}", LOG_LEVEL="ERROR")
    out = subprocess.run([sys.executable, "-m", "tests.inventory.removal_support"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["vendor"] == "sqlite"
    assert result["differences"] == {}
    assert result["pools"] == ["kept"] and result["kept_vms"] == [3, 3]


# -- the figure ----------------------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_pool_of_10000_vms_is_removed_in_one_go_and_the_time_is_printed():
    """Not a timed assertion (machines vary): benchmarks/bench_pool_removal.py tells the figure against its budget."""
    started = time.perf_counter()
    pool = make_big_pool(hosts=100, vms=10_000, disks=2, nics=2)
    built = time.perf_counter() - started
    other = seed_pool("kept")["pool"]
    kept = rows_of(other.pk)
    total = sum(rows_of(pool.pk).values())
    mark(pool)
    started = time.perf_counter()
    counts = pool_remove_rows(pool_id=pool.pk, watcher_wait=0)
    took = time.perf_counter() - started
    print(f"\npool removal: 10,000 VMs, {sum(counts.values()):,} rows deleted or updated in {took:.2f} s "
          f"(the pool built in {built:.1f} s with the watcher's COPY)")
    assert counts["inventory.VM"] == 10_100 and counts["inventory.VBD"] == 20_000 and counts["inventory.VIF"] == 20_000
    assert sum(counts.values()) == total
    assert rows_of(pool.pk) == {} and rows_of(other.pk) == kept
