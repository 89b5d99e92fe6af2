"""Failover plan benchmark: 32 hosts (exact) and 1,000 hosts / 10,000 VMs (approximate), budget 1 s each.

Run: .venv/bin/python benchmarks/bench_planner.py
Each case builds a pool, then times what the pool page does: whether the configured failures are
covered, the maximum failures tolerated (bisection, XAPI's rules) and the explanation of the
shortfalls (for 32 hosts and 2 failures: every one of the 992 ordered failure sequences, exactly).
"""
from __future__ import annotations

import random
import sys

from common import median_and_worst, timed, verdict

from protection.planner import Host, Planner, ProtectedVM, is_exact

GiB = 2**30
BUDGET = 1.0


def pool(hosts: int, vms: int, *, seed: int, fill: float, host_gib: int = 256) -> tuple[list[Host], list[ProtectedVM]]:
    """``hosts`` hosts of ``host_gib`` GiB and ``vms`` protected VMs of 1-16 GiB, about ``fill`` of the memory used."""
    rng = random.Random(seed)
    sizes = [rng.randint(1, 16) * GiB for _ in range(vms)]
    where = [rng.randrange(hosts) for _ in range(vms)]
    used = [0] * hosts
    for size, h in zip(sizes, where, strict=True):
        used[h] += size
    total = host_gib * GiB
    # Other (unprotected) VMs use memory too, so free memory is not simply total - protected.
    other = [int(total * fill) - u for u in used]
    host_list = [Host(f"h{i:04d}", max(0, total - used[i] - max(0, other[i])), f"host-{i + 1}") for i in range(hosts)]
    vm_list = [ProtectedVM(f"v{j:05d}", sizes[j], f"h{where[j]:04d}", f"vm-{j + 1}") for j in range(vms)]
    return host_list, vm_list


def measure(label: str, hosts: list[Host], vms: list[ProtectedVM], configured: int, runs: int = 5) -> bool:
    def plan():
        planner = Planner(hosts, vms)
        # The full scan: with collect, the exact check walks every failure sequence even when it holds.
        return planner.holds(configured), planner.max_failures(), planner.explain(configured)

    (holds, best, shortfalls), times = timed(plan, runs)
    median, worst = median_and_worst(times)
    mode = "exact" if is_exact(len(hosts), configured) else "approximate"
    ok = worst <= BUDGET
    print(
        f"{label}: {len(hosts)} hosts, {len(vms)} protected VMs, {configured} failure(s) configured ({mode}): "
        f"plan {'holds' if holds else 'broken'}, max tolerable {best}, {len(shortfalls)} shortfall scenario(s); "
        f"median {median * 1000:.1f} ms, worst {worst * 1000:.1f} ms (budget {BUDGET * 1000:.0f} ms) {verdict(ok)}"
    )
    return ok


def main() -> int:
    ok = True
    for fill, label in ((0.55, "32 hosts, plan holds"), (0.97, "32 hosts, plan broken (explained)")):
        hosts, vms = pool(32, 640, seed=1, fill=fill)
        ok &= measure(label, hosts, vms, configured=2)
    hosts, vms = pool(32, 2000, seed=4, fill=0.6, host_gib=1024)
    ok &= measure("32 hosts of 1 TiB, 2,000 VMs, plan holds", hosts, vms, configured=2)
    for fill, label in ((0.55, "1,000 hosts, plan holds"), (0.97, "1,000 hosts, plan broken (explained)")):
        hosts, vms = pool(1000, 10_000, seed=2, fill=fill)
        ok &= measure(label, hosts, vms, configured=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
