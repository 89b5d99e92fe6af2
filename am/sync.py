"""What a resource does when it meets its peer: decide who is newer, then copy (resync) or compare (verify).

A push resync (the primary is the source) sends each dirty region as a SYNC op in the replication stream, read
synchronously when queued, so it lands between the same client writes on both sides. A pull resync (the primary's
repaired disk is the target) reads each region from the peer and keeps it only if no client write touched that
region meanwhile; otherwise it reads it again.
"""
from __future__ import annotations

import asyncio
import logging
import time

from am import decide, wire
from am.nbd import NBDError
from am.resource import VERIFY_CHUNK, Resource
from am.states import Conn, Disk, Role
from am.store import LocalDiskError
from am.witness_client import WitnessError

log = logging.getLogger("am.sync")
ZERO_RUN = 1024  # zero regions one SYNC op may cover (64 MiB with 64 KiB regions)


class Refused(Exception):
    """An operator's request that the resource's state does not allow (the API's 409)."""


def disk_repaired(res: Resource) -> None:
    """The operator replaced a Failed disk: it is resynced from the peer (a pull when it is the primary)."""
    if res.disk != Disk.FAILED:
        raise Refused(f"the disk of {res.name} is {res.disk}, not Failed")
    res.image.injected_failure = False
    res.disk.set(Disk.INCONSISTENT, "disk repaired: to be resynced")
    _changed(res)


def discard_my_data(res: Resource) -> None:
    """End a split brain or a needs-operator state: this replica becomes a copy of the other one."""
    if res.role == Role.PRIMARY and res.disk == Disk.UP_TO_DATE:
        raise Refused("the primary's data cannot be discarded: demote it first")
    log.critical("%s: the operator discards this replica's data (generation %s)", res.name, res.meta.gen)
    res.needs_operator = None
    res.split_brain = False
    res.meta.gen, res.meta.history = "", []
    if res.disk != Disk.INCONSISTENT:
        res.disk.set(Disk.INCONSISTENT, "the operator discarded this replica's data")
    if res.conn == Conn.SPLIT_BRAIN:
        res.conn.set(Conn.STANDALONE, "split brain resolved by discarding this replica")
    _changed(res)


def _changed(res: Resource) -> None:
    res.save()
    res.announce()
    decide_sync(res)


def on_attach(res: Resource, link: str, msg: wire.Attach) -> None:
    """The peer's state of this resource: the first one of a session starts the stream; any one may start a
    resync. Answers go on ``link``, the one it came on: our own active link may be dead without our knowing
    yet (the peer noticed first and moved), and an answer lost there would leave its writes waiting."""
    res.peer = msg
    res.wake()
    # The two sides may disagree on whether the peer was lost (one link's silence is noticed at different
    # moments): whoever starts a session, the other answers it once, so both hold the other's state. An
    # Attach that says its sender lacks ours (``attached`` false: a new session, or ours was lost) is answered.
    peer_session_new = msg.session != res.session_seen
    res.session_seen = msg.session
    if msg.role == Role.PRIMARY:
        res.peer_was_primary = True
        if res.role == Role.PRIMARY:
            _two_primaries(res, msg)
            if res.role == Role.PRIMARY:
                return
    if res.role == Role.SECONDARY and msg.role == Role.PRIMARY:
        # every op before the primary's first unacknowledged one is applied here or in its dirty bitmap
        new_stream = msg.boot != res.followed
        if new_stream:
            res.followed, res.applied_seq = msg.boot, msg.next_seq - 1
            res.standby_reset("a new stream from the primary")
        else:
            res.applied_seq = max(res.applied_seq, msg.next_seq - 1)
        if new_stream or not res.attached or peer_session_new or not msg.attached:
            res.attached = True
            res.announce(link)  # the primary sends no op before it has this
    elif res.role == Role.PRIMARY and not res.attached:
        res.attached = True
        if msg.followed == res.stream():
            for seq in [s for s in res.pending if s <= msg.applied_seq]:
                res.on_ack(wire.RepAck(res.name, seq))
        res.announce(link)  # ops completed alone since our last Attach: skipped there
        res.resend("peer session started")
    else:
        res.attached = True
        if peer_session_new or not msg.attached:
            res.announce(link)
            if res.role == Role.PRIMARY and peer_session_new:  # the peer dropped its connections: what it had
                res.resend("the peer started a session")   # not acknowledged
    decide_sync(res)


def _two_primaries(res: Resource, msg: wire.Attach) -> None:
    # the witness makes this impossible; if it happens anyway, the older epoch yields at once
    log.critical("%s: the peer is primary too (epochs: ours %d, peer's %d)", res.name, res.meta.epoch, msg.epoch)
    if msg.epoch > res.meta.epoch:
        res.demote_now("the peer is primary of a newer epoch")
    elif msg.epoch == res.meta.epoch:
        res.split_brain = True
        res.conn.set(Conn.SPLIT_BRAIN, "both sides primary in one epoch")
        res.save()


def decide_sync(res: Resource) -> None:
    if res.peer is None or not res.attached:
        return
    peer = res.peer
    remote = decide.Side(peer.gen, tuple(peer.history), peer.bitmap_base, Disk(peer.disk),
                         peer.role == Role.PRIMARY, peer.crashed, peer.split_brain)
    verdict = decide.sync_decision(res.side(), remote)
    kind = verdict.kind
    if res.conn in (Conn.SYNC_SOURCE, Conn.SYNC_TARGET):
        copying = kind in (decide.SyncKind.BITMAP, decide.SyncKind.FULL)
        pushing = res._sync_task is not None and not res._sync_task.done()
        if (kind is decide.SyncKind.NONE and pushing) or (
                copying and verdict.source_is_local == (res.conn == Conn.SYNC_SOURCE)):
            return  # the resync under way goes on (NONE: the target took the last region; the push ends itself)
        stop_sync(res, f"resync abandoned: {kind.value}")
    if kind is decide.SyncKind.SPLIT_BRAIN:
        if not res.split_brain:
            log.critical("%s: split brain: both replicas took writes (ours %s, peer's %s); waiting for an "
                         "operator's choice", res.name, res.meta.gen, peer.gen)
            res.split_brain = True
            res.save()
        res.conn.set(Conn.SPLIT_BRAIN, "both replicas took writes")
        return
    stale = kind is decide.SyncKind.STALE_SOURCE
    if stale != bool(res.needs_operator):
        res.needs_operator = ("the replica with the latest acknowledged writes failed and the other one is older: "
                              "POST discard-my-data on the failed side to accept the older data") if stale else None
        if stale:
            log.critical("%s: %s", res.name, res.needs_operator)
            res.agent.event("needs-operator", res.name, {"why": res.needs_operator})
    if kind in (decide.SyncKind.NONE, decide.SyncKind.WAIT, decide.SyncKind.STALE_SOURCE):
        if kind is decide.SyncKind.NONE:
            res.conn.set(Conn.CONNECTED, "replicas in sync")
            if res.role == Role.PRIMARY and res.peer_outdated:
                res.agent.spawn(mark_peer_current(res))
        return
    primary_here = res.role == Role.PRIMARY
    if not primary_here and peer.role != Role.PRIMARY:
        return  # copies run only under a primary, which orders them with its writes
    if verdict.source_is_local:
        if res.split_brain:  # the other side discarded its data (decide: it is Inconsistent now)
            log.warning("%s: split brain resolved: the peer discarded its data", res.name)
            res.split_brain = False
            res.save()
        res.conn.set(Conn.SYNC_SOURCE, f"{kind.value} resync to the peer")
        if primary_here:
            res.sync_task(push(res, kind))
    else:
        if res.disk != Disk.INCONSISTENT:
            res.disk.set(Disk.INCONSISTENT, f"{kind.value} resync from the peer")
        res.conn.set(Conn.SYNC_TARGET, f"{kind.value} resync from the peer")
        res.save()
        if primary_here:
            res.sync_task(pull(res))
    res.announce()


def stop_sync(res: Resource, why: str) -> None:
    res.sync_task(None)
    if res.conn in (Conn.SYNC_SOURCE, Conn.SYNC_TARGET):
        res.conn.set(Conn.CONNECTED if res.agent.links.connected else Conn.STANDALONE, why)


async def push(res: Resource, kind: decide.SyncKind) -> None:
    bitmap = res.bitmap
    if kind is decide.SyncKind.FULL:
        bitmap.mark_all()
    regions = bitmap.dirty()
    res.sync_total, res.sync_done, res.sync_started = len(regions), 0, time.monotonic()
    window = asyncio.Semaphore(res.agent.cfg.disk.resync_window)
    rate = res.agent.cfg.disk.resync_rate_mib * (1 << 20)
    inflight: list[asyncio.Task] = []
    sent = 0
    log.info("%s: %s resync of %d regions to the peer", res.name, kind.value, len(regions))

    def take(index: int, following: list[int]) -> tuple[list[int], bytes]:
        """Read region ``index`` (synchronously: what is read is what the op carries, at its place in the stream);
        a zero region takes the zero regions that follow it into one op (``following``: the next dirty
        ones, in order), so that the sparse part of a disk costs a few ops, not one per region."""
        offset = index * bitmap.region
        length = min(bitmap.region, res.size - offset)
        if not res.image.is_hole(offset, length):
            try:
                data = res.image.read(offset, length)
            except LocalDiskError as exc:
                res.local_failed(exc)
                raise
            if any(data):
                return [index], data
        run = [index]
        for nxt in following[:ZERO_RUN - 1]:
            if nxt != run[-1] + 1:
                break
            offset = nxt * bitmap.region
            try:
                if not res.image.is_zero(offset, min(bitmap.region, res.size - offset)):
                    break
            except LocalDiskError:
                break  # read again (and failed properly) as the next op
            run.append(nxt)
        return run, b""

    async def one(p, run: list[int]) -> None:
        try:
            await p.done.wait()
            if p.acked and not p.error:
                for index in run:
                    bitmap.clear(index)
                res.sync_done += len(run)
        finally:
            window.release()

    while regions:  # a region whose copy was not acknowledged is copied again while the peer is there
        at = 0
        while at < len(regions):
            await window.acquire()
            if not res.peer_replicating():
                window.release()
                return
            try:
                run, data = take(regions[at], regions[at + 1:at + ZERO_RUN])
            except LocalDiskError:
                window.release()
                raise
            at += len(run)
            offset = run[0] * bitmap.region
            length = min(len(run) * bitmap.region, res.size - offset)
            sent += len(data)  # sparse: the zeroes cost nothing, the peer keeps or makes a hole
            p = res.queue_op(wire.Op.SYNC, offset, length, data)
            inflight.append(asyncio.create_task(one(p, run)))
            elapsed = time.monotonic() - res.sync_started
            ahead = sent / rate - elapsed
            if ahead > 0:
                await asyncio.sleep(ahead)
        await asyncio.gather(*inflight)
        inflight.clear()
        regions = bitmap.dirty()
        if regions:
            log.warning("%s: %d regions of the resync to copy again", res.name, len(regions))
    bitmap.save()
    done = res.queue_op(wire.Op.SYNC_DONE, 0, 0, b"")
    await done.done.wait()
    if not done.acked:
        return
    res.meta.bitmap_base = res.meta.gen
    res.crashed = False
    res.conn.set(Conn.CONNECTED, "resync finished")
    res.save()
    res.announce()
    log.info("%s: resync finished: %d regions in %.2f s", res.name, res.sync_total,
             time.monotonic() - res.sync_started)
    await mark_peer_current(res)


async def pull(res: Resource) -> None:
    """Copy every region from the peer onto a repaired local disk, while clients keep writing to both."""
    region = res.bitmap.region
    total = res.bitmap.regions
    res.sync_total, res.sync_done, res.sync_started = total, 0, time.monotonic()
    res.pulled.clear()
    copied = 0
    for first in range(0, total, ZERO_RUN):
        run = range(first, min(total, first + ZERO_RUN))
        # which regions of the run are zeroes on the peer: those are zeroed here without being copied (a sparse
        # replica of gigabytes is mostly that); a client's write to one meanwhile makes it copied after all
        for index in run:
            res.region_writes[index] = 0
        start = run.start * region
        try:
            zeroes = await res.remote(wire.Op.MAP, start, min(run.stop * region, res.size) - start,
                                      region.to_bytes(8, "big"))
        except NBDError:
            zeroes = b""  # a peer that cannot tell: every region is copied
        for index in run:
            touched = res.region_writes.pop(index, 0)
            offset = index * region
            length = min(region, res.size - offset)
            zero = index - first < len(zeroes) and zeroes[index - first] == 1 and touched == 0
            if not await _pull_region(res, index, offset, length, zero):
                return
            copied += not zero
            res.sync_done += 1
    await res.image.sync()
    if res.peer is not None:  # the disk is now a copy of the peer's replica, and is named as it is
        res.meta.gen, res.meta.history = res.peer.gen, list(res.peer.history)
        res.meta.bitmap_base = res.peer.gen
    for index in res.bitmap.dirty():
        res.bitmap.clear(index)
    res.bitmap.save()
    res.crashed = False
    res.disk.set(Disk.UP_TO_DATE, "repaired disk resynced from the peer")
    res.conn.set(Conn.CONNECTED, "resync finished")
    res.pulled.clear()
    res.save()
    res.announce()
    log.info("%s: repaired disk resynced: %d regions (%d copied, the others zeroes) in %.2f s", res.name, total,
             copied, time.monotonic() - res.sync_started)


async def _pull_region(res: Resource, index: int, offset: int, length: int, zero: bool) -> bool:
    """One region onto the repaired disk: zeroes when the peer said so, else copied (again while a client's
    write touched it meanwhile). False when the local disk failed again."""
    while True:
        if not zero:
            res.region_writes[index] = 0
            data = await res.remote(0, offset, length)
            touched = res.region_writes.pop(index)
            if touched:
                continue
        try:
            if not zero and any(data):
                res.image.write(offset, data)
            else:  # as a push's zero regions: a sparse image stays sparse (not gigabytes of zeroes)
                res.image.zero(offset, length, keep_holes=True)
        except LocalDiskError as exc:
            res.local_failed(exc)
            return False
        res.pulled.add(index)
        return True


async def mark_peer_current(res: Resource) -> None:
    for _ in range(50):
        if res.role != Role.PRIMARY or not res.peer_replicating():
            return
        try:
            answer = await res.agent.witness.mark_current(res.name, res.meta.epoch, res.agent.cfg.peer)
        except WitnessError as exc:
            log.info("%s: witness not told the peer is current yet: %s", res.name, exc)
            await asyncio.sleep(0.2)
            continue
        if answer.ok:
            res.peer_outdated = False
        return


async def verify(res: Resource) -> dict:
    """Online verify: every chunk hashed on both replicas at the same point of the stream, plus test traffic
    on both links. A mismatch is a fault, reported, never repaired silently."""
    if res.hold_writes:
        # the secondary holds the open epoch's writes: both sides would hash different points of the stream
        raise Refused(f"{res.name} is checkpointed (Level 3): an online verify does not run while checkpoints do")
    started = time.time()
    links = await res.agent.links.probe()
    mismatches: list[int] = []
    window = asyncio.Semaphore(4)
    checks: list[tuple[int, object]] = []

    async def one(offset: int, p) -> None:
        try:
            await p.done.wait()
            if not p.acked or p.peer_digest != p.digest:
                mismatches.append(offset)
        finally:
            window.release()

    tasks = []
    for offset in range(0, res.size, VERIFY_CHUNK):
        await window.acquire()
        if not res.peer_replicating():
            window.release()
            raise RuntimeError("the peer was lost during the verify")
        length = min(VERIFY_CHUNK, res.size - offset)
        p = res.queue_op(wire.Op.VERIFY, offset, length, b"", digest=res.digest(offset, length))
        checks.append((offset, p))
        tasks.append(asyncio.create_task(one(offset, p)))
    await asyncio.gather(*tasks)
    result = {
        "started": started, "seconds": round(time.time() - started, 3), "chunks": len(checks),
        "chunk_bytes": VERIFY_CHUNK, "mismatches": sorted(mismatches), "ok": not mismatches and all(
            v is not None for v in links.values()),
        "links_rtt_ms": {k: (None if v is None else round(v, 2)) for k, v in links.items()},
    }
    res.verify = result
    res.agent.event("verify", res.name, result)
    if mismatches:
        log.critical("%s: online verify found %d chunks that differ between the replicas", res.name, len(mismatches))
    return result
