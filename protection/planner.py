"""The console's own failover planner: XAPI's semantics, plus the explanation XAPI does not give.

XAPI HA answers one number, how many host failures the pool can tolerate.
Administrators also need to know *why*: which protected VMs would not restart
after which host failures, and how much memory is missing. This module
answers both, from the inventory alone (no XAPI call), with the same rules as
XAPI so that its maximum agrees with the pool's:

- Only memory counts. A host offers ``capacity`` bytes: its memory free with
  everything it runs already counted (protected VMs included). A protected VM
  needs ``memory`` bytes wherever it restarts.
- Restarted VMs are placed *biggest fit decreasing*: biggest VM first, onto
  the surviving host with the most free memory (on a tie, the host that took a
  VM last, then the host listed first); if it does not fit there, it fits
  nowhere.
- Protected VMs whose host is not live are placed first; if one does not fit,
  the pool is overcommitted and no failure at all can be tolerated.
- ``n`` failures are checked *exactly* — every ordered sequence of ``n``
  hosts failing one after another, each failure's VMs re-placed on the hosts
  still alive — when the pool has at most 32 hosts and fewer than 3,500 such
  sequences exist. Otherwise a *conservative approximation*: every VM is as big
  as the biggest, the ``n`` hosts with the most protected VMs fail, and the
  ``n`` hosts with the most room are the ones lost.
- The maximum is found by bisection between 0 and the number of hosts.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

EXACT_HOST_LIMIT = 32
EXACT_SEQUENCE_LIMIT = 3500
EXPLAIN_SCENARIO_LIMIT = 50


@dataclass(frozen=True)
class Host:
    key: str
    capacity: int
    name: str = ""


@dataclass(frozen=True)
class ProtectedVM:
    key: str
    memory: int
    host: str | None  # key of the live host it runs on; anything else means "down, to restart"
    name: str = ""


@dataclass
class Shortfall:
    """After ``failed`` hosts are lost, these VMs find no room: ``missing`` bytes short."""

    failed: tuple[str, ...]
    failed_names: tuple[str, ...]
    vms: list[tuple[str, str, int]]  # (key, name, memory) of the VMs that would not restart
    missing: int
    approximate: bool = False
    reason: str = ""

    def as_dict(self) -> dict:
        return {
            "failed_hosts": list(self.failed_names),
            "failed_host_keys": list(self.failed),
            "vms": [{"key": k, "name": n, "memory": m} for k, n, m in self.vms],
            "missing_memory": self.missing,
            "approximate": self.approximate,
            "reason": self.reason,
        }


@dataclass
class Report:
    configured: int
    max_tolerable: int
    overcommitted: bool
    exact: bool
    shortfalls: list[Shortfall] = field(default_factory=list)
    down_unplaced: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def holds(self) -> bool:
        return not self.overcommitted and self.max_tolerable >= self.configured


def sequences(total_hosts: int, n: int) -> int:
    return math.perm(total_hosts, n) if n <= total_hosts else 0


def is_exact(total_hosts: int, n: int) -> bool:
    return total_hosts <= EXACT_HOST_LIMIT and sequences(total_hosts, n) < EXACT_SEQUENCE_LIMIT


class _Bins:
    """Free memory per host, handing out the roomiest host first (ties: last used, then listed first)."""

    __slots__ = ("free", "heap", "tick")

    def __init__(self, free: list[int], hosts: Iterable[int]) -> None:
        self.free = free
        self.tick = 0
        self.heap = [(-free[h], 0, rank, h) for rank, h in enumerate(hosts)]
        heapq.heapify(self.heap)

    def put(self, size: int) -> int:
        """Index of the host that takes ``size``, or -1 if even the roomiest cannot."""
        if not self.heap:
            return -1
        top = self.heap[0]
        h = top[3]
        if self.free[h] < size:
            return -1
        self.free[h] -= size
        self.tick -= 1
        heapq.heapreplace(self.heap, (-self.free[h], self.tick, top[2], h))
        return h


class Planner:
    """A pool's protected VMs and live hosts, ready to answer "can it survive n failures?"."""

    def __init__(self, hosts: Sequence[Host], vms: Sequence[ProtectedVM], *, total_hosts: int | None = None) -> None:
        self.hosts = list(hosts)
        self.vms = list(vms)
        self.total_hosts = max(total_hosts if total_hosts is not None else len(self.hosts), len(self.hosts))
        index = {h.key: i for i, h in enumerate(self.hosts)}
        if len(index) != len(self.hosts):
            raise ValueError("two hosts share a key")
        self.size = [vm.memory for vm in self.vms]
        self.free = [max(0, h.capacity) for h in self.hosts]
        self.on_host: list[list[int]] = [[] for _ in self.hosts]
        down = []
        for v, vm in enumerate(self.vms):
            h = index.get(vm.host) if vm.host is not None else None
            (down if h is None else self.on_host[h]).append(v)
        # VMs that are down now are restarted before any further failure is considered.
        self.down_unplaced: list[int] = []
        if down:
            bins = _Bins(self.free, range(len(self.hosts)))
            for v in sorted(down, key=lambda v: (-self.size[v], v)):
                h = bins.put(self.size[v])
                if h < 0:
                    self.down_unplaced.append(v)
                else:
                    self.on_host[h].append(v)
        for vms_here in self.on_host:
            vms_here.sort(key=lambda v: (-self.size[v], v))
        self._slots: tuple[list[int], list[int]] | None = None

    @property
    def overcommitted(self) -> bool:
        return bool(self.down_unplaced)

    # -- the verdict ---------------------------------------------------------------------------

    def holds(self, n: int) -> bool:
        """Can every protected VM be restarted after any ``n`` host failures (XAPI's rules)?"""
        if n < 0:
            raise ValueError("n must not be negative")
        if self.overcommitted or n > self.total_hosts:
            return False
        live = len(self.hosts)
        if n > live or (n == live and self.vms):
            return False
        if not self.vms:
            return True
        if is_exact(self.total_hosts, n):
            return n == 0 or self._first_exact_shortfall(n, collect=False) is None
        return self._approximation_holds(n)

    def max_failures(self) -> int:
        """The most failures tolerated, by bisection over 0..total hosts (0 is assumed, never tried)."""
        low, high = 0, self.total_hosts
        while high - low > 1:
            mid = (low + high) // 2
            if self.holds(mid):
                low = mid
            else:
                high = mid
        return high if self.holds(high) else low

    # -- exact: every ordered sequence of failures ---------------------------------------------

    def _first_exact_shortfall(self, n: int, *, collect: bool) -> list[Shortfall] | None:
        """Walk every ordered sequence of ``n`` failures. Without ``collect``, stop at the first VM
        left without room (returning a non-None marker); with it, gather the worst shortfall per set
        of failed hosts."""
        found: dict[frozenset[int], Shortfall] = {}
        size = self.size

        def fail_next(free: list[int], extra: dict[int, list[int]], alive: list[int], failed: list[int]) -> bool:
            for dead in alive:
                victims = self.on_host[dead] + extra.get(dead, [])
                others = [h for h in alive if h != dead]
                now_failed = [*failed, dead]
                if victims:
                    if extra.get(dead):
                        victims.sort(key=lambda v: (-size[v], v))
                    after = list(free)
                    bins = _Bins(after, others)
                    moved: dict[int, list[int]] = {}
                    lost: list[int] = []
                    for v in victims:
                        h = bins.put(size[v])
                        if h < 0:
                            if not collect:
                                return False
                            lost.append(v)
                        else:
                            moved.setdefault(h, []).append(v)
                    if lost:
                        self._record(found, now_failed, lost)
                        continue
                else:
                    after, moved = free, {}
                if len(now_failed) < n:
                    carried = {h: list(vs) for h, vs in extra.items() if h != dead}
                    for h, vs in moved.items():
                        carried.setdefault(h, []).extend(vs)
                    if not fail_next(after, carried, others, now_failed) and not collect:
                        return False
            return True

        ok = fail_next(list(self.free), {}, list(range(len(self.hosts))), [])
        if not collect:
            return None if ok else []
        return sorted(found.values(), key=lambda s: (-s.missing, s.failed_names))

    def _record(self, found: dict, failed: list[int], lost: list[int]) -> None:
        key = frozenset(failed)
        missing = sum(self.size[v] for v in lost)
        if key in found and found[key].missing >= missing:
            return
        ordered = sorted(failed)
        found[key] = Shortfall(
            failed=tuple(self.hosts[h].key for h in ordered),
            failed_names=tuple(self.hosts[h].name or self.hosts[h].key for h in ordered),
            vms=[(self.vms[v].key, self.vms[v].name or self.vms[v].key, self.size[v]) for v in lost],
            missing=missing,
        )

    # -- approximate: slots of the biggest VM ----------------------------------------------------

    def _approximation_holds(self, n: int) -> bool:
        biggest = max(self.size)
        if biggest <= 0:
            return False  # XAPI divides by the biggest VM; zero-sized VMs mean "no plan"
        if self._slots is None:
            slots = sorted((f // biggest for f in self.free), reverse=True)
            counts = sorted((len(vs) for vs in self.on_host), reverse=True)
            self._slots = (slots, counts)
        slots, counts = self._slots
        return sum(counts[:n]) <= sum(slots[n:])

    # -- the explanation -------------------------------------------------------------------------

    def explain(self, n: int, *, limit: int = EXPLAIN_SCENARIO_LIMIT) -> list[Shortfall]:
        """Which VMs would not restart under which failures of up to ``n`` hosts (worst first)."""
        if n <= 0 or not self.vms or self.overcommitted:
            return []
        live = len(self.hosts)
        if n >= live:
            names = tuple(h.name or h.key for h in self.hosts)
            return [Shortfall(
                failed=tuple(h.key for h in self.hosts), failed_names=names,
                vms=[(vm.key, vm.name or vm.key, vm.memory) for vm in self.vms],
                missing=sum(self.size), reason=f"The pool has only {live} live host(s): none would be left.",
            )]
        if is_exact(self.total_hosts, n):
            return (self._first_exact_shortfall(n, collect=True) or [])[:limit]
        return self._approximate_explanation(n)

    def _approximate_explanation(self, n: int) -> list[Shortfall]:
        """The pessimistic case XAPI's approximation reasons about: the n busiest hosts fail at once."""
        if self._approximation_holds(n):
            return []
        busiest = sorted(range(len(self.hosts)), key=lambda h: (-len(self.on_host[h]), h))[:n]
        gone = set(busiest)
        free = list(self.free)
        bins = _Bins(free, [h for h in range(len(self.hosts)) if h not in gone])
        victims = sorted((v for h in busiest for v in self.on_host[h]), key=lambda v: (-self.size[v], v))
        lost = [v for v in victims if bins.put(self.size[v]) < 0]
        biggest = max(self.size)
        slots, counts = self._slots or ([], [])
        reason = (
            f"Estimated for a pool this large: up to {sum(counts[:n])} protected VM(s) to restart but room for only "
            f"{sum(slots[n:])} VM(s) of the biggest size ({biggest / 2**30:.1f} GiB) on the hosts left."
        )
        ordered = sorted(busiest)
        return [Shortfall(
            failed=tuple(self.hosts[h].key for h in ordered),
            failed_names=tuple(self.hosts[h].name or self.hosts[h].key for h in ordered),
            vms=[(self.vms[v].key, self.vms[v].name or self.vms[v].key, self.size[v]) for v in lost],
            missing=sum(self.size[v] for v in lost),
            approximate=True,
            reason=reason,
        )]

    def report(self, configured: int) -> Report:
        best = self.max_failures()
        wanted = max(configured, 1)
        return Report(
            configured=configured,
            max_tolerable=best,
            overcommitted=self.overcommitted,
            exact=is_exact(self.total_hosts, wanted),
            shortfalls=self.explain(min(wanted, len(self.hosts))) if best < wanted else [],
            down_unplaced=[(self.vms[v].key, self.vms[v].name or self.vms[v].key, self.size[v])
                           for v in self.down_unplaced],
        )


def shortfall_text(shortfall: Shortfall) -> str:
    """One sentence: "If hosts A and B fail, X (4.0 GiB) and Y (2.0 GiB) cannot restart: 6.0 GiB missing."."""
    hosts = " and ".join(shortfall.failed_names)
    vms = ", ".join(f"{name} ({memory / 2**30:.1f} GiB)" for _, name, memory in shortfall.vms)
    several = len(shortfall.failed_names) > 1
    head = f"If host{'s' if several else ''} {hosts} fail{'' if several else 's'}"
    if not shortfall.vms:
        return f"{head}: {shortfall.reason}"
    return f"{head}, {vms} cannot restart: {shortfall.missing / 2**30:.1f} GiB missing." + (
        f" {shortfall.reason}" if shortfall.reason else ""
    )


def exhaustive_holds(hosts: Sequence[Host], vms: Sequence[ProtectedVM], n: int) -> bool:
    """``holds`` with the exact check forced whatever the pool size (for tests and small what-ifs)."""
    planner = Planner(hosts, vms, total_hosts=len(hosts))
    if planner.overcommitted or n > len(hosts) or (n == len(hosts) and vms):
        return False
    if n == 0 or not vms:
        return True
    return planner._first_exact_shortfall(n, collect=False) is None


__all__ = ["Host", "ProtectedVM", "Planner", "Report", "Shortfall", "shortfall_text", "is_exact",
           "exhaustive_holds"]
