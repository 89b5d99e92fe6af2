"""The witness's decisions, as a pure state machine: no I/O, no clock reads (every call is given ``now``).

The witness is the third vote of a two-host mirror. It grants one primary per resource per epoch and
remembers which replicas hold the latest data (``current``), so that a secondary is promoted only if its
replica has every acknowledged write, and never while the old primary may still believe in its lease.

The safety argument, which ``tests/am/test_witness_core.py`` checks against random fault schedules:

* A node believes it may write until (the time it *sent* its last successful acquire/renew) + ``lease_s``.
  The witness handled that request later than it was sent, so its own ``lease_until`` ends later too:
  the witness never grants the resource to another node while the holder can still believe in its lease.
* Leases are not persisted (a monotonic clock means nothing to the next process). After a restart the core
  grants nothing to anyone but the recorded holder for one lease from ``started_at``: any lease granted by
  the previous process has ended by then. The same wait applies to unknown resources, because a first
  start cannot be told apart from a lost state file.
* The holder outdates its peer (``outdate``) *before* acknowledging the first write the peer lacks, and only
  with a lease the witness still counts as valid; a node outside ``current`` is never granted.
* The witness acts on a node's requests for a resource only in the order the node sent them. Every request
  carries ``rseq``, a number its client makes strictly increasing (across restarts of the AM too); the record
  keeps, per node, the highest one acted on, and a request whose number is not higher is refused as stale and
  changes nothing. Without it a request stuck in the network past its client's timeout could undo a later one:
  a ``mark_current`` arriving after the ``outdate`` that followed it would count a replica current that misses
  the writes acknowledged since, and a ``release`` arriving after the acquire that followed it would free a
  lease the node believes in.

The shell (``am/witness.py``) persists ``snapshot()`` whenever ``revision`` moves, before answering: on every
granted operation but a renewal (``renew``, or ``acquire`` by the holder). A renewal changes nothing a restart
keeps but the ``rseq`` floor, so it costs no fsync; why a floor that goes back to its saved value on a restart is
safe is said at ``restore``. Refusals are not saved either: they have no effect to undo.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec

SNAPSHOT_FORMAT = 2  # 2: the records keep the rseq floors


class Answer(msgspec.Struct):
    """The witness's reply to every operation; a refusal is a normal answer (``ok`` false, ``reason`` says why)."""

    ok: bool
    epoch: int  # the resource's epoch after the operation (0: the resource is unknown)
    lease_s: float  # the lease length the witness counts with (the one it granted, on a grant)
    reason: str  # "" when granted; otherwise one plain English sentence
    retry_s: float  # when a refusal may turn into a grant by waiting alone; 0 when waiting will not help
    holder: str | None
    current: list[str]  # the nodes whose replica holds the latest data, sorted
    # On a stale refusal only: the highest rseq the witness acted on from this node for this resource. A client
    # whose first numbers after a restart are too low (its clock was set back) numbers on from there.
    rseq_floor: int = 0


class Lease(enum.StrEnum):
    """Where a resource's lease stands, as ``GET /v1/resources`` shows it."""

    HELD = "Held"  # a holder with a valid lease
    LAPSED = "Lapsed"  # the holder's lease ran out; it may still renew unless another node takes over
    FREE = "Free"  # released, or never held
    HANDING_OVER = "HandingOver"  # released to a named successor: a planned swap, both replicas in sync


class ResourceView(msgspec.Struct):
    """One record as an operator sees it (the lease as time remaining: the witness's clock is its own)."""

    resource: str
    lease: Lease
    epoch: int
    holder: str | None
    lease_remaining_s: float
    current: list[str]
    handover: str | None


class CorruptState(ValueError):
    """A snapshot that cannot be restored: the shell stops rather than guess."""


class _RecordState(msgspec.Struct, forbid_unknown_fields=True):
    """The persisted part of a record: everything but the lease, which dies with the process."""

    epoch: int
    holder: str | None
    current: list[str]
    rseq: dict[str, Annotated[int, msgspec.Meta(ge=1)]]
    handover: str | None = None


class _Snapshot(msgspec.Struct, forbid_unknown_fields=True):
    format: int
    resources: dict[str, _RecordState]


@dataclass
class Record:
    epoch: int
    holder: str | None
    lease_until: float
    current: set[str] = field(default_factory=set)
    lease_s: float = 0.0  # the length of the holder's last lease (0: the witness's own)
    handover: str | None = None
    rseq: dict[str, int] = field(default_factory=dict)  # per node: the highest request number acted on


class WitnessCore:
    """Grants and leases for every resource. ``started_at``: the process start on the clock ``now`` comes from."""

    def __init__(self, *, lease_s: float = 0.8, started_at: float) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.lease_s = lease_s
        self.started_at = started_at
        self.records: dict[str, Record] = {}
        self.revision = 0  # moves whenever the persisted state changes (the shell saves it then)

    # -- the operations ---------------------------------------------------------------------------------------

    def acquire(self, resource: str, node: str, now: float, *, rseq: int, lease_s: float | None = None) -> Answer:
        """Make ``node`` the holder: a renewal for the holder, otherwise a new epoch if the lease is free.

        ``lease_s``: a shorter lease than the witness's own, for a resource whose takeover must come sooner (a
        Level 3 VM's); a longer one is cut to the witness's, whose start-up wait must outlast any lease."""
        rec = self.records.get(resource)
        if (stale := self._in_order(rec, resource, node, rseq)) is not None:
            return stale
        if rec is not None and rec.holder == node:
            # Even after its lease lapsed: nobody else took the resource, so no other node has written.
            self._lease(rec, now, lease_s)
            return self._granted(rec)
        if rec is not None and rec.holder is not None and now < rec.lease_until:
            return self._refused(
                rec, f"{resource} is held by {rec.holder} in epoch {rec.epoch} for another "
                f"{rec.lease_until - now:.2f} s.", retry_s=rec.lease_until - now)
        if now < self._quiet_until:
            wait = self._quiet_until - now
            return self._refused(
                rec, f"The witness restarted less than one lease ago and cannot tell whether a lease it granted "
                f"before is still believed; it grants {resource} to {node} in {wait:.2f} s at the earliest.",
                retry_s=wait)
        if rec is None:
            rec = self.records[resource] = Record(epoch=1, holder=node, lease_until=0.0, current={node},
                                                  rseq={node: rseq})
            self._lease(rec, now, lease_s)
            self.revision += 1
            return self._granted(rec)
        if node not in rec.current:
            return self._refused(
                rec, f"{node}'s replica of {resource} is outdated: only {_names(rec.current)} "
                f"{'holds' if len(rec.current) == 1 else 'hold'} the writes of epoch {rec.epoch}; "
                f"it must resync from an up-to-date replica first.")
        # A planned swap keeps both replicas current; a takeover presumes the old holder lost, and its replica
        # outdated from the new primary's first write, which no longer waits for it.
        rec.current = rec.current if rec.handover == node else {node}
        rec.epoch += 1
        rec.holder = node
        self._lease(rec, now, lease_s)
        rec.handover = None
        self.revision += 1
        return self._granted(rec)

    def renew(self, resource: str, node: str, epoch: int, now: float, *, rseq: int,
              lease_s: float | None = None) -> Answer:
        """Extend the holder's lease (even a lapsed one: nobody took the resource meanwhile); ``lease_s`` as for
        ``acquire``."""
        rec, refusal = self._holder_record(resource, node, epoch, rseq)
        if refusal is not None:
            return refusal
        assert rec is not None
        self._lease(rec, now, lease_s)
        return self._granted(rec)

    def release(self, resource: str, node: str, epoch: int, now: float, handover_to: str | None = None, *,
                rseq: int) -> Answer:
        """The holder gives the resource up (it has stopped writing first); ``handover_to`` names a successor
        whose replica is in sync, so that its promotion keeps both replicas current."""
        rec, refusal = self._holder_record(resource, node, epoch, rseq)
        if refusal is not None:
            return refusal
        assert rec is not None
        rec.holder = None
        rec.lease_until = 0.0
        note = ""
        if handover_to is not None and handover_to != node and handover_to in rec.current:
            rec.handover = handover_to
        else:
            rec.handover = None
            if handover_to is not None and handover_to != node:
                note = (f"Released, but not handed over: {handover_to}'s replica of {resource} is outdated, "
                        f"so its promotion will be refused.")
        self.revision += 1
        return self._answer(rec, ok=True, reason=note)

    def outdate(self, resource: str, node: str, epoch: int, peer: str, now: float, *, rseq: int) -> Answer:
        """The holder says ``peer`` missed writes: from now on ``peer`` cannot be promoted.

        Only a lease the witness still counts as valid is trusted: after it lapses another node may already have
        taken over, and a stale primary must not be able to outdate the new one.

        Saved even when ``peer`` was outdated already: the holder acknowledges writes alone on this answer, so
        its ``rseq`` must outlive a restart, or a ``mark_current`` sent before it could still count ``peer``
        current afterwards."""
        rec, refusal = self._holder_record(resource, node, epoch, rseq)
        if refusal is not None:
            return refusal
        assert rec is not None
        if now >= rec.lease_until:
            return self._refused(rec, f"{node}'s lease on {resource} has lapsed; only a holder with a valid lease "
                                      f"may outdate its peer. Renew first.")
        if peer == node:
            return self._refused(rec, f"{node} cannot outdate its own replica of {resource}.")
        rec.current.discard(peer)
        self.revision += 1
        return self._granted(rec)

    def mark_current(self, resource: str, node: str, epoch: int, peer: str, now: float, *, rseq: int) -> Answer:
        """The holder says ``peer`` has caught up: it may be promoted again."""
        rec, refusal = self._holder_record(resource, node, epoch, rseq)
        if refusal is not None:
            return refusal
        assert rec is not None
        rec.current.add(peer)
        self.revision += 1
        return self._granted(rec)

    def forget(self, resource: str, node: str, now: float, *, rseq: int) -> Answer:
        """Drop a resource's record (it is no longer replicated): by its holder, or by anyone once no lease runs.
        The ``rseq`` floors go with it: a late request naming the resource finds no record and is refused, but
        for an ``acquire``, which starts the resource anew as any first acquire would."""
        rec = self.records.get(resource)
        if rec is None:
            return self._refused(None, f"The witness knows no resource named {resource}.")
        if (stale := self._in_order(rec, resource, node, rseq)) is not None:
            return stale
        if rec.holder is not None and rec.holder != node and now < rec.lease_until:
            return self._refused(rec, f"{resource} is held by {rec.holder} in epoch {rec.epoch} for another "
                                      f"{rec.lease_until - now:.2f} s; only its holder may forget it now.",
                                 retry_s=rec.lease_until - now)
        del self.records[resource]
        self.revision += 1
        return self._answer(rec, ok=True, reason="")

    # -- views and persistence --------------------------------------------------------------------------------

    def lease_state(self, rec: Record, now: float) -> Lease:
        if rec.holder is not None:
            return Lease.HELD if now < rec.lease_until else Lease.LAPSED
        return Lease.HANDING_OVER if rec.handover is not None else Lease.FREE

    def describe(self, now: float) -> list[ResourceView]:
        return [
            ResourceView(resource=name, lease=self.lease_state(rec, now), epoch=rec.epoch, holder=rec.holder,
                         lease_remaining_s=round(max(0.0, rec.lease_until - now), 3) if rec.holder else 0.0,
                         current=sorted(rec.current), handover=rec.handover)
            for name, rec in sorted(self.records.items())
        ]

    def snapshot(self) -> dict[str, Any]:
        """The state a restart must keep, JSON-able. Leases are left out: see ``restore``."""
        return {
            "format": SNAPSHOT_FORMAT,
            "resources": {
                name: {"epoch": rec.epoch, "holder": rec.holder, "current": sorted(rec.current),
                       "handover": rec.handover, "rseq": dict(sorted(rec.rseq.items()))}
                for name, rec in sorted(self.records.items())
            },
        }

    @classmethod
    def restore(cls, data: Any, lease_s: float, started_at: float) -> WitnessCore:
        """A core from ``snapshot()``'s output. Each recorded holder gets a lease to ``started_at + lease_s``:
        it may still believe in one granted before the restart, and may renew it at once.

        The ``rseq`` floors are the saved ones, which may be lower than those the previous process acted on:
        renewals and refusals move a floor without a save. So a request sent before one of those and delivered
        only after the restart is acted on, as if it had arrived before them. That is safe because what they did
        is gone anyway: a refusal did nothing, and a renewal only extended a lease, which no restart keeps. Any
        request the previous process acted on was sent before this one started, so a lease its holder counts
        from it ends before ``started_at + lease_s``, and until then nothing is granted to another node. What a
        node acts on beyond its lease, an ``ok`` to anything else, was saved with its ``rseq`` before it was
        answered, so no request sent before it can be acted on after the restart."""
        try:
            snap = msgspec.convert(data, type=_Snapshot)
        except msgspec.ValidationError as exc:
            raise CorruptState(str(exc)) from None
        if snap.format != SNAPSHOT_FORMAT:
            raise CorruptState(f"unknown format {snap.format} (this witness reads format {SNAPSHOT_FORMAT})")
        core = cls(lease_s=lease_s, started_at=started_at)
        for name, state in snap.resources.items():
            if state.epoch < 1:
                raise CorruptState(f"resource {name}: epoch {state.epoch} is not positive")
            for role, who in (("holder", state.holder), ("handover", state.handover)):
                if who is not None and who not in state.current:
                    raise CorruptState(f"resource {name}: {role} {who} is not among the current replicas")
            core.records[name] = Record(epoch=state.epoch, holder=state.holder,
                                        lease_until=started_at + lease_s if state.holder is not None else 0.0,
                                        current=set(state.current), handover=state.handover, rseq=dict(state.rseq))
        return core

    # -- helpers ----------------------------------------------------------------------------------------------

    @property
    def _quiet_until(self) -> float:
        return self.started_at + self.lease_s

    def _lease(self, rec: Record, now: float, wanted: float | None) -> None:
        """A lease from ``now``: the length asked for, never longer than the witness's own. An earlier, longer
        lease of the same holder is never cut short: its holder believes in it, and nobody else may be granted
        before it ends."""
        rec.lease_s = self.lease_s if wanted is None else min(max(wanted, 0.0), self.lease_s)
        rec.lease_until = max(now + rec.lease_s, rec.lease_until if rec.holder is not None else 0.0)

    def _in_order(self, rec: Record | None, resource: str, node: str, rseq: int) -> Answer | None:
        """The stale refusal if the witness already acted on a request ``node`` sent after this one (or on this
        one); otherwise ``rseq`` becomes the node's floor, whatever the answer (a refused request is acted on
        too: an earlier one must not be acted on after it)."""
        if rec is None:
            return None
        floor = rec.rseq.get(node, 0)
        if rseq <= floor:
            answer = self._refused(
                rec, f"stale request: the witness has already acted on request {floor} of {node} for {resource}, "
                f"and request {rseq} was not sent after it; it is ignored.")
            answer.rseq_floor = floor
            return answer
        rec.rseq[node] = rseq
        return None

    def _holder_record(self, resource: str, node: str, epoch: int, rseq: int
                       ) -> tuple[Record | None, Answer | None]:
        """The record if ``node`` holds ``resource`` in ``epoch`` and the request is in order, else the refusal
        that says why not."""
        rec = self.records.get(resource)
        if rec is None:
            return None, self._refused(None, f"The witness knows no resource named {resource}.")
        if (stale := self._in_order(rec, resource, node, rseq)) is not None:
            return None, stale
        if rec.holder != node:
            who = f"{rec.holder} does" if rec.holder is not None else "nobody does"
            return None, self._refused(rec, f"{node} does not hold {resource}: {who} (epoch {rec.epoch}).")
        if rec.epoch != epoch:
            return None, self._refused(rec, f"{node} holds {resource} in epoch {rec.epoch}, not in epoch {epoch}.")
        return rec, None

    def _granted(self, rec: Record) -> Answer:
        return self._answer(rec, ok=True, reason="")

    def _refused(self, rec: Record | None, reason: str, retry_s: float = 0.0) -> Answer:
        return self._answer(rec, ok=False, reason=reason, retry_s=retry_s)

    def _answer(self, rec: Record | None, *, ok: bool, reason: str, retry_s: float = 0.0) -> Answer:
        if rec is None:
            return Answer(ok=ok, epoch=0, lease_s=self.lease_s, reason=reason, retry_s=_ceil_ms(retry_s), holder=None,
                          current=[])
        return Answer(ok=ok, epoch=rec.epoch, lease_s=rec.lease_s or self.lease_s, reason=reason,
                      retry_s=_ceil_ms(retry_s), holder=rec.holder, current=sorted(rec.current))


def _ceil_ms(seconds: float) -> float:
    """Rounded up to the millisecond: a wait rounded down would be retried a moment too early, and 0 means
    "waiting will not help"."""
    if seconds <= 0:
        return 0.0
    return max(1, math.ceil(seconds * 1000 - 1e-6)) / 1000  # the 1e-6: 0.8 - 0.5 is 0.3, not 0.301


def _names(nodes: set[str]) -> str:
    return " and ".join(sorted(nodes)) if nodes else "no node"
