"""Timings of the xapi-style HA planner (xapisim.planner).

Run: .venv/bin/python benchmarks/bench_planner_xapisim.py
"""

from __future__ import annotations

import random
import sys

from common import median_and_worst, print_overall, timed, verdict

from xapisim.planner import (
    PlanHost,
    PlanVM,
    max_failures_tolerated,
    plan_exists_for,
    uses_exact_check,
)

GIB = 1024**3
BUDGET_S = 1.0
REPEATS = 5


def make_pool(host_count: int, vm_count: int, host_gib: int, seed: int) -> tuple[list[PlanHost], list[PlanVM]]:
    """Hosts with ``host_gib`` GiB free, VMs of 1-8 GiB spread round-robin over them."""
    rng = random.Random(seed)
    hosts = [PlanHost(f"host-{i:04d}", host_gib * GIB) for i in range(host_count)]
    vms = [PlanVM(f"vm-{i:05d}", rng.randint(1, 8) * GIB, hosts[i % host_count].ref) for i in range(vm_count)]
    return hosts, vms


def report(label: str, fn) -> bool:
    """Time ``fn`` over REPEATS runs; print its result, median and worst wall time against the budget."""
    result, times = timed(fn, REPEATS)
    median, worst = median_and_worst(times)
    ok = worst <= BUDGET_S
    print(f"  {label:<58} -> {result!s:>5}   median {median * 1000:8.1f} ms   worst {worst * 1000:8.1f} ms   "
          f"{verdict(ok)}")
    return ok


def main() -> int:
    print(f"xapisim.planner benchmark (budget {BUDGET_S:.0f} s each, {REPEATS} runs, wall clock)")
    ok = True

    # Tight enough that the answer is 2: the bisection probes n = 16, 8, 4
    # (approximate, fail), n = 2 (exact, passes, so all 992 sequences are
    # simulated) and n = 3 (approximate, fails).
    hosts, vms = make_pool(32, 320, host_gib=12, seed=1)
    exact_levels = [n for n in range(33) if uses_exact_check(32, n)]
    print(f"\n32 hosts, 320 VMs (exact check used for n in {exact_levels}, approximation above)")
    ok &= report("max_failures_tolerated (bisection through exact n=2)", lambda: max_failures_tolerated(hosts, vms))
    ok &= report("plan_exists_for n=2 (exact: 992 failure sequences)", lambda: plan_exists_for(hosts, vms, 2))

    hosts, vms = make_pool(16, 160, host_gib=64, seed=2)
    print("\n16 hosts, 160 VMs (largest exact workload below the 3,500-sequence limit)")
    ok &= report("plan_exists_for n=3 (exact: 3,360 failure sequences)", lambda: plan_exists_for(hosts, vms, 3))

    hosts, vms = make_pool(1000, 10_000, host_gib=64, seed=3)
    print("\n1,000 hosts, 10,000 VMs (approximation: more than 32 hosts)")
    ok &= report("max_failures_tolerated", lambda: max_failures_tolerated(hosts, vms))

    print_overall(ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
