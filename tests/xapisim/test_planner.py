"""Tests for the xapi-style HA failover planner (xapisim.planner)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xapisim.planner import (
    EXACT_MAX_POOL_SIZE,
    EXACT_SEQUENCE_LIMIT,
    PlanHost,
    PlanVM,
    approximate_plan_exists,
    exact_plan_exists,
    max_failures_tolerated,
    place_failed,
    plan_exists_for,
    uses_exact_check,
)

GIB = 1024**3


# --------------------------------------------------------------------------
# An independent, deliberately naive reference model
# --------------------------------------------------------------------------


def naive_bfd(free: dict[str, int], host_order: list[str], vms: list[tuple[str, int]]) -> dict[str, str | None]:
    """Biggest VM first, onto the host with the most free memory.

    Ties between hosts: the one used most recently in this packing, then the
    one listed first.  Ties between VMs: the one listed first.  ``free`` is
    updated in place.
    """
    last_used = {h: 0 for h in host_order}
    clock = 0
    result: dict[str, str | None] = {}
    for ref, size in sorted(vms, key=lambda vm: -vm[1]):  # sorted() is stable
        if not host_order:
            result[ref] = None
            continue
        best = host_order[0]
        for h in host_order[1:]:
            if (free[h], last_used[h]) > (free[best], last_used[best]):
                best = h
        if free[best] >= size:
            free[best] -= size
            clock += 1
            last_used[best] = clock
            result[ref] = best
        else:
            result[ref] = None
    return result


def naive_plan_exists(hosts: list[PlanHost], vms: list[PlanVM], n: int) -> bool:
    """Fail every ordered choice of n hosts, one at a time, re-packing as we go."""
    host_refs = [h.ref for h in hosts]
    free = {h.ref: h.capacity for h in hosts}
    where = {vm.ref: vm.host for vm in vms}
    size = {vm.ref: vm.memory for vm in vms}

    down = [(vm.ref, vm.memory) for vm in vms if vm.host not in free]
    if down:
        for ref, host in naive_bfd(free, host_refs, down).items():
            if host is None:
                return False
            where[ref] = host
    if n > len(hosts) or (n == len(hosts) and vms):
        return False

    for sequence in itertools.permutations(host_refs, n):
        free_now = dict(free)
        where_now = dict(where)
        alive = list(host_refs)
        for dead in sequence:
            alive.remove(dead)
            victims = [(ref, size[ref]) for ref in where_now if where_now[ref] == dead]
            for ref, host in naive_bfd(free_now, alive, victims).items():
                if host is None:
                    return False
                where_now[ref] = host
    return True


def linear_max(hosts: list[PlanHost], vms: list[PlanVM], total_hosts: int) -> int:
    best = 0
    for n in range(total_hosts + 1):
        if plan_exists_for(hosts, vms, n, total_hosts=total_hosts):
            best = n
        else:
            break
    return best


# --------------------------------------------------------------------------
# Random pools
# --------------------------------------------------------------------------


@st.composite
def pools(draw, max_hosts: int = 6, max_vms: int = 10, allow_down: bool = True):
    """Small pools with few distinct sizes, so that ties are common."""
    host_count = draw(st.integers(0, max_hosts))
    hosts = [PlanHost(f"h{i}", draw(st.integers(0, 12))) for i in range(host_count)]
    places = [h.ref for h in hosts] + (["down"] if allow_down else [])
    vms = []
    if places:
        for i in range(draw(st.integers(0, max_vms))):
            vms.append(PlanVM(f"v{i}", draw(st.integers(1, 8)), draw(st.sampled_from(places))))
    return hosts, vms


# --------------------------------------------------------------------------
# Agreement with the reference model
# --------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(pools())
def test_exact_check_matches_naive_enumeration_of_every_failure_sequence(pool):
    hosts, vms = pool
    for n in range(len(hosts) + 2):
        assert exact_plan_exists(hosts, vms, n) == naive_plan_exists(hosts, vms, n), n


@settings(max_examples=300, deadline=None)
@given(pools())
def test_small_pools_are_checked_exactly(pool):
    hosts, vms = pool
    for n in range(len(hosts) + 1):
        assert plan_exists_for(hosts, vms, n) == naive_plan_exists(hosts, vms, n), n


@settings(max_examples=300, deadline=None)
@given(pools(max_hosts=7, max_vms=14))
def test_approximation_never_claims_a_plan_the_exact_check_rejects(pool):
    hosts, vms = pool
    for n in range(len(hosts) + 1):
        if approximate_plan_exists(hosts, vms, n):
            assert exact_plan_exists(hosts, vms, n), n


@settings(max_examples=200, deadline=None)
@given(pools(max_hosts=10, max_vms=16), st.integers(0, 30))
def test_bisection_finds_the_same_maximum_as_a_linear_scan(pool, extra_hosts):
    hosts, vms = pool
    total = len(hosts) + extra_hosts
    assert max_failures_tolerated(hosts, vms, total_hosts=total) == linear_max(hosts, vms, total)


@settings(max_examples=200, deadline=None)
@given(pools(max_hosts=10, max_vms=16), st.integers(0, 30))
def test_surviving_more_failures_implies_surviving_fewer(pool, extra_hosts):
    hosts, vms = pool
    total = len(hosts) + extra_hosts
    answers = [plan_exists_for(hosts, vms, n, total_hosts=total) for n in range(total + 1)]
    assert answers == sorted(answers, reverse=True)


def fail_one_by_one(hosts: list[PlanHost], vms: list[PlanVM], sequence) -> bool:
    """Apply failures with one place_failed call per host; False if a VM is left out."""
    for dead in sequence:
        moves = place_failed(hosts, vms, {dead})
        if None in moves.values():
            return False
        size = {vm.ref: vm.memory for vm in vms}
        taken = {}
        for vm_ref, host_ref in moves.items():
            taken[host_ref] = taken.get(host_ref, 0) + size[vm_ref]
        hosts = [PlanHost(h.ref, h.capacity - taken.get(h.ref, 0)) for h in hosts if h.ref != dead]
        vms = [PlanVM(vm.ref, vm.memory, moves.get(vm.ref, vm.host)) for vm in vms]
    return True


@settings(max_examples=200, deadline=None)
@given(pools(max_hosts=5, max_vms=10, allow_down=False))
def test_when_a_plan_exists_failing_hosts_one_by_one_never_strands_a_vm(pool):
    hosts, vms = pool
    for n in range(1, len(hosts) + 1):
        if plan_exists_for(hosts, vms, n):
            for sequence in itertools.permutations([h.ref for h in hosts], n):
                assert fail_one_by_one(hosts, vms, sequence), sequence


@settings(max_examples=300, deadline=None)
@given(pools(max_hosts=8, max_vms=14, allow_down=False), st.data())
def test_place_failed_matches_naive_biggest_fit_decreasing(pool, data):
    hosts, vms = pool
    failed = data.draw(st.sets(st.sampled_from([h.ref for h in hosts]))) if hosts else set()
    survivors = [h.ref for h in hosts if h.ref not in failed]
    free = {h.ref: h.capacity for h in hosts}
    victims = [(vm.ref, vm.memory) for vm in vms if vm.host in failed]
    expected = naive_bfd(free, survivors, victims)
    assert place_failed(hosts, vms, failed) == expected


@settings(max_examples=200, deadline=None)
@given(pools(max_hosts=8, max_vms=14, allow_down=False), st.data())
def test_place_failed_never_overfills_a_surviving_host(pool, data):
    hosts, vms = pool
    failed = data.draw(st.sets(st.sampled_from([h.ref for h in hosts]))) if hosts else set()
    placement = place_failed(hosts, vms, failed)
    used = dict.fromkeys((h.ref for h in hosts), 0)
    size = {vm.ref: vm.memory for vm in vms}
    for vm_ref, host_ref in placement.items():
        if host_ref is not None:
            assert host_ref not in failed
            used[host_ref] += size[vm_ref]
    for host in hosts:
        assert used[host.ref] <= max(host.capacity, 0)


# --------------------------------------------------------------------------
# Exact / approximate switch
# --------------------------------------------------------------------------


def test_switch_threshold_follows_xapi():
    assert EXACT_MAX_POOL_SIZE == 32
    assert EXACT_SEQUENCE_LIMIT == 3500
    assert uses_exact_check(32, 2)  # 32 * 31 = 992 sequences
    assert not uses_exact_check(32, 3)  # 29,760 sequences
    assert not uses_exact_check(33, 0)  # more than 32 hosts: always approximate
    assert uses_exact_check(16, 3)  # 3,360
    assert not uses_exact_check(17, 3)  # 4,080
    assert uses_exact_check(7, 5)  # 2,520
    assert not uses_exact_check(7, 6)  # 5,040


def approximation_is_pessimistic_pool():
    """One big VM among many small ones: exact says yes, approximation no."""
    hosts = [PlanHost("h0", 8), PlanHost("h1", 8), PlanHost("h2", 0)]
    vms = [PlanVM("big", 8, "h2")] + [PlanVM(f"s{i}", 1, "h0") for i in range(4)]
    return hosts, vms


def test_pessimistic_approximation_rejects_what_the_exact_check_accepts():
    hosts, vms = approximation_is_pessimistic_pool()
    assert exact_plan_exists(hosts, vms, 1)
    assert not approximate_plan_exists(hosts, vms, 1)


def test_counting_offline_hosts_in_the_pool_size_selects_the_approximation():
    hosts, vms = approximation_is_pessimistic_pool()
    assert plan_exists_for(hosts, vms, 1, total_hosts=3)
    assert not plan_exists_for(hosts, vms, 1, total_hosts=33)
    assert max_failures_tolerated(hosts, vms, total_hosts=3) == 1
    assert max_failures_tolerated(hosts, vms, total_hosts=33) == 0


# --------------------------------------------------------------------------
# Behaviour on hand-made pools
# --------------------------------------------------------------------------


def test_failures_are_simulated_one_host_at_a_time_in_every_order():
    hosts = [PlanHost("h0", 1), PlanHost("h1", 5), PlanHost("h2", 7), PlanHost("h3", 8)]
    vms = [PlanVM("v0", 3, "h2"), PlanVM("v1", 6, "h0")]
    # Losing h0 and h2 together is fine: v1 -> h3, v0 -> h1.
    assert None not in place_failed(hosts, vms, {"h0", "h2"}).values()
    # But if h2 dies first, v0 takes h3 (most room), and when h0 dies next
    # no live host has 6 left for v1; xapi counts that order as a failure.
    assert plan_exists_for(hosts, vms, 1)
    assert not plan_exists_for(hosts, vms, 2)
    assert max_failures_tolerated(hosts, vms) == 1


def test_capacity_is_free_memory_net_of_resident_protected_vms():
    # Each host has 4 bytes left after its own VM; the other host's VM needs 4.
    hosts = [PlanHost("h0", 4), PlanHost("h1", 4)]
    vms = [PlanVM("v0", 4, "h0"), PlanVM("v1", 4, "h1")]
    assert plan_exists_for(hosts, vms, 1)
    assert place_failed(hosts, vms, {"h0"}) == {"v0": "h1"}


def test_pool_without_vms_tolerates_losing_every_host():
    hosts = [PlanHost(f"h{i}", 0) for i in range(4)]
    assert all(plan_exists_for(hosts, [], n) for n in range(5))
    assert max_failures_tolerated(hosts, []) == 4


def test_pool_without_hosts_or_vms_tolerates_nothing_more():
    assert plan_exists_for([], [], 0)
    assert not plan_exists_for([], [], 1)
    assert max_failures_tolerated([], []) == 0


def test_vms_with_no_live_host_make_the_pool_overcommitted():
    vms = [PlanVM("v0", 1, "gone")]
    assert not plan_exists_for([], vms, 0)
    assert max_failures_tolerated([], vms) == 0


def test_losing_as_many_hosts_as_the_pool_has_is_never_survivable_with_vms():
    hosts = [PlanHost("h0", 100), PlanHost("h1", 100)]
    vms = [PlanVM("v0", 1, "h0")]
    assert not plan_exists_for(hosts, vms, 2)
    assert not plan_exists_for(hosts, vms, 3)
    assert not plan_exists_for(hosts, vms, 3, total_hosts=40)


def test_vm_bigger_than_any_host_survives_only_while_its_host_does():
    hosts = [PlanHost("h0", 0), PlanHost("h1", 10), PlanHost("h2", 10)]
    vms = [PlanVM("huge", 64, "h0"), PlanVM("small", 1, "h1")]
    assert plan_exists_for(hosts, vms, 0)
    assert not plan_exists_for(hosts, vms, 1)
    assert max_failures_tolerated(hosts, vms) == 0
    assert place_failed(hosts, vms, {"h0"}) == {"huge": None}


def test_offline_vm_that_fits_nowhere_means_no_plan_even_without_failures():
    hosts = [PlanHost("h0", 10), PlanHost("h1", 10)]
    vms = [PlanVM("huge", 64, "dead-host")]
    assert not plan_exists_for(hosts, vms, 0)
    assert max_failures_tolerated(hosts, vms) == 0


def test_offline_vms_are_restarted_before_future_failures_are_considered():
    hosts = [PlanHost("h0", 6), PlanHost("h1", 4)]
    # The offline VM is first restarted on h0 (most room), leaving it 2: too
    # little for v1 (3) if h1 then fails.
    vms = [PlanVM("offline", 4, "dead-host"), PlanVM("v1", 3, "h1")]
    assert plan_exists_for(hosts, vms, 0)
    assert not plan_exists_for(hosts, vms, 1)
    # Without the offline VM there is room for v1 on h0.
    assert plan_exists_for(hosts, vms[1:], 1)


def test_place_failed_leaves_out_a_vm_that_does_not_fit_and_continues_with_smaller_ones():
    hosts = [PlanHost("dead", 0), PlanHost("a", 5), PlanHost("b", 3)]
    vms = [PlanVM("v6", 6, "dead"), PlanVM("v4", 4, "dead"), PlanVM("v3", 3, "dead"), PlanVM("v1", 1, "dead")]
    assert place_failed(hosts, vms, {"dead"}) == {"v6": None, "v4": "a", "v3": "b", "v1": "a"}


def test_place_failed_breaks_ties_towards_the_host_used_last_then_listed_first():
    hosts = [PlanHost("a", 4), PlanHost("b", 4), PlanHost("c", 4), PlanHost("dead", 0)]
    vms = [PlanVM("x", 2, "dead"), PlanVM("y", 2, "dead"), PlanVM("z", 2, "dead")]
    # x -> a (tie, listed first); then b and c have 4, a has 2: y -> b, z -> c.
    assert place_failed(hosts, vms, {"dead"}) == {"x": "a", "y": "b", "z": "c"}
    hosts = [PlanHost("a", 4), PlanHost("b", 2), PlanHost("dead", 0)]
    vms = [PlanVM("x", 2, "dead"), PlanVM("y", 1, "dead")]
    # x -> a leaves a at 2, tied with b; a was used last, so y -> a.
    assert place_failed(hosts, vms, {"dead"}) == {"x": "a", "y": "a"}


def test_place_failed_only_reports_vms_of_failed_hosts():
    hosts = [PlanHost("a", 10), PlanHost("b", 10)]
    vms = [PlanVM("on-a", 1, "a"), PlanVM("on-b", 1, "b")]
    assert place_failed(hosts, vms, {"a"}) == {"on-a": "b"}
    assert place_failed(hosts, vms, set()) == {}
    assert place_failed(hosts, vms, {"a", "b"}) == {"on-a": None, "on-b": None}


def test_negative_failure_count_is_rejected():
    with pytest.raises(ValueError):
        plan_exists_for([PlanHost("h0", 1)], [], -1)


def test_duplicate_refs_are_rejected():
    with pytest.raises(ValueError):
        plan_exists_for([PlanHost("h0", 1), PlanHost("h0", 2)], [], 0)
    with pytest.raises(ValueError):
        plan_exists_for([PlanHost("h0", 1)], [PlanVM("v", 1, "h0"), PlanVM("v", 1, "h0")], 0)


def test_a_large_pool_is_planned_quickly_with_the_approximation():
    hosts = [PlanHost(f"h{i}", 40 * GIB) for i in range(200)]
    vms = [PlanVM(f"v{i}", (1 + i % 8) * GIB, f"h{i % 200}") for i in range(2000)]
    # Biggest VM 8 GiB -> 5 slots per host; 10 VMs per host.
    # n failures survivable iff 10 n <= 5 (200 - n), i.e. n <= 66.
    assert max_failures_tolerated(hosts, vms) == 66
