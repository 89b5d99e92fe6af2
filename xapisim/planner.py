"""HA failover planning as xapi does it: memory only, biggest-fit-decreasing.

This module re-implements, in plain Python, the model that xapi (xen-api,
``ocaml/xapi/xapi_ha_vm_failover.ml`` and ``ocaml/xapi/binpack.ml``) uses to
decide whether a pool can survive ``n`` host failures and how many failures it
can tolerate (``ha_plan_exists_for``).  Only memory is considered; CPU, storage
and network are ignored, exactly as in xapi.

Inputs
======

``PlanHost(ref, capacity)``
    One *live* host (xapi leaves out hosts that are offline or disabled).

    ``capacity`` is the host's free memory **net of everything already
    running on it, protected VMs included**.  Do *not* add back the memory of
    the protected VMs resident on the host.  xapi computes it as::

        capacity = host_metrics.memory_total
                   - host.memory_overhead            (Xen + dom0 overhead)
                   - sum(memory of every VM resident_on or
                         scheduled_to_be_resident_on the host,
                         protected or not, at memory_static_max
                         + VM memory_overhead)

    clamped at zero.  Protected VMs are then *also* listed as ``PlanVM`` s on
    their current host; the planner only moves them when that host fails, at
    which point their memory is taken from the host they land on.  (A host's
    own free memory never grows when a neighbour fails: xapi does not model a
    failed host's resident VMs as releasing memory anywhere else.)

    Protected VMs that are not agile (pinned to one host by local storage or
    similar) are not ``PlanVM`` s: xapi treats them as fixed overhead on the
    host they are pinned to, so subtract their memory from that host's
    ``capacity`` if they are not already running there.

``PlanVM(ref, memory, host)``
    One agile protected VM (``ha_restart_priority = "restart"`` and
    ``ha_always_run``).  ``memory`` is what xapi reserves to start it:
    ``memory_static_max`` plus the VM's memory overhead.  ``host`` is the ref
    of the host it runs on (or is scheduled to run on).  If ``host`` is not
    the ref of one of the given live hosts, the VM is treated as a protected
    VM that is currently down and must be restarted first: like xapi, the
    planner packs such VMs onto the live hosts (biggest-fit-decreasing)
    *before* reasoning about future failures, and if any of them does not fit
    no plan exists for any ``n`` (the pool is already overcommitted).

What is checked
===============

*Placement* (``place_failed``) is biggest-fit-decreasing: the VMs to place are
taken biggest first, and each one goes to the surviving host that currently
has the most free memory; if it does not fit there it fits nowhere and is left
out (``None``), and packing carries on with the next, smaller VM.  Ties are
broken deterministically: among hosts with equal free memory the one that
received a VM most recently during this packing wins, otherwise the one
listed first; among equally sized VMs the one listed first goes first.  (xapi
sorts hosts and VMs by uuid before planning, so pass them in uuid order to
reproduce its choices exactly.)

*Can the pool survive n failures?* (``plan_exists_for``)

1. Never if fewer than ``n`` live hosts exist, or exactly ``n`` exist and
   there is at least one protected VM.
2. Exact check (small pools): for every set of ``n`` live hosts and for every
   order in which those hosts could fail, fail them one at a time; at each
   failure the VMs on the failed host (including any that an earlier failure
   moved there) are packed biggest-fit-decreasing onto the hosts still alive
   at that moment, and a VM that does not fit means no plan.
3. Approximate check (large pools), deliberately pessimistic: assume every
   failed VM is as big as the biggest protected VM, that the ``n`` hosts
   carrying the most protected VMs fail (so the number of VMs to restart is
   the largest possible), and that the ``n`` hosts with the most room fail
   (so the room left is the smallest possible).  Room is counted in
   "slots" of the biggest VM size per surviving host.  A plan exists if the
   VMs to restart fit in the slots left.  Whenever this says yes, the exact
   check also says yes (tested in ``tests/xapisim/test_planner.py``).

Which of 2 and 3 is used depends on the total number of hosts in the pool
and on ``n``: see ``uses_exact_check``, ``EXACT_MAX_POOL_SIZE`` and
``EXACT_SEQUENCE_LIMIT``.

*Maximum failures tolerated* (``max_failures_tolerated``) is found by
bisection over ``0 .. total_hosts``, assuming that surviving ``k`` failures
implies surviving fewer.  As in xapi, the answer is ``0`` both when the pool
can only survive no failure and when it cannot even run its protected VMs
now; use ``plan_exists_for(hosts, vms, 0)`` to tell those apart.

``total_hosts`` (keyword-only, optional) is the number of hosts in the pool
including dead or disabled ones; xapi uses it, not the number of live hosts,
to choose between the exact and approximate checks and as the upper end of
the bisection.  It defaults to ``len(hosts)``.  (With a corosync cluster xapi
lowers the bisection's upper end to the quorum limit; that is not modelled.)

Simultaneous failures
=====================

The guarantee is about hosts failing one after another, each failure being
handled by its own packing.  Failing several hosts at once and packing all
their VMs in a single ``place_failed`` call is a different packing and, in
rare cases, leaves a VM out even though ``plan_exists_for`` said yes (and,
more often, succeeds where the sequential check said no).  A simulator that
wants the planner's promise to hold should apply a multi-host failure as a
series of single-host ``place_failed`` calls, updating capacities and VM
hosts after each one.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "EXACT_MAX_POOL_SIZE",
    "EXACT_SEQUENCE_LIMIT",
    "PlanHost",
    "PlanVM",
    "approximate_plan_exists",
    "exact_plan_exists",
    "max_failures_tolerated",
    "place_failed",
    "plan_exists_for",
    "uses_exact_check",
]

EXACT_MAX_POOL_SIZE = 32
"""Pools with more hosts than this always use the approximate check.

xapi never enumerates failure scenarios for a pool of more than 32 hosts
(counting every host of the pool, live or not), whatever ``n`` is.
"""

EXACT_SEQUENCE_LIMIT = 3500
"""Upper bound (exclusive) on the failure scenarios the exact check may visit.

For a pool of ``H`` hosts the exact check visits every ordered choice of
``n`` failing hosts, i.e. ``H! / (H - n)!`` sequences (xapi computes it as
"H choose n" times ``n!``).  xapi runs the exact check only when that number
is strictly below 3500 (and the pool has at most ``EXACT_MAX_POOL_SIZE``
hosts); otherwise, including when the count would not fit in 64 bits, it
falls back to the approximation.  For 32 hosts that means exact for
``n <= 2`` (992 sequences) and approximate from ``n = 3`` (29,760).
"""


@dataclass(frozen=True)
class PlanHost:
    ref: str
    capacity: int  # bytes free for protected VMs on this host if it survives


@dataclass(frozen=True)
class PlanVM:
    ref: str
    memory: int  # bytes the VM needs
    host: str  # ref of the host it currently runs on


def uses_exact_check(total_hosts: int, n: int) -> bool:
    """True if xapi would check ``n`` failures exactly in a pool of ``total_hosts`` hosts."""
    if total_hosts > EXACT_MAX_POOL_SIZE:
        return False
    return math.perm(total_hosts, n) < EXACT_SEQUENCE_LIMIT


# --------------------------------------------------------------------------
# Biggest-fit-decreasing
# --------------------------------------------------------------------------


def _pack(
    free: list[int],
    bins: Iterable[int],
    items: Iterable[tuple[int, int]],
    *,
    stop_on_miss: bool = False,
) -> list[tuple[int, int]] | None:
    """Pack ``items`` biggest-fit-decreasing into ``bins``.

    ``free`` holds the free memory of every host, by host index, and is
    updated in place.  ``bins`` are the indices of the hosts that may receive
    items, in tie-break order.  ``items`` are ``(vm_index, memory)`` pairs
    already in packing order (biggest first).  Returns ``(vm_index,
    host_index)`` pairs, ``host_index`` being ``-1`` for an item that fits
    nowhere; with ``stop_on_miss`` returns ``None`` at the first such item.
    """
    # Max-heap on (free memory, most recently used, listed first).
    heap = [(-free[h], 0, position, h) for position, h in enumerate(bins)]
    heapq.heapify(heap)
    stamp = 0
    placed: list[tuple[int, int]] = []
    for vm, memory in items:
        if not heap or free[heap[0][3]] < memory:
            if stop_on_miss:
                return None
            placed.append((vm, -1))
            continue
        _, _, position, h = heap[0]
        free[h] -= memory
        stamp -= 1
        heapq.heapreplace(heap, (-free[h], stamp, position, h))
        placed.append((vm, h))
    return placed


def _trunc_div(a: int, b: int) -> int:
    """Integer division rounding toward zero, as OCaml's ``Int64.div`` does."""
    return a // b if a >= 0 else -((-a) // b)


# --------------------------------------------------------------------------
# Prepared pool
# --------------------------------------------------------------------------


class _Pool:
    """Hosts and protected VMs indexed, with any down VMs already restarted."""

    def __init__(self, hosts: Sequence[PlanHost], vms: Sequence[PlanVM]) -> None:
        host_index: dict[str, int] = {}
        for i, host in enumerate(hosts):
            if host.ref in host_index:
                raise ValueError(f"duplicate host ref {host.ref!r}")
            host_index[host.ref] = i
        seen: set[str] = set()
        for vm in vms:
            if vm.ref in seen:
                raise ValueError(f"duplicate VM ref {vm.ref!r}")
            if vm.memory < 0:
                raise ValueError(f"VM {vm.ref!r} has negative memory")
            seen.add(vm.ref)

        self.host_count = len(hosts)
        self.vm_count = len(vms)
        self.memory = [vm.memory for vm in vms]
        self.free = [host.capacity for host in hosts]
        self.residents: list[list[int]] = [[] for _ in hosts]

        down = []
        for i, vm in enumerate(vms):
            h = host_index.get(vm.host)
            if h is None:
                down.append(i)
            else:
                self.residents[h].append(i)

        # Protected VMs that are down are restarted before any future failure
        # is considered; if one cannot be restarted the pool is overcommitted.
        self.overcommitted = False
        if down:
            order = sorted(down, key=lambda i: (-self.memory[i], i))
            restart = _pack(self.free, range(self.host_count), ((i, self.memory[i]) for i in order))
            assert restart is not None
            for vm_index, h in restart:
                if h < 0:
                    self.overcommitted = True
                else:
                    self.residents[h].append(vm_index)
            for resident in self.residents:
                resident.sort()

        self._approximation: tuple[list[int], list[int]] | None = None

    def plan_exists(self, n: int, total_hosts: int | None, *, method: str = "auto") -> bool:
        total = self._total(total_hosts)
        if n < 0:
            raise ValueError("n must be >= 0")
        if self.overcommitted or n > total:
            return False
        if self.host_count < n or (self.host_count == n and self.vm_count > 0):
            return False
        if method == "auto":
            method = "exact" if uses_exact_check(total, n) else "approximate"
        if method == "exact":
            return self._exact(n)
        return self._approximate(n)

    def _total(self, total_hosts: int | None) -> int:
        if total_hosts is None:
            return self.host_count
        if total_hosts < self.host_count:
            raise ValueError("total_hosts must count at least the live hosts")
        return total_hosts

    # Exact: every ordered sequence of n failures, one host at a time. -----

    def _exact(self, n: int) -> bool:
        if n == 0 or self.vm_count == 0:
            return True
        memory = self.memory
        residents = self.residents

        def survives(free: list[int], arrived: dict[int, tuple[int, ...]], alive: list[int], left: int) -> bool:
            for dead in alive:
                on_dead = residents[dead] + list(arrived.get(dead, ()))
                survivors = [h for h in alive if h != dead]
                if not on_dead:
                    if left > 1 and not survives(free, arrived, survivors, left - 1):
                        return False
                    continue
                on_dead.sort(key=lambda i: (-memory[i], i))
                after = free.copy()
                moves = _pack(after, survivors, ((i, memory[i]) for i in on_dead), stop_on_miss=True)
                if moves is None:
                    return False
                if left > 1:
                    now_on = dict(arrived)
                    now_on.pop(dead, None)
                    for vm, h in moves:
                        now_on[h] = (*now_on.get(h, ()), vm)
                    if not survives(after, now_on, survivors, left - 1):
                        return False
            return True

        return survives(self.free, {}, list(range(self.host_count)), n)

    # Approximate: one pessimistic slot count. ----------------------------

    def _approximate(self, n: int) -> bool:
        if self.vm_count == 0:
            return True
        biggest = max(self.memory)
        if biggest == 0:
            # xapi divides by the biggest VM size here; with only zero-sized
            # VMs that raises, and the error is reported as "no plan".
            return False
        if self._approximation is None:
            slots = sorted((_trunc_div(f, biggest) for f in self.free), reverse=True)
            counts = sorted((len(r) for r in self.residents), reverse=True)
            self._approximation = (slots, counts)
        slots, counts = self._approximation
        room_left = sum(slots[n:])  # the n roomiest hosts are the ones lost
        to_restart = sum(counts[:n])  # the n busiest hosts are the ones lost
        return to_restart <= room_left


def _bisect(holds: Callable[[int], bool], lower: int, upper: int) -> int:
    """Largest k in [lower, upper] with ``holds(k)``, assuming ``holds`` is monotone.

    Mirrors xapi's search: it never evaluates ``holds(lower)`` and falls back
    to ``lower`` when nothing above it holds.
    """
    while upper - lower >= 2:
        mid = (lower + upper) // 2
        if holds(mid):
            lower = mid
        else:
            upper = mid
    return upper if holds(upper) else lower


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def plan_exists_for(hosts: list[PlanHost], vms: list[PlanVM], n: int, *, total_hosts: int | None = None) -> bool:
    """True if every protected VM can be restarted after any ``n`` host failures.

    Uses the exact or the approximate check as xapi would (see the module
    docstring).  ``n`` above the pool size yields False.
    """
    return _Pool(hosts, vms).plan_exists(n, total_hosts)


def exact_plan_exists(hosts: list[PlanHost], vms: list[PlanVM], n: int) -> bool:
    """The exact check for ``n`` failures, whatever the pool size (may be slow)."""
    return _Pool(hosts, vms).plan_exists(n, None, method="exact")


def approximate_plan_exists(hosts: list[PlanHost], vms: list[PlanVM], n: int) -> bool:
    """The conservative approximation for ``n`` failures, whatever the pool size."""
    return _Pool(hosts, vms).plan_exists(n, None, method="approximate")


def max_failures_tolerated(hosts: list[PlanHost], vms: list[PlanVM], *, total_hosts: int | None = None) -> int:
    """Largest ``n`` for which ``plan_exists_for`` holds, found by bisection over 0..total_hosts."""
    pool = _Pool(hosts, vms)
    total = pool._total(total_hosts)
    return _bisect(lambda k: pool.plan_exists(k, total), 0, total)


def place_failed(hosts: list[PlanHost], vms: list[PlanVM], failed: set[str]) -> dict[str, str | None]:
    """Biggest-fit-decreasing placement of the VMs of the ``failed`` hosts.

    All failed hosts are handled in one packing onto the hosts of ``hosts``
    whose ref is not in ``failed``, starting from their ``capacity``.  Returns
    a mapping for exactly the VMs whose ``host`` is in ``failed``: VM ref to
    the ref of the host it goes to, or ``None`` if it fits nowhere.
    """
    refs = [host.ref for host in hosts]
    if len(set(refs)) != len(refs):
        raise ValueError("duplicate host ref")
    free = [host.capacity for host in hosts]
    survivors = [i for i, ref in enumerate(refs) if ref not in failed]
    victims = [i for i, vm in enumerate(vms) if vm.host in failed]
    victims.sort(key=lambda i: (-vms[i].memory, i))
    moves = _pack(free, survivors, ((i, vms[i].memory) for i in victims))
    assert moves is not None
    return {vms[i].ref: (refs[h] if h >= 0 else None) for i, h in moves}
