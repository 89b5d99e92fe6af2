"""The console's failover planner: against brute force, its own approximation, and xapisim's answers."""
from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protection.planner import Host, Planner, ProtectedVM, exhaustive_holds, is_exact, shortfall_text
from tests.support import start_sim, xapi_login

GiB = 2**30


# -- a deliberately naive model of XAPI's rules ---------------------------------------------------


def naive_place(free: dict[str, int], order: list[str], last: dict[str, int], clock: list[int],
                vms: list[tuple[str, int]]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for key, size in sorted(vms, key=lambda v: -v[1]):
        best = None
        for h in order:
            if best is None or (free[h], last[h]) > (free[best], last[best]):
                best = h
        if best is not None and free[best] >= size:
            free[best] -= size
            clock[0] += 1
            last[best] = clock[0]
            out[key] = best
        else:
            out[key] = None
    return out


def naive_holds(hosts: list[Host], vms: list[ProtectedVM], n: int) -> bool:
    order = [h.key for h in hosts]
    free = {h.key: h.capacity for h in hosts}
    where = {vm.key: vm.host for vm in vms}
    size = {vm.key: vm.memory for vm in vms}
    down = [(vm.key, vm.memory) for vm in vms if vm.host not in free]
    if down:
        placed = naive_place(free, order, {h: 0 for h in order}, [0], down)
        if None in placed.values():
            return False
        where.update(placed)
    if n > len(hosts) or (n == len(hosts) and vms):
        return False
    for sequence in itertools.permutations(order, n):
        f, w, alive = dict(free), dict(where), list(order)
        for dead in sequence:
            alive.remove(dead)
            victims = [(k, size[k]) for k, h in w.items() if h == dead]
            placed = naive_place(f, alive, {h: 0 for h in alive}, [0], victims)
            if None in placed.values():
                return False
            w.update(placed)
    return True


@st.composite
def small_pools(draw):
    count = draw(st.integers(1, 5))
    hosts = [Host(f"h{i}", draw(st.integers(0, 12)) * GiB, f"host-{i}") for i in range(count)]
    vms = []
    for j in range(draw(st.integers(0, 8))):
        where = draw(st.sampled_from([h.key for h in hosts] + [None]))
        vms.append(ProtectedVM(f"v{j}", draw(st.integers(1, 6)) * GiB, where, f"vm-{j}"))
    return hosts, vms


@settings(max_examples=300, deadline=None)
@given(small_pools())
def test_planner_agrees_with_brute_force_on_small_pools(pool):
    hosts, vms = pool
    plan = Planner(hosts, vms)
    verdicts = [naive_holds(hosts, vms, n) for n in range(len(hosts) + 1)]
    assert [plan.holds(n) for n in range(len(hosts) + 1)] == verdicts
    expected_max = max((n for n, ok in enumerate(verdicts) if ok), default=0)
    assert plan.max_failures() == expected_max


@settings(max_examples=300, deadline=None)
@given(small_pools(), st.integers(1, 4))
def test_explanation_lists_vms_exactly_when_the_plan_fails(pool, n):
    hosts, vms = pool
    plan = Planner(hosts, vms)
    if plan.overcommitted or n > len(hosts):
        return
    shortfalls = plan.explain(n)
    assert (not shortfalls) == plan.holds(n)
    for shortfall in shortfalls:
        assert shortfall.vms and shortfall.missing == sum(m for _, _, m in shortfall.vms)
        assert 1 <= len(shortfall.failed) <= n
        assert "cannot restart" in shortfall_text(shortfall)


# Built and validated here, at import: validating it inside the test imports hypothesis's random module while
# hypothesis has raised the recursion limit, where CPython 3.11.7's compile() can fail with "AST constructor
# recursion depth mismatch" (seen once in a full run, when that module had no .pyc yet).
RANDOMS = st.randoms(use_true_random=False)
RANDOMS.validate()


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 7), st.integers(0, 30), st.integers(1, 3), RANDOMS)
def test_approximation_never_promises_more_than_the_exact_check(count, vm_count, n, rng):
    hosts = [Host(f"h{i}", rng.randint(0, 40) * GiB) for i in range(count)]
    vms = [ProtectedVM(f"v{j}", rng.randint(1, 8) * GiB, rng.choice(hosts).key) for j in range(vm_count)]
    big = Planner(hosts, vms, total_hosts=64)  # more than 32 hosts in the pool: approximate
    assert not is_exact(64, n)
    if n < count and big.holds(n):
        assert exhaustive_holds(hosts, vms, n)


def test_a_host_failure_that_strands_a_vm_is_explained_with_names_and_missing_memory():
    hosts = [Host("a", 2 * GiB, "xcp-a"), Host("b", 1 * GiB, "xcp-b")]
    vms = [ProtectedVM("big", 4 * GiB, "a", "database"), ProtectedVM("small", 1 * GiB, "b", "web")]
    plan = Planner(hosts, vms)
    assert plan.max_failures() == 0
    texts = [shortfall_text(s) for s in plan.explain(1)]
    assert "If host xcp-a fails, database (4.0 GiB) cannot restart: 4.0 GiB missing." in texts
    report = plan.report(1)
    assert not report.holds and report.max_tolerable == 0 and report.shortfalls


def test_a_large_pool_uses_the_approximation_and_explains_the_busiest_hosts():
    rng = random.Random(5)
    hosts = [Host(f"h{i}", 2 * GiB) for i in range(40)]
    vms = [ProtectedVM(f"v{j}", rng.randint(1, 4) * GiB, hosts[j % 40].key) for j in range(400)]
    plan = Planner(hosts, vms)
    assert not plan.holds(1)
    (shortfall,) = plan.explain(1)
    assert shortfall.approximate and "Estimated" in shortfall.reason


# -- against xapisim, through XAPI calls only ------------------------------------------------------


@pytest.fixture(scope="module")
def generated_sim():
    sim = start_sim(hosts=5, vms=100, seed=7)
    yield sim
    sim.stop()


def _planner_from_xapi(hosts: dict, metrics: dict, vms: dict, configuration: dict[str, str]) -> Planner:
    """Build the planner's input from XAPI records, as the console does from its inventory."""
    live = sorted(
        (ref for ref, h in hosts.items() if h["enabled"] and metrics[h["metrics"]]["live"]),
        key=lambda ref: hosts[ref]["uuid"],
    )
    plan_hosts = [Host(ref, int(metrics[hosts[ref]["metrics"]]["memory_free"])) for ref in live]
    protected = []
    for ref, priority in configuration.items():
        if priority == "restart":
            vm = vms[ref]
            where = vm["resident_on"] if vm["resident_on"] in live else None
            protected.append(ProtectedVM(vm["uuid"], int(vm["memory_static_max"]) + int(vm["memory_overhead"]), where))
    protected.sort(key=lambda v: v.key)
    return Planner(plan_hosts, protected, total_hosts=len(hosts))


def test_planner_maximum_agrees_with_xapisim_for_random_protected_sets(generated_sim):
    import XenAPI

    session = xapi_login(generated_sim.url)
    try:
        records = session.xenapi.VM.get_all_records()
        hosts = session.xenapi.host.get_all_records()
        metrics = session.xenapi.host_metrics.get_all_records()
        agile = []
        for ref, vm in records.items():
            if vm["is_a_template"] or vm["is_control_domain"] or vm["is_a_snapshot"]:
                continue
            try:
                session.xenapi.VM.assert_agile(ref)
            except XenAPI.Failure:
                continue
            agile.append(ref)
        assert len(agile) >= 5, "the generated pool should have agile VMs"
        rng = random.Random(11)
        seen = set()
        for _ in range(25):
            chosen = rng.sample(agile, rng.randint(1, len(agile)))
            configuration = {ref: "restart" for ref in chosen}
            theirs = int(session.xenapi.pool.ha_compute_hypothetical_max_host_failures_to_tolerate(configuration))
            ours = _planner_from_xapi(hosts, metrics, records, configuration).max_failures()
            assert ours == theirs, f"{len(chosen)} VMs protected"
            seen.add(theirs)
        assert len(seen) > 1, f"every sample gave {seen}: the comparison would not catch much"
    finally:
        session.xenapi.session.logout()
