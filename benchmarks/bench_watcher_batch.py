"""The watcher's cost per batch of a VM power operation: write, announce, judge (one pool of bench_pools).

Run: .venv/bin/python benchmarks/bench_watcher_batch.py [--hosts 25] [--vms 2500] [--ops 200] [--rounds 2]
     (DATABASE_URL as for the tests: the benchmark makes a database of its own there, eac_bench_watcher)

Under bench_pools' load each of nineteen busy pools sees a power operation every tenth of a second or so, and its
watcher applies about one operation a batch: what a batch costs the watcher is what that load costs it. Here, on
one ``python -m xapisim`` as bench_pools starts each of its pools (``--hosts 25 --vms 2500``, seed 1), with the
watcher's own code and the machine's PostgreSQL and Redis:

1. a full sync (``inventory.watcher.full_sync``) into the benchmark's database;
2. ``--ops`` power operations (``VM.hard_shutdown`` then ``VM.start`` of running guests, from another XAPI session),
   the ``event.from`` answer after each one recorded as the watcher reads it (its classes and fields): one batch
   each (a VM, its host, its disks and NICs);
3. the recorded batches applied ``--rounds`` times over, in order (the rows go back and forth between the two states
   as they did), as the watcher's writer thread handles a batch: ``PoolMirror.apply`` (one transaction; the
   message to the pool's channel-layer group after commit, over Redis), then ``_observe`` (protection) when the
   batch holds something to judge.

Printed: CPU of this process (process_time: every thread, the sender's included; not PostgreSQL's or Redis's) and
wall time per batch, first for the whole, then without protection, then with neither the message nor protection
(so the parts are the differences), and the statements a batch sends to PostgreSQL. Figures only: nothing else
should run meanwhile (``flock /tmp/eac-bench.lock``), and even so they vary by some 20% between runs.
"""
from __future__ import annotations

import time
from collections import Counter

from common import argument_parser, bench_database, drop_bench_database, start_xapisim

BENCH_DB = "eac_bench_watcher"


def main() -> int:
    parser = argument_parser(__doc__, hosts=25, vms=2500)
    parser.add_argument("--ops", type=int, default=200, help="power operations recorded (one batch each)")
    parser.add_argument("--rounds", type=int, default=2, help="times the recorded batches are applied over")
    args = parser.parse_args()
    base = bench_database(BENCH_DB, fresh=True, channel_prefix="eacbenchwatcher")

    from django.db import connection

    import eac.realtime
    from inventory.services import pool_create
    from inventory.sync import EVENT_CLASSES, RECORD_FIELDS, PoolMirror
    from inventory.watcher import _observe, full_sync
    from inventory.xapi import connect, pool_client

    sim = start_xapisim("--hosts", str(args.hosts), "--vms", str(args.vms), "--seed", "1", "--listen-hosts", "1",
                        op_delay=0)
    try:
        pool = pool_create(name="bench-watcher", url=sim.url, username="root", password="demo")
        client = pool_client(pool)
        mirror = PoolMirror(pool)
        token, _ = full_sync(client, mirror)
        with connect(sim.url, "root", "demo") as other:
            running = [ref for ref, rec in other.call("VM.get_all_records").items()
                       if not rec["is_control_domain"] and not rec["is_a_template"]
                       and rec["power_state"] == "Running"][: (args.ops + 1) // 2]
            batches: list[list[dict]] = []
            for ref in running:
                for method, extra in (("VM.hard_shutdown", ()), ("VM.start", (False, False))):
                    other.call(method, ref, *extra)
                    answer = client.event_from(list(EVENT_CLASSES), token, 0.0, fields=RECORD_FIELDS)
                    token = answer["token"]
                    batches.append(answer["events"])
        client.logout()
        classes = Counter(event["class"] for events in batches for event in events)
        print(f"bench_watcher_batch: {len(batches)} batches recorded on a pool of {args.hosts} hosts / {args.vms} "
              f"VMs, {sum(classes.values()) / len(batches):.1f} events each "
              f"({', '.join(f'{n / len(batches):.1f} {cls}' for cls, n in classes.most_common())})")

        statements = Counter()

        def count(execute, sql, params, many, context):
            statements["all"] += 1
            return execute(sql, params, many, context)

        send_now = eac.realtime.send_now
        for label, observe, send in (("write, announce, judge", True, True), ("write, announce", False, True),
                                     ("write", False, False)):
            eac.realtime.send_now = send_now if send else (lambda messages: None)
            statements.clear()
            cpu0, wall0 = time.process_time(), time.monotonic()
            with connection.execute_wrapper(count):
                for _ in range(args.rounds):
                    for events in batches:
                        result = mirror.apply(events)
                        if observe and result.judged_uuids:
                            _observe(pool, result.judged_uuids)
            n = args.rounds * len(batches)
            cpu, wall = (time.process_time() - cpu0) / n * 1000, (time.monotonic() - wall0) / n * 1000
            print(f"  {label:24} {cpu:5.2f} ms CPU, {wall:5.2f} ms wall a batch; "
                  f"{statements['all'] / n:.1f} statements (and the transaction's BEGIN and COMMIT)")
        eac.realtime.send_now = send_now
    finally:
        sim.stop()
        drop_bench_database(base, BENCH_DB)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
