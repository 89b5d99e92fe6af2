"""One replicated disk: the NBD export a primary serves, and the replica a secondary applies.

Ordering: a client's write is applied to the local image and queued for the peer synchronously, before the first
``await``, in the order the NBD server dispatched it; the peer applies the stream in sequence order. So both
replicas see overlapping writes in the same order, and a region read for a resync or a verify between two ops is
exactly what the peer will hold at that point of the stream.

Exactly once: ops carry a sequence number per primary boot; the secondary applies ``applied_seq + 1`` only,
acknowledges again what it already applied, and ignores a gap (the primary re-sends everything unacknowledged,
in order, whenever its active link changes or a peer session starts).
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from am import decide, wire
from am.nbd import ExportGone, NBDError
from am.states import IO, Conn, Disk, Role, StateCell
from am.store import Bitmap, Image, LocalDiskError, Meta, save_meta

if TYPE_CHECKING:
    from am.agent import Agent
    from am.checkpoint import Checkpointer

log = logging.getLogger("am.resource")
VERIFY_CHUNK = 1 << 20
CLIENT_OPS = (wire.Op.WRITE, wire.Op.ZERO, wire.Op.FLUSH)


@dataclass
class Pending:
    seq: int
    op: wire.Op
    offset: int
    length: int
    data: bytes = b""
    fua: bool = False
    digest: bytes = b""
    acked: bool = False
    held: bool = False  # Level 3: applied by the secondary at the next checkpoint
    error: int = 0
    peer_digest: bytes = b""
    sent_at: float = field(default_factory=time.monotonic)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def message(self, resource: str, epoch: int, meta: Meta | None = None) -> wire.Rep:
        extra = {"gen": meta.gen, "history": meta.history} if meta is not None else {}
        return wire.Rep(resource, epoch, self.seq, int(self.op), self.offset, self.length, self.data, self.fua,
                        held=self.held, **extra)


class Resource:
    def __init__(self, agent: Agent, meta: Meta, meta_path: Path, image: Image, bitmap: Bitmap) -> None:
        self.agent = agent
        self.name = meta.name
        self.meta = meta
        self.meta_path = meta_path
        self.image = image
        self.bitmap = bitmap
        self.size = meta.size
        feed = agent.state_changed
        self.role = StateCell(f"{self.name} role", Role.SECONDARY, feed)
        self.disk = StateCell(f"{self.name} disk", Disk(meta.disk), feed)
        self.conn = StateCell(f"{self.name} connection", Conn.STANDALONE, feed)
        self.io = StateCell(f"{self.name} io", IO.UNAVAILABLE, feed)
        self.crashed = meta.unclean  # it was primary when its agent stopped without demoting
        self.split_brain = meta.split_brain
        # primary
        self.next_seq = 1
        self.pending: OrderedDict[int, Pending] = OrderedDict()
        self.lease_until = 0.0
        self.peer_outdated = False
        self._outdating: asyncio.Task | None = None
        self._io_changed = asyncio.Event()
        self.draining = False  # a demotion or swap holds new requests
        self.needs_operator: str | None = None
        self.proxy = False  # after a swap: this node's clients are served by the new primary
        self.sync_total = 0
        self.sync_done = 0
        self.sync_started = 0.0
        self._sync_task: asyncio.Task | None = None
        self.region_writes: dict[int, int] = {}  # region -> writes while a pull resync is copying it
        self.pulled: set[int] = set()
        self.verify: dict = {}
        # Level 3 (am/checkpoint.py): the primary's epoch loop, and what the secondary holds of the open epoch
        self.checkpointer: Checkpointer | None = None
        self.hold_writes = False  # primary: client ops are sent as held (applied at the next checkpoint)
        self.held_ops: list[wire.Rep] = []  # secondary: the open epoch's writes, in stream order
        self.standby_checkpoint: bytes | None = None  # secondary: the last committed checkpoint
        self.standby_epoch = 0
        self.standby_at = 0.0
        # secondary
        self.applied_seq = 0
        self._gap_nacked, self._gap_nacked_at = 0, 0.0
        self.followed = ""
        self.peer_was_primary = False
        # what the peer said of its replica in this session
        self.peer: wire.Attach | None = None
        self.session_seen = ""  # the peer's session of its last Attach
        self.attached = False
        self.remote_waiters: dict[int, asyncio.Future] = {}
        self.attach_sent_at = 0.0

    # -- export (am.nbd.Export) -----------------------------------------------------------------------
    def available(self) -> str | None:
        if self.role != Role.PRIMARY:
            return f"{self.agent.cfg.node} is the secondary of {self.name}; its primary is {self.agent.cfg.peer}"
        if not self.local_readable() and not self.peer_replicating():
            return f"no readable replica of {self.name}: the local disk failed and the peer is not connected"
        return None

    def local_readable(self) -> bool:
        return self.disk == Disk.UP_TO_DATE

    def peer_expected(self) -> bool:
        """Connected to a peer that holds a replica: a write waits for it (its stream may be starting)."""
        return (self.agent.links.connected and self.peer is not None and self.peer.role == Role.SECONDARY
                and self.peer.disk != Disk.FAILED and not self.split_brain)

    def peer_replicating(self) -> bool:
        return (self.agent.links.connected and self.attached and self.peer is not None
                and self.peer.role == Role.SECONDARY and self.peer.disk != Disk.FAILED
                and not self.split_brain)

    def peer_replicating_primary(self) -> bool:
        return self.agent.links.connected and self.peer is not None and self.peer.role == Role.PRIMARY

    def lease_valid(self) -> bool:
        return time.monotonic() < self.lease_until

    @property
    def wanted_lease_s(self) -> float | None:
        """The lease to ask the witness for: a checkpointed resource's is shorter, so that a dead primary's lapses
        within the links' timeout (None: the witness's own)."""
        return self.agent.cfg.checkpoint_lease_s if self.meta.checkpoint_epoch_ms else None

    @property
    def lease_s(self) -> float:
        return self.wanted_lease_s or self.agent.lease_s

    async def _admit(self) -> bool:
        """True: serve the request here; False: forward it to the new primary (this node handed the role over
        in a swap, and its clients stay connected); ExportGone: drop the client."""
        while True:
            if self.role != Role.PRIMARY:
                if self.proxy and self.peer_replicating_primary():
                    return False
                if not (self.proxy and self.agent.links.connected):
                    raise ExportGone()
                # the hand-over is under way: wait for the peer to say it is primary (sync.on_attach wakes us)
            if self.io == IO.RUNNING:
                return True
            self._io_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._io_changed.wait(), self.agent.timeout)

    def wake(self) -> None:
        """Requests held in _admit look again (a role or the peer's state changed)."""
        self._io_changed.set()

    async def read(self, offset: int, length: int) -> bytes:
        self._bounds(offset, length)
        if self.role != Role.PRIMARY and not await self._admit():
            return await self.forward(0, offset, length)
        if self.local_readable() or (self.disk == Disk.INCONSISTENT and self._pulled(offset, length)):
            try:
                return self.image.read(offset, length)
            except LocalDiskError as exc:
                self.local_failed(exc)
        if not self.peer_replicating():
            raise NBDError(errno.EIO, "no readable replica")
        return await self.remote(0, offset, length)

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        self._bounds(offset, len(data))
        if self.io != IO.RUNNING and not await self._admit():
            await self.forward(wire.Op.WRITE, offset, len(data), data, fua)
            return
        self._local(lambda: self.image.write(offset, data), offset, len(data))
        await self._complete(self.queue_op(wire.Op.WRITE, offset, len(data), data, fua), fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        self._bounds(offset, length)
        if self.io != IO.RUNNING and not await self._admit():
            await self.forward(wire.Op.ZERO, offset, length, b"", fua)
            return
        self._local(lambda: self.image.zero(offset, length), offset, length)
        await self._complete(self.queue_op(wire.Op.ZERO, offset, length, b"", fua), fua)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        # a trim may leave anything behind: zeroes on both replicas keep them equal for the verify
        await self.write_zeroes(offset, length, fua, True)

    async def flush(self) -> None:
        if self.io != IO.RUNNING and not await self._admit():
            await self.forward(wire.Op.FLUSH, 0, 0)
            return
        op = self.queue_op(wire.Op.FLUSH, 0, 0, b"", False)
        await self._complete(op, True)

    async def forward(self, op: int, offset: int, length: int, data: bytes = b"", fua: bool = False) -> bytes:
        """A request of a client that stayed connected through a swap, served by the new primary."""
        try:
            return await self.remote(op, offset, length, data, fua)
        except NBDError as exc:
            if exc.errno in (errno.ESHUTDOWN, errno.EIO) and not self.peer_replicating_primary():
                raise ExportGone() from None  # the new primary is gone too: the client reconnects
            raise

    def _bounds(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise NBDError(errno.EINVAL, "beyond the end of the export")

    def _pulled(self, offset: int, length: int) -> bool:
        return all(r in self.pulled for r in self.bitmap.regions_of(offset, length))

    def _local(self, do, offset: int, length: int) -> None:
        if self.disk == Disk.FAILED:
            return
        for region in self.bitmap.regions_of(offset, length):
            if region in self.region_writes:
                self.region_writes[region] += 1
        try:
            do()
        except LocalDiskError as exc:
            self.local_failed(exc)

    def local_failed(self, exc: Exception) -> None:
        if self.disk != Disk.FAILED:
            log.error("%s: local disk failed (%s): running on the peer's replica", self.name, exc)
            self.disk.set(Disk.FAILED, f"local I/O error: {exc}")
            self.pulled.clear()
            if self.conn in (Conn.SYNC_SOURCE, Conn.SYNC_TARGET):
                self.sync_task(None)
                self.conn.set(Conn.CONNECTED if self.agent.links.connected else Conn.STANDALONE,
                              "resync stopped: local disk failed")
            self.save()
            self.announce()

    def queue_op(self, op: wire.Op, offset: int, length: int, data: bytes, fua: bool = False,
                 digest: bytes = b"") -> Pending:
        p = Pending(self.next_seq, op, offset, length, data, fua, digest)
        p.held = self.hold_writes and op in CLIENT_OPS
        if p.held and op != wire.Op.FLUSH and self.checkpointer is not None:
            self.checkpointer.open_regions.update(self.bitmap.regions_of(offset, length))
        self.next_seq += 1
        self.pending[p.seq] = p
        if self.peer_replicating():
            self.agent.links.send(p.message(self.name, self.meta.epoch, self.meta if op == wire.Op.SYNC_DONE
                                            else None))
        return p

    async def _complete(self, p: Pending, durable: bool) -> None:
        """Return once the op may be acknowledged to the client: on both replicas, or alone under the rules of
        decide.write_path. Raises NBDError when no replica took it."""
        while not p.acked:
            path = decide.write_path(peer_replicating=self.peer_expected(), lease_valid=self.lease_valid(),
                                     peer_outdated=self.peer_outdated)
            if path is not decide.WritePath.MIRROR and self.disk != Disk.UP_TO_DATE:
                # alone, only an UpToDate disk may take a write: a failed or half-resynced one would lose it
                self.pending.pop(p.seq, None)
                raise NBDError(errno.EIO, f"the local disk is {self.disk} and the peer is lost")
            if path is decide.WritePath.MIRROR:
                p.done.clear()
                await p.done.wait()  # set by the ack, the peer's loss, or the watchdog (``wake_stale``)
                continue
            if path is decide.WritePath.NEED_OUTDATE:
                await self.agent.outdate_peer(self)
                continue
            if path is decide.WritePath.SUSPEND:
                self.set_io(IO.SUSPENDED, "peer lost and no valid lease from the witness")
                self._io_changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._io_changed.wait(), self.agent.timeout)
                if self.role != Role.PRIMARY:
                    raise ExportGone()
                continue
            # DEGRADED: the bit that tells the resync about this region is stable before the reply
            if p.op in (wire.Op.WRITE, wire.Op.ZERO):
                await self.bitmap.mark(self.bitmap.regions_of(p.offset, p.length))
            self.pending.pop(p.seq, None)
            break
        if p.error == errno.ESTALE:
            raise ExportGone()
        if durable and self.disk != Disk.FAILED:
            try:
                await self.image.sync()
            except LocalDiskError as exc:
                self.local_failed(exc)
        if self.disk == Disk.FAILED and not p.acked:
            raise NBDError(errno.EIO, "no replica took the write")

    # -- the peer's acknowledgements -------------------------------------------------------------------
    def on_ack(self, msg: wire.RepAck) -> None:
        if msg.error == errno.EAGAIN:
            self._gap(msg.seq)
            return
        p = self.pending.get(msg.seq)
        if p is None:
            return
        if msg.error == errno.ESTALE:
            log.warning("%s: the peer refused op %d: it is primary of a newer epoch", self.name, msg.seq)
            self.demote_now("the peer is primary of a newer epoch")
            return
        if msg.error:
            # the peer's replica failed: it no longer mirrors; the op completes alone under the degraded rules
            log.error("%s: peer failed op %d (errno %d)", self.name, msg.seq, msg.error)
            if self.peer is not None:
                self.peer.disk = Disk.FAILED
            p.done.set()
            return
        p.acked, p.peer_digest = True, msg.digest
        del self.pending[msg.seq]
        p.done.set()

    def _gap(self, wanted: int) -> None:
        """The peer waits for op ``wanted``: re-send from it, or, if it completed without the peer (alone, with
        its regions in the bitmap), tell the peer where the stream goes on."""
        if self.role != Role.PRIMARY or not self.peer_replicating():
            return
        if wanted in self.pending:
            log.info("%s: the peer waits for op %d: re-sending from there", self.name, wanted)
            for p in self.pending.values():
                if p.seq >= wanted:
                    self.agent.links.send(p.message(self.name, self.meta.epoch,
                                                    self.meta if p.op == wire.Op.SYNC_DONE else None))
        else:
            # every op from ``wanted`` up to the next one still pending completed alone (one the peer had
            # acknowledged would be below what it waits for): it skips them, then gets the rest again
            upto = next((seq for seq in self.pending if seq > wanted), self.next_seq)
            log.info("%s: the peer waits for op %d, which completed without it: ops %d to %d skipped there",
                     self.name, wanted, wanted, upto - 1)
            self.agent.links.send(wire.Rep(self.name, self.meta.epoch, wanted, int(wire.Op.SKIP), length=upto))
            for p in self.pending.values():
                if p.seq >= upto:
                    self.agent.links.send(p.message(self.name, self.meta.epoch,
                                                    self.meta if p.op == wire.Op.SYNC_DONE else None))

    def wake_stale(self) -> None:
        """Wake the writes that waited a link timeout for the peer, so each decides again: cheaper than a timeout
        per write. A peer that connected but has not answered our Attach for a link timeout gets it again (it
        was lost on a link that died): until it answers, the writes wait for it."""
        limit = time.monotonic() - self.agent.timeout
        if not self.attached and self.peer_expected() and self.attach_sent_at < limit:
            log.info("%s: the peer has not answered our Attach: sending it again", self.name)
            self.announce()
        for p in self.pending.values():
            if p.sent_at > limit:
                break
            if p.op in CLIENT_OPS:  # a resync or verify op waits for its ack or the peer's loss, nothing else
                p.done.set()

    def resend(self, why: str) -> None:
        """The active link changed or a session started: everything unacknowledged again, in order."""
        if self.role != Role.PRIMARY or not self.peer_replicating():
            return
        if self.pending:
            log.info("%s: re-sending %d unacknowledged ops (%s)", self.name, len(self.pending), why)
        for p in self.pending.values():
            self.agent.links.send(p.message(self.name, self.meta.epoch,
                                            self.meta if p.op == wire.Op.SYNC_DONE else None))

    def peer_gone(self) -> None:
        self.attached = False
        if self.checkpointer is not None:
            self.checkpointer.peer_gone()
        if self.proxy:
            self.proxy = False
            self.agent.nbd.drop_clients(self.name)
        if self.conn != Conn.SPLIT_BRAIN:
            self.conn.set(Conn.STANDALONE, "peer lost")
        if self._sync_task:
            self._sync_task.cancel()
        for seq, p in list(self.pending.items()):
            if p.op not in CLIENT_OPS:  # resync and verify ops die with the session; their bits stay set
                del self.pending[seq]
            p.done.set()  # re-decide: degraded, or suspended
        for fut in self.remote_waiters.values():
            if not fut.done():
                fut.set_exception(NBDError(errno.EIO, "peer lost"))

    # -- the secondary's side of the stream -----------------------------------------------------------
    def on_rep(self, link: str, msg: wire.Rep) -> None:
        """Apply one op of the primary's stream. Synchronous up to the reply so ops, remote reads and resync
        reads are served in the order they arrived; only the fdatasync of a FLUSH or FUA runs in a task."""
        if self.role == Role.PRIMARY or msg.epoch < self.meta.epoch:
            self.agent.links.send_on(link, wire.RepAck(self.name, msg.seq, errno.ESTALE))
            return
        if msg.epoch > self.meta.epoch:
            self.meta.epoch = msg.epoch
            self.save()
        if msg.op == wire.Op.SKIP:
            if msg.seq == self.applied_seq + 1 and msg.length > msg.seq:
                self.applied_seq = msg.length - 1
            return
        if msg.seq <= self.applied_seq:
            digest = self.digest(msg.offset, msg.length) if msg.op == wire.Op.VERIFY else b""
            self.agent.links.send_on(link, wire.RepAck(self.name, msg.seq, 0, digest))
            return
        if msg.seq != self.applied_seq + 1:
            # a gap: say which op we wait for (once per op and 100 ms); the primary re-sends from there, or tells
            # us to skip ahead when that op completed without us (see on_ack)
            now = time.monotonic()
            if self._gap_nacked != (self.applied_seq + 1) or now - self._gap_nacked_at > 0.1:
                log.debug("%s: op %d ignored: waiting for op %d", self.name, msg.seq, self.applied_seq + 1)
                self._gap_nacked, self._gap_nacked_at = self.applied_seq + 1, now
                self.agent.links.send_on(link, wire.RepAck(self.name, self.applied_seq + 1, errno.EAGAIN))
            return
        self.applied_seq = msg.seq
        error, digest, durable = 0, b"", (msg.fua or msg.op == wire.Op.FLUSH) and not msg.held
        try:
            if self.disk == Disk.FAILED:
                raise LocalDiskError(5, "the replica failed earlier")
            if self.held_ops and not msg.held and msg.op != wire.Op.CHECKPOINT:
                # the primary went on without checkpoints (its peer was lost meanwhile): they come first, in order
                self._flush_held("the primary went on without checkpoints")
            if msg.held:
                self.held_ops.append(msg)  # made durable with its epoch's checkpoint
            elif msg.op == wire.Op.CHECKPOINT:
                self._commit_epoch(msg)
            elif msg.op in (wire.Op.WRITE, wire.Op.SYNC, wire.Op.ZERO):
                self._apply(msg)
            elif msg.op == wire.Op.VERIFY:
                digest = self.digest(msg.offset, msg.length)
            elif msg.op == wire.Op.SYNC_DONE:
                self.meta.gen, self.meta.history = msg.gen, list(msg.history)
                self.meta.bitmap_base = msg.gen
                self.crashed = self.meta.unclean = False
                self.disk.set(Disk.UP_TO_DATE, "resync finished")
                self.conn.set(Conn.CONNECTED, "resync finished")
                self.save()
                self.announce()
        except LocalDiskError as exc:
            self.local_failed(exc)
            error = errno.EIO
        ack = wire.RepAck(self.name, msg.seq, error, digest)
        if durable and not error:
            self.agent.spawn(self._ack_when_durable(link, ack))
        else:
            self.agent.links.send_on(link, ack)

    def _apply(self, msg: wire.Rep) -> None:
        if msg.op in (wire.Op.WRITE, wire.Op.SYNC) and msg.data:
            self.image.write(msg.offset, msg.data)
        elif msg.op == wire.Op.SYNC:
            self.image.zero(msg.offset, msg.length, keep_holes=True)  # a sparse replica stays sparse
        elif msg.op == wire.Op.ZERO:
            self.image.zero(msg.offset, msg.length)

    def _commit_epoch(self, msg: wire.Rep) -> None:
        """Level 3: the epoch's held writes go to the replica, in stream order, and its checkpoint is kept; the
        acknowledgement follows once they are durable. An empty one ends checkpointing: the writes are applied
        and no checkpoint is kept (a later takeover starts the VM from its disk)."""
        self._flush_held(None)
        if msg.data:
            self.standby_checkpoint, self.standby_epoch, self.standby_at = msg.data, msg.offset, time.monotonic()
        else:
            self.standby_reset("the primary ended checkpointing")

    def _flush_held(self, why: str | None) -> None:
        """The held writes to the replica, in stream order; ``why``: the checkpoint is forgotten as well (the
        replica has gone past it)."""
        held, self.held_ops = self.held_ops, []
        for op in held:
            self._apply(op)
        if why is not None and self.standby_checkpoint is not None:
            log.info("%s: checkpoint %d forgotten: %s", self.name, self.standby_epoch, why)
            self._forget_checkpoint()

    def _forget_checkpoint(self) -> None:
        self.standby_checkpoint, self.standby_epoch, self.standby_at = None, 0, 0.0

    def standby_reset(self, why: str) -> None:
        """Forget the open epoch and the checkpoint (a new stream starts: they belong to another)."""
        if self.held_ops or self.standby_checkpoint is not None:
            log.info("%s: checkpoint %d and %d held writes forgotten (%s)", self.name, self.standby_epoch,
                     len(self.held_ops), why)
        self.held_ops = []
        self._forget_checkpoint()

    def restore_point(self) -> bytes | None:
        """After a takeover: the open epoch's writes are dropped (the guest restarts from the checkpoint before
        them, and none of its output after that checkpoint went out), and the checkpoint is returned."""
        checkpoint = self.standby_checkpoint
        if checkpoint is not None:
            log.warning("%s: restoring from checkpoint %d; %d writes of the uncommitted epoch dropped", self.name,
                        self.standby_epoch, len(self.held_ops))
        self.held_ops = []
        self.standby_checkpoint = None
        return checkpoint

    def _overlay(self, offset: int, data: bytes) -> bytes:
        """What a read of the replica returns once the held writes are applied over it (a primary whose disk
        failed reads from here: it must see its own writes of the open epoch)."""
        if not self.held_ops:
            return data
        buf, end = bytearray(data), offset + len(data)
        for op in self.held_ops:
            lo, hi = max(offset, op.offset), min(end, op.offset + op.length)
            if lo >= hi or op.op not in (wire.Op.WRITE, wire.Op.ZERO):
                continue
            chunk = op.data[lo - op.offset : hi - op.offset] if op.op == wire.Op.WRITE else bytes(hi - lo)
            buf[lo - offset : hi - offset] = chunk
        return bytes(buf)

    async def _ack_when_durable(self, link: str, ack: wire.RepAck) -> None:
        try:
            await self.image.sync()
        except LocalDiskError as exc:
            self.local_failed(exc)
            ack.error = errno.EIO
        self.agent.links.send_on(link, ack)

    def digest(self, offset: int, length: int) -> bytes:
        try:
            return hashlib.blake2b(self.image.read(offset, length), digest_size=16).digest()
        except LocalDiskError:
            return b""

    # -- remote I/O: the peer's replica serves a primary whose disk failed (or is being pulled back) ---------
    async def remote(self, op: int, offset: int, length: int, data: bytes = b"", fua: bool = False) -> bytes:
        rid = self.agent.next_rid()
        fut = asyncio.get_running_loop().create_future()
        self.remote_waiters[rid] = fut
        try:
            if not self.agent.links.send(wire.Remote(self.name, rid, op, offset, length, data, fua)):
                raise NBDError(errno.EIO, "peer lost")
            return await asyncio.wait_for(fut, self.agent.timeout * 4)
        except TimeoutError:
            raise NBDError(errno.EIO, "the peer did not answer") from None
        finally:
            self.remote_waiters.pop(rid, None)

    def on_remote(self, link: str, msg: wire.Remote) -> None:
        if self.role == Role.PRIMARY:  # a request of a client the peer kept through a swap
            self.agent.spawn(self._serve_forwarded(link, msg))
            return
        if msg.op not in (0, wire.Op.MAP) or self.disk not in (Disk.UP_TO_DATE, Disk.OUTDATED):
            self.agent.links.send_on(link, wire.RemoteReply(self.name, msg.rid, errno.EIO))
            return
        try:
            if msg.op == wire.Op.MAP:
                data = self.zero_map(msg.offset, msg.length, int.from_bytes(msg.data, "big"))
            else:
                data = self._overlay(msg.offset, self.image.read(msg.offset, msg.length))
            self.agent.links.send_on(link, wire.RemoteReply(self.name, msg.rid, 0, data))
        except LocalDiskError as exc:
            self.local_failed(exc)
            self.agent.links.send_on(link, wire.RemoteReply(self.name, msg.rid, errno.EIO))

    def zero_map(self, offset: int, length: int, region: int) -> bytes:
        """One byte per ``region`` bytes of the range: 1 where the replica reads as zeroes (a hole, known without
        reading it, or zero bytes), 0 where it holds data. Raises LocalDiskError."""
        if region <= 0 or offset < 0 or length < 0 or offset + length > self.size:
            raise LocalDiskError(errno.EINVAL, "bad zero map request")
        def zero(at: int) -> bool:  # a held write there: not known to be zeroes
            n = min(region, offset + length - at)
            held = any(op.offset < at + n and at < op.offset + op.length for op in self.held_ops
                       if op.op in (wire.Op.WRITE, wire.Op.ZERO))
            return not held and self.image.is_zero(at, n)

        return bytes(int(zero(at)) for at in range(offset, offset + length, region))

    async def _serve_forwarded(self, link: str, msg: wire.Remote) -> None:
        data, error = b"", 0
        try:
            if msg.op == 0:
                data = await self.read(msg.offset, msg.length)
            elif msg.op == wire.Op.WRITE:
                await self.write(msg.offset, msg.data, msg.fua)
            elif msg.op == wire.Op.ZERO:
                await self.write_zeroes(msg.offset, msg.length, msg.fua, True)
            elif msg.op == wire.Op.FLUSH:
                await self.flush()
            else:
                error = errno.EINVAL
        except NBDError as exc:
            error = exc.errno
        except ExportGone:
            error = errno.ESHUTDOWN
        self.agent.links.send_on(link, wire.RemoteReply(self.name, msg.rid, error, data))

    def on_remote_reply(self, msg: wire.RemoteReply) -> None:
        fut = self.remote_waiters.get(msg.rid)
        if fut is not None and not fut.done():
            if msg.error:
                fut.set_exception(NBDError(msg.error, "the peer's replica failed"))
            else:
                fut.set_result(msg.data)

    # -- state, persistence, announcements --------------------------------------------------------------
    def refresh_io(self) -> None:
        """Said at once, not at the next write: with neither peer nor lease nothing is acknowledged here."""
        if (self.role == Role.PRIMARY and self.io == IO.RUNNING and not self.lease_valid()
                and not self.peer_expected()):
            self.set_io(IO.SUSPENDED, "peer lost and the lease expired")

    def sync_task(self, coro) -> None:
        """Run ``coro`` as this resource's one resync task (None: just stop the current one)."""
        if self._sync_task is not None and not self._sync_task.done():
            self._sync_task.cancel()
        if coro is not None:  # the figures of a finished resync must not pass for this one's
            self.sync_total, self.sync_done, self.sync_started = 0, 0, time.monotonic()
        self._sync_task = self.agent.spawn(coro) if coro is not None else None

    def set_io(self, state: IO, why: str) -> None:
        if self.io.set(state, why):
            self._io_changed.set()

    def save(self) -> None:
        self.meta.role = str(self.role.value)
        self.meta.disk = str(self.disk.value)
        self.meta.split_brain = self.split_brain
        save_meta(self.meta_path, self.meta)

    def attach_message(self) -> wire.Attach:
        first = next(iter(self.pending), self.next_seq)
        return wire.Attach(
            resource=self.name, size=self.size, role=str(self.role.value), epoch=self.meta.epoch,
            gen=self.meta.gen, history=self.meta.history, bitmap_base=self.meta.bitmap_base,
            disk=str(self.disk.value), dirty=self.bitmap.count(), crashed=self.crashed,
            session=f"{self.agent.links.boot}:{self.agent.session}", boot=self.stream(), next_seq=first,
            applied_seq=self.applied_seq, followed=self.followed, split_brain=self.split_brain,
            attached=self.attached)

    def stream(self) -> str:
        """The replication stream this node sends as primary: one per agent start and epoch."""
        return f"{self.agent.links.boot}/{self.meta.epoch}"

    def announce(self, link: str | None = None) -> None:
        """Our state to the peer: on ``link`` when answering what came on it (our active link may be one whose
        silence we have not noticed yet), else on the active link."""
        if not self.agent.links.connected:
            return
        self.attach_sent_at = time.monotonic()
        if link is None:
            self.agent.links.send(self.attach_message())
        else:
            self.agent.links.send_on(link, self.attach_message())

    def side(self) -> decide.Side:
        return decide.Side(self.meta.gen, tuple(self.meta.history), self.meta.bitmap_base, Disk(self.disk.value),
                           self.role == Role.PRIMARY, self.crashed, self.split_brain)

    def demote_now(self, why: str) -> None:
        """Stop being primary at once (another node holds the role): in-flight requests fail, clients dropped."""
        if self.role != Role.PRIMARY:
            return
        self.role.set(Role.SECONDARY, why)
        self.set_io(IO.UNAVAILABLE, why)
        self.lease_until = 0.0
        self.crashed = True  # it may hold writes the new primary never got: a full resync makes it a copy again
        self.meta.unclean = True
        for p in list(self.pending.values()):
            p.error = errno.ESTALE
            p.acked = True
            p.done.set()
        self.pending.clear()
        self.save()
        self.agent.nbd.drop_clients(self.name)

    def set_vm(self, vm: str) -> None:
        """The VM on this replica's side changed (a planned swap moved the VM and its paused copy): kept in the
        metadata, so that a later takeover's ``[vm] on_promote`` is told the VM that is paused here now."""
        if vm == self.meta.vm:
            return
        old, self.meta.vm = self.meta.vm, vm
        self.save()
        log.info("%s: its VM is %s (was %s)", self.name, vm or "none", old or "none")
        self.agent.event("resource", self.name, {"action": "vm", "vm": vm or None, "old": old or None})

    def status(self) -> dict:
        self.refresh_io()
        now = time.monotonic()
        oldest = next(iter(self.pending.values()), None)
        peer = self.peer
        return {
            "name": self.name,
            "size": self.size,
            "image": self.meta.image,
            "sr": self.meta.sr or None,
            "vdi": self.meta.vdi or None,
            "vm": self.meta.vm or None,
            "role": str(self.role),
            "disk": str(self.disk),
            "connection": str(self.conn),
            "io": str(self.io),
            "epoch": self.meta.epoch,
            "generation": self.meta.gen,
            "history": self.meta.history[:4],
            "split_brain": self.split_brain,
            "needs_operator": self.needs_operator,
            "lease_ms_left": max(0, round((self.lease_until - now) * 1000)) if self.role == Role.PRIMARY else None,
            "peer_outdated": self.peer_outdated,
            "dirty_regions": self.bitmap.count(),
            "region_bytes": self.bitmap.region,
            "in_flight": len(self.pending),
            "replication_lag_ms": round((now - oldest.sent_at) * 1000, 1) if oldest else 0.0,
            "resync": {
                "total": self.sync_total, "done": self.sync_done,
                "rate_mib_s": round(self.sync_done * self.bitmap.region / (1 << 20) / max(now - self.sync_started,
                                                                                         1e-3), 1)
                if self.sync_total else 0.0,
            },
            "peer": None if peer is None else {
                "role": peer.role, "disk": peer.disk, "generation": peer.gen, "dirty_regions": peer.dirty},
            "verify": self.verify,
            "clients": self.agent.nbd.clients(self.name),
            "checkpoint": self.checkpointer.status() if self.checkpointer is not None else None,
        }
