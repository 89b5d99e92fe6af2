"""Pool removal at 10,000 VMs: the bulk removal (one statement per table) against Django's cascade, on PostgreSQL.

Run: .venv/bin/python benchmarks/bench_pool_removal.py [--hosts 100] [--vms 10000] [--runs 3] [--no-cascade]
     (DATABASE_URL / REDIS_URL as for the tests; the defaults are the machine's services)

Uses a database of its own (``eac_bench_removal``, made afresh and dropped at the end). Each run builds a pool the
way the watcher's full sync writes it (``PoolMirror.full_sync``: COPY), with ``--vms`` VMs of 2 disks and 2 NICs on
``--hosts`` hosts, and what the apps above add to it: a tenth of the VMs protected, each with a workflow run of 3
steps, a failover event and 2 audit lines, and an alert per host mailed to a recipient. A second pool of the same
size stays in the database throughout, so that the statements work among another pool's rows as they would in a
real console. Then it times ``inventory.services.pool_remove_rows`` (what the ``pool_remove`` task runs; budget 5 s)
and, on the same rows built again, ``Pool.delete()``: Django's Collector, the synchronous path the REST API's
DELETE used to take.
"""
from __future__ import annotations

import statistics
import sys
import time

from common import argument_parser, bench_database, drop_bench_database, print_overall, verdict

BUDGET_S = 5.0
BENCH_DB = "eac_bench_removal"


def populate(name: str, *, hosts: int, vms: int):
    """A pool as the watcher writes it, plus protection, alerts and audit rows; returns (pool, rows of it)."""
    from django.db import transaction
    from django.utils import timezone

    from alerts.models import Alert, Delivery, Recipient
    from eac.audit import AuditAction, AuditEntry
    from inventory.models import VM, Host
    from protection.models import FailoverEvent, Protection, WorkflowRun, WorkflowStep
    from tests.inventory.factories import make_big_pool

    pool = make_big_pool(name=name, hosts=hosts, vms=vms, disks=2, nics=2)
    now = timezone.now()
    with transaction.atomic():
        chosen = list(VM.objects.filter(pool=pool, is_control_domain=False).order_by("pk")[::10])
        host_ids = list(Host.objects.filter(pool=pool).values_list("pk", flat=True))
        protections = Protection.objects.bulk_create(
            Protection(vm=vm, pool=pool, status="protected", observed_host_id=vm.resident_on_id) for vm in chosen)
        runs = WorkflowRun.objects.bulk_create(
            WorkflowRun(kind="protect", state="succeeded", pool=pool, vm=p.vm, vm_name=p.vm.name_label, protection=p)
            for p in protections)
        WorkflowStep.objects.bulk_create(
            WorkflowStep(run=run, position=i, name=f"step{i}", label=f"Step {i}") for run in runs for i in range(3))
        FailoverEvent.objects.bulk_create(
            FailoverEvent(pool=pool, vm=vm, vm_uuid=vm.uuid, vm_name=vm.name_label, state="restarted",
                          from_host_id=host_ids[0], to_host_id=vm.resident_on_id, detected_at=now) for vm in chosen)
        AuditEntry.objects.bulk_create(
            AuditEntry(action=action, via="api", pool=pool, vm=vm, object_repr=vm.name_label)
            for vm in chosen for action in (AuditAction.PROTECT, AuditAction.PROTECTED))
        recipient, _ = Recipient.objects.get_or_create(email="ops@example.org")
        alerts = Alert.objects.bulk_create(
            Alert(condition="host_lost", object_key=f"host:{name}:{pk}", pool=pool, pool_name=name, message="lost",
                  state="cleared") for pk in host_ids)
        Delivery.objects.bulk_create(Delivery(alert=a, recipient=recipient, email=recipient.email, kind="raised")
                                     for a in alerts)
    return pool


def rows_of(pool) -> int:
    """The pool's row and the rows whose ``pool`` is it (a run's steps left out): the size of what goes."""
    from django.apps import apps

    total = 1
    for model in apps.get_models():
        fields = [f for f in model._meta.concrete_fields if f.is_relation and f.name == "pool"]
        if fields and fields[0].related_model is type(pool):
            total += model._base_manager.filter(pool=pool).count()
    return total


def main() -> int:
    parser = argument_parser(__doc__, hosts=100, vms=10_000)
    parser.add_argument("--runs", type=int, default=3, help="bulk removals timed (each of a pool built afresh)")
    parser.add_argument("--no-cascade", action="store_true", help="skip the cascade (Django's Collector)")
    args = parser.parse_args()

    base = bench_database(BENCH_DB, fresh=True, channel_prefix="eacbenchremoval")
    from django.db import connection
    from django.utils import timezone

    from inventory.models import Pool
    from inventory.services import pool_remove_rows

    print(f"bench_pool_removal: {args.vms:,} VMs (2 disks, 2 NICs each) on {args.hosts} hosts, PostgreSQL "
          f"{connection.pg_version // 10000}, database {BENCH_DB!r}")
    ok = True
    try:
        started = time.perf_counter()
        populate("kept", hosts=args.hosts, vms=args.vms)
        print(f"  another pool of the same size, kept: built in {time.perf_counter() - started:.1f} s")
        times = []
        for run in range(args.runs):
            started = time.perf_counter()
            pool = populate(f"bulk-{run}", hosts=args.hosts, vms=args.vms)
            built = time.perf_counter() - started
            rows = rows_of(pool)
            Pool.objects.filter(pk=pool.pk).update(removing_since=timezone.now())
            started = time.perf_counter()
            counts = pool_remove_rows(pool_id=pool.pk, watcher_wait=0)
            times.append(time.perf_counter() - started)
            assert counts is not None and not Pool.objects.filter(pk=pool.pk).exists()
            print(f"  run {run + 1}: built {rows:,} rows in {built:.1f} s; bulk removal {times[-1]:.2f} s "
                  f"({sum(counts.values()):,} rows deleted or updated)")
        worst = max(times)
        print(f"  bulk removal (pool_remove_rows): median {statistics.median(times):.2f} s, worst {worst:.2f} s "
              f"(budget {BUDGET_S:.0f} s) {verdict(worst <= BUDGET_S)}")
        ok &= worst <= BUDGET_S

        if not args.no_cascade:
            pool = populate("cascade", hosts=args.hosts, vms=args.vms)
            started = time.perf_counter()
            pool.delete()
            cascade = time.perf_counter() - started
            print(f"  Django's cascade (Pool.delete(), the old DELETE): {cascade:.2f} s on the same rows, "
                  f"{cascade / statistics.median(times):.1f} times the bulk removal's median")
    finally:
        drop_bench_database(base, BENCH_DB)
    print_overall(ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
