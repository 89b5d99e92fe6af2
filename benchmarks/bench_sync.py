"""Pool watcher throughput: initial full sync and event.from changes applied, into PostgreSQL.

Run: .venv/bin/python benchmarks/bench_sync.py [--hosts 1000] [--vms 10000] [--changes 20000]

Starts ``python -m xapisim --hosts 1000 --vms 10000 --port 0 --op-delay 0``, uses
its own database (``eac_bench`` on the DATABASE_URL server of eac.test_settings,
created and migrated if needed), and measures with the watcher's own code
(inventory.sync.PoolMirror, inventory.xapi over HTTP):

1. the initial full sync (get_all_records of every class + bulk writes),
   budget 10 s; then a resync over the existing rows;
2. changes applied from event.from: a backlog of changes made by other XAPI
   sessions (VM renames, start/shutdown cycles, host metrics), then drained
   by the event loop; objects applied per second, budget 5,000/s;
3. the same while the changes are being made (live), with the lag.
"""
from __future__ import annotations

import os
import sys
import threading
import time

from common import argument_parser, bench_database, start_xapisim, verdict

FULL_SYNC_BUDGET_S = 10.0
EVENTS_BUDGET_PER_S = 5000.0
BENCH_DB = "eac_bench"


def _make_changes(url: str, refs: list[str], kind: str, count: int) -> int:
    """One worker process: ``count`` changes through its own XAPI session (plain XML-RPC, as any client)."""
    import xmlrpc.client

    proxy = xmlrpc.client.ServerProxy(url, allow_none=True)
    session = proxy.session.login_with_password("root", "demo", "2.0", "bench")["Value"]
    made = 0
    try:
        for n in range(count):
            ref = refs[n % len(refs)]
            if kind == "rename":
                ok = proxy.VM.set_name_label(session, ref, f"bench-{os.getpid()}-{n}")["Status"] == "Success"
            else:  # a power cycle: VM, VBDs, VIFs, metrics and host memory change
                ok = proxy.VM.start(session, ref, False, True)["Status"] == "Success"
                ok = ok and proxy.VM.hard_shutdown(session, ref)["Status"] == "Success"
            made += ok
    finally:
        proxy.session.logout(session)
    return made


def generate(url: str, refs: list[str], kind: str, per_worker: int, workers: int) -> int:
    """Make changes from ``workers`` separate processes (so that they do not compete with the
    watcher code being measured for this process's GIL); returns how many were made."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        jobs = [pool.submit(_make_changes, url, refs[i::workers], kind, per_worker) for i in range(workers)]
        return sum(job.result() for job in jobs)


def drain(client, mirror, token: str, *, stop: threading.Event | None = None):
    """The watcher's event loop (EventPump + PoolMirror.apply) until XAPI has nothing more to say
    (once ``stop`` is set, if given).  Returns (next token, objects changed, events, rows written,
    seconds until the last batch was written)."""
    from inventory.watcher import EventPump

    objects = events = written = 0
    started = last = time.perf_counter()
    pump = EventPump(client, token, timeout=0.25)
    pump.start()
    try:
        while True:
            batch = pump.get(timeout=0.1)
            if not batch:
                if pump.caught_up.is_set() and (stop is None or stop.is_set()):
                    break
                continue
            result = mirror.apply(batch)
            events += len(batch)
            objects += len({(e["class"], e["ref"]) for e in batch})
            written += result.changed
            last = time.perf_counter()
    finally:
        pump.stop()
    return pump.token, objects, events, written, last - started


def main() -> int:
    parser = argument_parser(__doc__, hosts=1000, vms=10000)
    parser.add_argument("--changes", type=int, default=20000, help="VM renames in the backlog")
    parser.add_argument("--cycles", type=int, default=400, help="VM start/shutdown cycles in the backlog")
    parser.add_argument("--workers", type=int, default=4, help="processes making changes, a XAPI session each")
    args = parser.parse_args()

    bench_database(BENCH_DB)
    from django.db import connection

    from inventory.models import VBD, VM, Pool
    from inventory.services import pool_create
    from inventory.sync import PoolMirror
    from inventory.watcher import full_sync
    from inventory.xapi import pool_client

    print(f"bench_sync: xapisim --hosts {args.hosts} --vms {args.vms}, PostgreSQL database {BENCH_DB!r}")
    started = time.perf_counter()
    sim = start_xapisim("--hosts", str(args.hosts), "--vms", str(args.vms), op_delay=0)
    print(f"  simulator up in {time.perf_counter() - started:.1f} s at {sim.url}")
    ok = True
    try:
        Pool.objects.all().delete()
        pool = pool_create(name="bench", url=sim.url, username="root", password="demo")

        # 1. Initial full sync, then a resync over existing rows.
        with pool_client(pool) as client:
            mirror = PoolMirror(pool)
            t0 = time.perf_counter()
            token, result = full_sync(client, mirror)
            initial = time.perf_counter() - t0
            rows = sum(result.counts.values())
            print(f"  initial full sync: {rows} rows ({result.counts['host']} hosts, {result.counts['vm']} VMs, "
                  f"{result.counts['vbd']} VBDs, {result.counts['vdi']} VDIs) in {initial:.2f} s "
                  f"(budget {FULL_SYNC_BUDGET_S:.0f} s) {verdict(initial <= FULL_SYNC_BUDGET_S)}")
            ok &= initial <= FULL_SYNC_BUDGET_S
            assert VM.objects.filter(pool=pool).count() == result.counts["vm"]
            assert not VBD.objects.filter(pool=pool, vm__isnull=True).exists()
            t0 = time.perf_counter()
            token, _ = full_sync(client, mirror)
            print(f"  resync over existing rows: {time.perf_counter() - t0:.2f} s")

            vm_refs = [ref for ref, row in mirror.rows["vm"].items()]
            templates = set(VM.objects.filter(pool=pool).filter(is_a_template=True).values_list("ref", flat=True))
            dom0 = set(VM.objects.filter(pool=pool, is_control_domain=True).values_list("ref", flat=True))
            halted = set(VM.objects.filter(pool=pool, power_state="Halted").values_list("ref", flat=True))
            plain = [r for r in vm_refs if r not in templates and r not in dom0]
            startable = [r for r in plain if r in halted]

            # 2. Backlog: changes made while nobody listens, then drained.
            t0 = time.perf_counter()
            per_worker = max(1, args.changes // args.workers)
            renames = generate(sim.url, plain, "rename", per_worker, args.workers)
            cycles = generate(sim.url, startable, "cycle", max(1, args.cycles // args.workers), args.workers) \
                if startable and args.cycles else 0
            made = time.perf_counter() - t0
            print(f"  backlog made: {renames} renames + {cycles} start/shutdown cycles in {made:.1f} s "
                  f"({(renames + cycles) / made:,.0f} calls/s)")
            token, objects, events, written, took = drain(client, mirror, token)
            rate = objects / took if took else 0.0
            print(f"  backlog applied: {events} events, {objects} object changes ({written} rows written) in "
                  f"{took:.2f} s = {rate:,.0f} objects/s (budget {EVENTS_BUDGET_PER_S:,.0f}/s) "
                  f"{verdict(rate >= EVENTS_BUDGET_PER_S, missed='UNDER BUDGET')}")
            ok &= rate >= EVENTS_BUDGET_PER_S

            # 3. Live: the event loop follows while other sessions make changes.
        with pool_client(pool) as client:
            stop = threading.Event()
            done: list[int] = []
            maker = threading.Thread(target=lambda: done.append(
                generate(sim.url, plain, "rename", per_worker, args.workers)))
            box: dict[str, tuple] = {}

            def follow():
                try:
                    box["r"] = drain(client, mirror, token, stop=stop)
                finally:
                    connection.close()

            follower = threading.Thread(target=follow)
            t0 = time.perf_counter()
            follower.start()
            maker.start()
            maker.join()
            generated = time.perf_counter() - t0
            stop.set()
            follower.join()
            _, objects, events, written, took = box["r"]
            print(f"  live: {done[0]} renames made in {generated:.1f} s while following; {objects} object changes "
                  f"applied, the last {max(0.0, took - generated):.2f} s after the last change "
                  f"({objects / took:,.0f} objects/s, bounded by how fast changes are made)")
    finally:
        sim.stop()
        Pool.objects.all().delete()
        connection.close()
    print("bench_sync:", "all budgets met" if ok else "a budget was missed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
