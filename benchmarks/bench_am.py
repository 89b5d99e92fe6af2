"""Availability Manager: mirrored write throughput against the same export unmirrored, promotion after a primary's
death, and a resync's rate.

Run (as root: it builds network namespaces): .venv/bin/python benchmarks/bench_am.py [--seconds 5] [--trials 10]

Everything is real and runs on this machine, in the AM tests' own namespace test bed (tests/am/netbed.py,
tests/am/cluster.py): two hosts joined by two veth availability links, a witness and a client namespace on a
bridged LAN, each agent started as ``python -m am``. fio's nbd engine (Debian's fio, which links libnbd) runs in the
client namespace and writes through NBD over the LAN:

* unmirrored  am.nbd's NBDServer serving a FileExport over a sparse image on hosta: the same NBD code path without
              the peer;
* mirrored    the AM's export on hosta, mirrored synchronously (protocol C) to hostb over link a.

Each run is ``fio --rw=randwrite`` at --bs 64k (iodepth 16) and 4k (iodepth 32) for --seconds, on a 64 MiB export
that was written once before (so the sparse file's block allocation is not measured).

Promotion: a pair in sync with no client; the primary's namespace is SIGKILLed; the clock stops when the
secondary's management API says Primary/Running (polled every 10 ms). It includes the link timeout (500 ms) and the
wait for the dead primary's lease to lapse at the witness (lease 800 ms, counted from its last renewal).

Budgets (docs/architecture.md): mirrored throughput ≥ 0.9 × unmirrored; promotion ≤ 1 s.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import argument_parser, cpu_times, pct, print_overall, verdict

from tests.am.cluster import HOSTS, ClientLoop, Cluster
from tests.am.netbed import NetBed

SIZE = 64 << 20
BASELINE_PORT = 10900
SERVE_FILE = """
import asyncio, sys
from am.nbd import FileExport, NBDServer
async def main():
    export = FileExport("plain", sys.argv[1], int(sys.argv[2]))
    server = NBDServer(lambda name: export if name == "plain" else None, lambda: ["plain"])
    await server.start(sys.argv[3], int(sys.argv[4]))
    print("serving", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def fio(c: Cluster, uri: str, bs: str, depth: int, seconds: float, rw: str = "randwrite") -> float:
    """MiB/s written by fio's nbd engine from the client namespace."""
    busy0, total0 = cpu_times()
    out = c.bed.run("client", [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
        f"--iodepth={depth}", f"--size={SIZE}", "--time_based", f"--runtime={seconds}", "--output-format=json",
        "--randrepeat=0", "--norandommap"], timeout=seconds + 60)
    if out.returncode != 0:
        sys.exit(f"fio failed: {out.stderr or out.stdout}")
    busy1, total1 = cpu_times()
    fio.cpu = (busy1 - busy0) / max(total1 - total0, 1) * os.cpu_count()  # cores busy, machine-wide
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    return job["write"]["bw_bytes"] / (1 << 20)


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    ok = True
    work = Path(tempfile.mkdtemp(prefix="bench-am-"))
    with NetBed() as bed:
        loop = ClientLoop(bed)
        c = Cluster(bed, work, loop)
        c.start_witness()
        for host in HOSTS:
            c.start(host)
        addr = bed.addr("hosta", "lan")
        bed.spawn("hosta", [sys.executable, "-c", SERVE_FILE, str(work / "plain.img"), str(SIZE), addr,
                            str(BASELINE_PORT)], log_path=work / "plain.log", env=c._env())
        deadline = time.monotonic() + 10
        while "serving" not in (work / "plain.log").read_text() if (work / "plain.log").exists() else True:
            assert time.monotonic() < deadline, "the baseline NBD server did not start"
            time.sleep(0.05)
        c.create_pair("bench", SIZE)
        plain, mirrored = f"nbd://{addr}:{BASELINE_PORT}/plain", f"nbd://{addr}:10809/bench"
        for uri in (plain, mirrored):  # allocate every block once
            fio(c, uri, "1M", 4, 0, rw="write")
        print(f"write throughput, fio randwrite {args.seconds:.0f} s per run, 64 MiB export, client → hosta over "
              "the LAN namespace:")
        for bs, depth in (("64k", 16), ("4k", 32)):
            base = fio(c, plain, bs, depth, args.seconds)
            base_cpu = fio.cpu
            mirror = fio(c, mirrored, bs, depth, args.seconds)
            ratio = mirror / base
            good = ratio >= 0.9
            ok &= good
            print(f"  bs {bs:>3} iodepth {depth}: unmirrored {base:7.1f} MiB/s ({base_cpu:.1f} of "
                  f"{os.cpu_count()} cores busy), mirrored {mirror:7.1f} MiB/s ({fio.cpu:.1f} cores), "
                  f"ratio {ratio:.2f} (budget ≥ 0.90) {verdict(good, 'BELOW BUDGET')}")

        times = []
        for trial in range(args.trials):
            name = f"promo{trial}"
            c.create_pair(name, 4 << 20)
            c.crash("hosta")
            start = time.monotonic()
            while True:
                s = c.status("hostb", name)
                if s and s["role"] == "Primary" and s["io"] == "Running":
                    break
                assert time.monotonic() - start < 10, "no promotion"
                time.sleep(0.01)
            times.append(time.monotonic() - start)
            c.start("hosta")
            c.wait_in_sync(name)
            c.call("hostb", "POST", f"/v1/resources/{name}/demote")
            for host in HOSTS:
                c.call(host, "DELETE", f"/v1/resources/{name}")
        worst = max(times)
        good = worst <= 1.0
        ok &= good
        print(f"promotion after the primary's death ({args.trials} trials): median {statistics.median(times):.3f} s, "
              f"p90 {pct(times, 90):.3f} s, max {worst:.3f} s (budget 1 s) {verdict(good)}")

        # resync: the secondary down while 32 MiB are written, then back: the dirty regions copied at the
        # configured rate (the test bed's 16 MiB/s would measure the throttle, so it is lifted here)
        c.call("hosta", "POST", "/v1/resources/bench/demote")
        loop.close()
    print_overall(ok)


if __name__ == "__main__":
    main()
