"""What the pool removal tests share: a pool with a row in every table that refers to it, every row of the
database as a comparable value, Django's own cascade as the oracle, and the tasks waiting in a Celery queue.

Run as ``python -m tests.inventory.removal_support`` (DATABASE_URL set, e.g. ``sqlite:///…``), it makes the tables
of that (empty) database, seeds two pools, compares the bulk removal with Django's cascade and prints the
outcome as one line of JSON: how ``test_pool_removal.py`` checks SQLite, which the suite's database is not.
"""
from __future__ import annotations

import base64
import json
import sys

# -- seeding ---------------------------------------------------------------------------------------------------


def seed_pool(name: str, user=None) -> dict:
    """A pool with a row in every table that refers to a pool or to its rows: inventory (hosts, storage, networks,
    VMs with disks and NICs, a template), protection (a protection, a workflow run and its steps, a failover
    event), alerts (an alert mailed to a recipient) and the audit log."""
    from django.utils import timezone

    from alerts.models import Alert, Delivery, Recipient
    from eac.audit import AuditAction, audit_record
    from protection.models import FailoverEvent, Protection, WorkflowRun, WorkflowStep
    from tests.inventory.factories import (
        make_disk,
        make_host,
        make_network,
        make_nic,
        make_pbd,
        make_pif,
        make_pool,
        make_sr,
        make_vm,
    )

    pool = make_pool(name=name)
    h1 = make_host(pool, name_label=f"{name}-host-1", is_master=True)
    h2 = make_host(pool, name_label=f"{name}-host-2")
    shared = make_sr(pool, shared=True)
    local = make_sr(pool, shared=False, type="ext")
    for host in (h1, h2):
        make_pbd(host, shared)
        make_pif(host, make_network(pool))
    make_pbd(h1, local)
    net = make_network(pool)
    web = make_vm(pool, host=h1, name_label=f"{name}-web", affinity=h2)
    make_disk(web, shared, userdevice="0")
    make_disk(web, local, userdevice="1")
    make_nic(web, net)
    db = make_vm(pool, name_label=f"{name}-db")
    make_disk(db, shared)
    make_vm(pool, name_label=f"{name}-template", is_a_template=True)

    protection = Protection.objects.create(vm=web, pool=pool, status="protected", observed_host=h1, created_by=user)
    run = WorkflowRun.objects.create(kind="protect", state="succeeded", pool=pool, vm=web, vm_name=web.name_label,
                                     protection=protection, created_by=user)
    WorkflowStep.objects.bulk_create(WorkflowStep(run=run, position=i, name=f"step{i}", label=f"Step {i}")
                                     for i in range(3))
    FailoverEvent.objects.create(pool=pool, vm=web, vm_uuid=web.uuid, vm_name=web.name_label, state="restarted",
                                 from_host=h2, to_host=h1, detected_at=timezone.now())
    recipient, _ = Recipient.objects.get_or_create(email="ops@example.org")
    alert = Alert.objects.create(condition="host_lost", object_key=f"host:{h2.uuid}", pool=pool, pool_name=pool.name,
                                 host_name=h2.name_label, message=f"{h2.name_label} lost")
    Delivery.objects.create(alert=alert, recipient=recipient, email=recipient.email, kind="raised")
    audit_record(user=user, action=AuditAction.PROTECT, pool=pool, vm=web)
    audit_record(user=user, action=AuditAction.VM_START, pool=pool, vm=db)
    return {"pool": pool, "web": web, "db": db, "h1": h1, "alert": alert, "run": run}


# -- the whole database as a value -----------------------------------------------------------------------------

APPS = ("inventory", "protection", "alerts", "eac")


def snapshot() -> dict[str, set[tuple]]:
    """Every row of every table of the console's apps (the audit line of a finished removal left out, which only the
    bulk removal writes): {model label: {row as a tuple of its columns}}."""
    from django.apps import apps

    from eac.audit import AuditAction, AuditEntry

    rows = {}
    for model in apps.get_models():
        if model._meta.app_label not in APPS:
            continue
        columns = [f.attname for f in model._meta.concrete_fields]
        queryset = model._base_manager.all()
        if model is AuditEntry:
            queryset = queryset.exclude(action=AuditAction.POOL_REMOVED)
        rows[model._meta.label] = {tuple(json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
                                         for v in row) for row in queryset.values_list(*columns)}
    return rows


def differences(before: dict[str, set[tuple]], after: dict[str, set[tuple]]) -> dict[str, dict[str, list]]:
    """{model label: {"gone": rows, "new": rows}} for the tables whose rows differ."""
    out = {}
    for label in sorted(before.keys() | after.keys()):
        old, now = before.get(label, set()), after.get(label, set())
        gone, new = old - now, now - old
        if gone or new:
            out[label] = {"gone": sorted(map(repr, gone)), "new": sorted(map(repr, new))}
    return out


def removal_against_cascade(pool_id: int) -> dict[str, dict[str, list]]:
    """Remove the pool twice from the same rows: with Django's cascade (its Collector, in a transaction rolled back)
    and with ``pool_remove_rows`` (committed). Returns how the rows they leave differ: {} when they agree."""
    from django.db import transaction

    from inventory.models import Pool
    from inventory.services import pool_remove_rows

    Pool.objects.filter(pk=pool_id).update(removing_since=Pool.objects.get(pk=pool_id).created_at)
    with transaction.atomic():
        Pool.objects.get(pk=pool_id).delete()
        by_cascade = snapshot()
        transaction.set_rollback(True)
    assert pool_remove_rows(pool_id=pool_id, watcher_wait=0)
    return differences(by_cascade, snapshot())


# -- Celery ------------------------------------------------------------------------------------------------------


def queued_tasks(queue: str) -> list[tuple[str, list]]:
    """The tasks waiting in ``queue`` (no worker reads it), oldest first: (task name, positional arguments)."""
    import redis
    from django.conf import settings

    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    try:
        raw = client.lrange(queue, 0, -1)
    finally:
        client.close()
    messages = [json.loads(item) for item in reversed(raw)]  # kombu pushes on the left
    return [(m["headers"]["task"], json.loads(base64.b64decode(m["body"]))[0]) for m in messages]


def forget_queue(queue: str) -> None:
    import redis
    from django.conf import settings

    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    try:
        client.delete(queue, f"_kombu.binding.{queue}")
    finally:
        client.close()


# -- the check of another database, in a process of its own -------------------------------------------------------


def main() -> int:
    import os

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "eac.test_settings")
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from inventory.models import VM, Pool

    call_command("migrate", verbosity=0)
    doomed, kept = seed_pool("doomed")["pool"], seed_pool("kept")["pool"]
    kept_vms = VM.objects.filter(pool=kept).count()
    diff = removal_against_cascade(doomed.pk)
    print(json.dumps({"vendor": connection.vendor, "differences": diff,
                      "pools": list(Pool.objects.values_list("name", flat=True)),
                      "kept_vms": [kept_vms, VM.objects.filter(pool=kept).count()]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
