"""The tree's labels of many pools: one read of the labels a page shows of the pools it does not show in detail.

Run: .venv/bin/python benchmarks/bench_labels.py [--pools 20] [--vms 50000] [--vms-per-host 100] [--runs 20]

Each pool is a ``python -m xapisim`` (seeds 1..N), synced into a PostgreSQL database of the benchmark's own
(``eac_bench_labels``) with the watcher's own full sync, then stopped; the tables are analyzed, as autovacuum does
soon after such a load. With the first pool shown in detail, the live consumer reads the labels of the others
(``console.nodes.pool_overviews``: pools, hosts, VM counts per host, marks) whenever their VMs start or stop, and the
Protected VM Summary's counts (``protection.selectors.vm_status_counts``) when VMs or disks come or go. Printed: the
median and worst of ``--runs`` reads of each, of the other pools together and of one pool alone; and the same read
with PostgreSQL's JIT left on (the server's default; the console's sessions turn it off, ``eac/settings.py``).
Figures only: bench_pools measures what they cost a page under load.
"""
from __future__ import annotations

import time

from common import argument_parser, bench_database, drop_bench_database, median_and_worst, start_xapisim, timed

BENCH_DB = "eac_bench_labels"


def main() -> int:
    parser = argument_parser(__doc__, vms=50_000)
    parser.add_argument("--pools", type=int, default=20, help="simulated pools, synced one after the other")
    parser.add_argument("--vms-per-host", type=int, default=100, help="a pool's hosts: its VMs / this")
    parser.add_argument("--runs", type=int, default=20, help="reads timed of each kind")
    args = parser.parse_args()
    if args.pools < 2 or args.vms < args.pools:
        parser.error("give at least two pools and a VM per pool")

    base = bench_database(BENCH_DB, fresh=True)
    from django.db import connection

    from console.nodes import pool_overviews
    from inventory.services import pool_create
    from inventory.sync import PoolMirror
    from inventory.watcher import full_sync
    from inventory.xapi import pool_client
    from protection.selectors import vm_status_counts

    per_pool = args.vms // args.pools
    hosts = max(1, per_pool // args.vms_per_host)
    print(f"bench_labels: {args.pools} pools of {per_pool:,} VMs and {hosts} hosts, database {BENCH_DB!r}")
    try:
        started = time.perf_counter()
        pks = []
        for i in range(args.pools):
            sim = start_xapisim("--hosts", str(hosts), "--vms", str(per_pool), "--seed", str(i + 1), op_delay=0)
            try:
                pool = pool_create(name=f"bench-{i + 1:02d}", url=sim.url, username="root", password="demo")
                with pool_client(pool) as client:
                    full_sync(client, PoolMirror(pool))
                pks.append(pool.pk)
            finally:
                sim.stop()
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
        print(f"  synced and analyzed in {time.perf_counter() - started:.0f} s")

        others = pks[1:]
        reads = [
            (f"labels of the {len(others)} other pools (pool_overviews)", lambda: pool_overviews(others)),
            ("labels of one pool", lambda: pool_overviews(pks[:1])),
            (f"summary counts of the {len(others)} other pools (vm_status_counts)", lambda: vm_status_counts(others)),
        ]
        for jit in ("off", "on"):
            with connection.cursor() as cursor:
                cursor.execute(f"SET jit = {jit}")
            print(f"\n  PostgreSQL JIT {jit}" + (" (the console's sessions)" if jit == "off" else
                                                " (the server's default)"))
            for label, read in reads:
                read()  # warm: the plan cache and the pages in PostgreSQL's buffers
                _, times = timed(read, args.runs)
                median, worst = median_and_worst(times)
                print(f"    {label}: median {median * 1000:.1f} ms, worst {worst * 1000:.1f} ms")
        print("\nfigures only")
        return 0
    finally:
        drop_bench_database(base, BENCH_DB)


if __name__ == "__main__":
    raise SystemExit(main())
