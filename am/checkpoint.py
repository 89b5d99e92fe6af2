"""Level 3: checkpointing a VM every epoch, its output held until the secondary has the checkpoint (Remus-style).

A primary resource with a ``checkpoint`` setting runs one ``Checkpointer``. At the end of each epoch it

1. **pauses** the guest through its checkpoint source (no request of the guest is half done),
2. closes the epoch of the **output buffer**: every packet the guest sent so far belongs to this epoch, every later
   one to the next (a kernel ACK sent during the capture is held one epoch longer, never released early),
3. **captures** the guest's state (opaque bytes, never interpreted here),
4. queues the checkpoint in the resource's replication stream (``wire.Op.CHECKPOINT``), after every write the
   guest made in the epoch and before any later one, and
5. **resumes** the guest.

When the secondary acknowledges the checkpoint (it applied the epoch's writes, which it held until then, and keeps
the state), the epoch's packets are released. So a client never sees output of a state the secondary could not
restore, and the secondary's disk always matches its last checkpoint. When the primary dies, the secondary takes
over as in Level 2 (both links silent, the witness's grant), drops the writes of the uncommitted epoch and hands
the last checkpoint to its toolstack to restore the guest (``CheckpointSource.restore``).

Leaving checkpointing with output held (the peer lost, its replica not UpToDate) needs the witness to record the
peer as outdated first: only then can the secondary never be promoted with the old checkpoint, and the held packets
go out. A primary that lost its role drops them.

The checkpoint source is an interface: the test bed's guest runtime implements it over a Unix socket per VM
(``GuestSocketSource``, ``xapisim.live.guest``); am/README.md says how a Xen host's Remus/COLO stream fits it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import msgspec

from am import wire
from am.states import Checkpoint, Conn, Disk, Role, StateCell
from am.store import write_atomically

if TYPE_CHECKING:
    from am.resource import Resource

log = logging.getLogger("am.checkpoint")

EPOCH_MS_MIN, EPOCH_MS_MAX, EPOCH_MS_DEFAULT = 20, 500, 50
MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
MAX_MACS = 8
MAX_IN_FLIGHT = 4  # checkpoints sent and not yet acknowledged: beyond, the guest runs on and its output waits
MAX_CHECKPOINT = 32 << 20
SOURCE_TIMEOUT = 1.0
QUEUE_BASE = 4200  # NFQUEUE numbers of this agent's output buffers: QUEUE_BASE + n
QUEUE_MAX_LEN = 16384  # packets the kernel may queue for one VM


class CheckpointConfig(msgspec.Struct, forbid_unknown_fields=True):
    """A resource's Level 3 setting, given at creation (both sides) and kept in its metadata."""

    epoch_ms: int = EPOCH_MS_DEFAULT
    macs: list[str] = []  # the VM's MACs: its output is held by source MAC

    def check(self) -> str | None:
        """None, or what is wrong, as a sentence."""
        if isinstance(self.epoch_ms, bool) or not EPOCH_MS_MIN <= self.epoch_ms <= EPOCH_MS_MAX:
            return f"checkpoint.epoch_ms must be an integer from {EPOCH_MS_MIN} to {EPOCH_MS_MAX}"
        if not 1 <= len(self.macs) <= MAX_MACS or not all(isinstance(m, str) and MAC.fullmatch(m)
                                                          for m in self.macs):
            return (f"checkpoint.macs must list 1 to {MAX_MACS} MAC addresses, lowercase with colons "
                    "(02:00:00:aa:bb:cc)")
        if len(set(self.macs)) != len(self.macs):
            return "checkpoint.macs lists a MAC twice"
        return None


# -- the checkpoint source's control protocol: one Unix socket per VM, framed msgspec ----------------------------

class SourceRequest(msgspec.Struct):
    op: str  # "pause" | "capture" | "resume" | "hello"


class SourceReply(msgspec.Struct):
    ok: bool
    data: bytes = b""
    error: str = ""


FRAME = struct.Struct(">I")
_request_decoder = msgspec.msgpack.Decoder(SourceRequest)
_reply_decoder = msgspec.msgpack.Decoder(SourceReply)
_encoder = msgspec.msgpack.Encoder()


def frame(msg: SourceRequest | SourceReply) -> bytes:
    body = _encoder.encode(msg)
    return FRAME.pack(len(body)) + body


async def _read_body(reader: asyncio.StreamReader) -> bytes:
    (length,) = FRAME.unpack(await reader.readexactly(FRAME.size))
    if length > MAX_CHECKPOINT + 1024:
        raise ValueError(f"a control frame of {length} bytes is over the limit")
    return await reader.readexactly(length)


async def read_request(reader: asyncio.StreamReader) -> SourceRequest:
    """Raises ValueError on a malformed frame, EOFError/IncompleteReadError at the end."""
    try:
        return _request_decoder.decode(await _read_body(reader))
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"malformed control request: {exc}") from None


class SourceError(Exception):
    """The checkpoint source did not do what was asked (gone, timed out, refused)."""


class CheckpointSource(Protocol):
    async def pause(self) -> None: ...  # no request of the guest is half done, no output until resume
    async def capture(self) -> bytes: ...  # the guest's state now (what changed since the last capture)
    async def resume(self) -> None: ...
    async def close(self) -> None: ...


class GuestSocketSource:
    """The test bed's guest runtime as a checkpoint source: requests over its Unix socket, one at a time."""

    def __init__(self, path: Path, timeout: float = SOURCE_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def _call(self, op: str) -> bytes:
        try:
            if self._conn is None:
                self._conn = await asyncio.wait_for(asyncio.open_unix_connection(str(self.path)), self.timeout)
            reader, writer = self._conn
            writer.write(frame(SourceRequest(op)))
            reply = _reply_decoder.decode(await asyncio.wait_for(_read_body(reader), self.timeout))
        except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError, ValueError,
                msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self.close()
            raise SourceError(f"{op}: {exc or type(exc).__name__}") from None
        if not reply.ok:
            raise SourceError(f"{op} refused: {reply.error}")
        return reply.data

    async def pause(self) -> None:
        await self._call("pause")

    async def capture(self) -> bytes:
        return await self._call("capture")

    async def resume(self) -> None:
        await self._call("resume")

    async def close(self) -> None:
        if self._conn is not None:
            _, writer = self._conn
            self._conn = None
            writer.close()


def stage_restore(path: Path, checkpoint: bytes) -> None:
    """Restore, the test bed's way: the checkpoint in a file the toolstack starts the VM from when it is unpaused
    (``xapisim.live.bed``). Written atomically: a torn checkpoint is never restored."""
    write_atomically(path, checkpoint)


# -- the output buffer ------------------------------------------------------------------------------------------

@dataclass
class Held:
    epoch: int
    at: float
    packet: object  # netfilterqueue.Packet


class OutputBuffer:
    """A VM's packets held per epoch: ``iptables -j NFQUEUE`` on the FORWARD hook of this host's bridges (bridged
    frames pass iptables with ``bridge-nf-call-iptables``), matched by the VM's source MACs. Frames to dom0 itself
    (the guest's NBD disk) do not pass FORWARD and are never held. Without a listener on the queue the kernel drops
    what matches: when the agent dies, nothing of its VM's held output leaks out."""

    def __init__(self, queue: int, macs: list[str], tag: str) -> None:
        self.queue, self.macs, self.tag = queue, macs, tag
        self.holding = False
        self.epoch = 1  # the epoch the packets arriving now belong to
        self.held: collections.deque[Held] = collections.deque()
        self.last_hold_ms = 0.0
        self.dropped = 0
        self._nfq = None
        self._fd: int | None = None

    def _rules(self, action: str) -> list[list[str]]:
        return [["iptables", "-w", "2", action, "FORWARD", "-m", "mac", "--mac-source", mac,
                 "-m", "comment", "--comment", self.tag, "-j", "NFQUEUE", "--queue-num", str(self.queue)]
                for mac in self.macs]

    async def start(self) -> None:
        from netfilterqueue import NetfilterQueue  # a C extension: only a Level 3 host needs it

        with contextlib.suppress(OSError):  # bridged frames through iptables (br_netfilter), this namespace only
            Path("/proc/sys/net/bridge/bridge-nf-call-iptables").write_text("1\n")
        self._nfq = NetfilterQueue()
        self._nfq.bind(self.queue, self._on_packet, max_len=QUEUE_MAX_LEN)
        self._fd = self._nfq.get_fd()
        asyncio.get_running_loop().add_reader(self._fd, self.drain)
        await self._iptables("-D", missing_ok=True)  # a rule left by an agent that died
        await self._iptables("-I")

    async def _iptables(self, action: str, missing_ok: bool = False) -> None:
        for argv in self._rules(action):
            while True:
                try:
                    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.DEVNULL,
                                                                stderr=subprocess.PIPE)
                except OSError:
                    if missing_ok:
                        return
                    raise
                _, err = await proc.communicate()
                if proc.returncode == 0 and action == "-D":
                    continue  # delete every copy
                if proc.returncode and not missing_ok:
                    raise OSError(f"{' '.join(argv)}: {err.decode(errors='replace').strip()}")
                break

    def _on_packet(self, packet) -> None:
        if self.holding:
            self.held.append(Held(self.epoch, time.monotonic(), packet))
        else:
            packet.accept()

    def drain(self) -> None:
        """Take every packet the kernel has queued (their callbacks run now)."""
        if self._nfq is not None:
            with contextlib.suppress(OSError):
                self._nfq.run(block=False)

    def boundary(self) -> int:
        """Close the current epoch (after the guest paused): returns its number; later packets belong to the next."""
        self.drain()
        closed = self.epoch
        self.epoch += 1
        return closed

    def release(self, upto: int) -> int:
        now, n, total = time.monotonic(), 0, 0.0
        while self.held and self.held[0].epoch <= upto:
            held = self.held.popleft()
            held.packet.accept()
            n += 1
            total += now - held.at
        if n:
            self.last_hold_ms = total / n * 1000
        return n

    def release_all(self) -> int:
        self.drain()
        return self.release(self.epoch)

    def drop_all(self) -> int:
        self.drain()
        n = len(self.held)
        while self.held:
            self.held.popleft().packet.drop()
        self.dropped += n
        return n

    async def close(self, release: bool) -> None:
        self.holding = False
        if release:
            self.release_all()
        else:
            self.drop_all()
        await self._iptables("-D", missing_ok=True)
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            self._fd = None
        if self._nfq is not None:
            with contextlib.suppress(Exception):
                self._nfq.unbind()
            self._nfq = None


# -- the primary's epoch loop -------------------------------------------------------------------------------------

@dataclass
class InFlight:
    epoch: int
    captured_at: float
    op: object  # resource.Pending
    regions: set[int]  # the bitmap regions the epoch's held writes touched


class Checkpointer:
    """One Level 3 resource's checkpointing, on whichever side it runs: a loop while the resource is primary, the
    state ``Standby`` while it is secondary."""

    def __init__(self, res: Resource, cfg: CheckpointConfig, source_for: Callable[[str], CheckpointSource],
                 queue: int) -> None:
        self.res, self.cfg = res, cfg
        self.source_for = source_for  # the checkpoint source of a VM (its uuid)
        self.vm = res.meta.vm
        self.source = source_for(self.vm)
        self.epoch_s = cfg.epoch_ms / 1000
        self.state = StateCell(f"{res.name} checkpoint", Checkpoint.STANDBY, res.agent.state_changed)
        self.out = OutputBuffer(queue, cfg.macs, f"eac-am:{res.name}")
        self.in_flight: collections.OrderedDict[int, InFlight] = collections.OrderedDict()
        self.streaming = False  # a checkpoint stream is open towards the peer (its writes are held there)
        self.open_regions: set[int] = set()  # regions of the open epoch's held writes (Resource.queue_op)
        self.last_committed = 0
        self.last_commit_at = 0.0
        self.size_bytes = 0
        self.capture_ms = 0.0
        self.commit_ms = 0.0
        self._started = False
        self._retry_at = 0.0
        self._task: asyncio.Task | None = None
        self.swapping = False  # a planned swap is under way (roles.swap): no checkpoint is taken

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = self.res.agent.spawn(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._started:
            await self.out.close(release=False)
            self._started = False
        await self.source.close()

    # the loop ---------------------------------------------------------------------------------------------------
    async def run(self) -> None:
        next_at = time.monotonic()
        while True:
            next_at += self.epoch_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if time.monotonic() - next_at > self.epoch_s:
                next_at = time.monotonic()  # late (a slow capture): no burst of catch-up epochs
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: checkpoint epoch", self.res.name)

    def _peer_ready(self) -> str | None:
        """None when a checkpoint can commit on the peer: it replicates and its replica is UpToDate (ours may be
        failed, or being pulled back from it: SyncTarget)."""
        res = self.res
        if not res.peer_replicating():
            return "the peer is not connected"
        if res.peer.disk != Disk.UP_TO_DATE or res.conn not in (Conn.CONNECTED, Conn.SYNC_TARGET):
            return f"the peer's replica is not UpToDate (connection {res.conn})"
        return None

    async def tick(self) -> None:
        res = self.res
        if res.role != Role.PRIMARY:
            if self.out.holding or self.out.held:
                self.out.holding = False
                self.out.drop_all()  # another node holds the role: never let this guest's output out
            self.streaming = False
            res.hold_writes = False
            self.in_flight.clear()
            self.last_committed = 0
            self.state.set(Checkpoint.STANDBY, "secondary")
            return
        if self.swapping:
            return
        if not self._started:
            if time.monotonic() < self._retry_at:
                return
            try:
                await self.out.start()
            except (OSError, ImportError) as exc:  # no iptables, no NetfilterQueue, not root...
                self._retry_at = time.monotonic() + 1.0
                await self.out.close(release=True)
                self.state.set(Checkpoint.UNPROTECTED, f"the output buffer cannot start: {exc}")
                return
            self._started = True
        if self.res.meta.vm != self.vm:  # a planned swap exchanged the VMs: this side's guest is another
            await self.source.close()
            self.vm = self.res.meta.vm
            self.source = self.source_for(self.vm)
        why = self._peer_ready()
        if why is not None:
            await self._unprotect(why)
            return
        if res.peer_outdated:
            return  # the peer has just come back: once the witness knows it is current (sync.mark_peer_current)
        self._check_stall()
        if len(self.in_flight) >= MAX_IN_FLIGHT:
            return
        await self.checkpoint()

    def _check_stall(self) -> None:
        if not self.in_flight:
            return
        oldest = next(iter(self.in_flight.values()))
        limit = max(10 * self.epoch_s, 1.0)
        if time.monotonic() - oldest.captured_at > limit:
            self.state.set(Checkpoint.STALLED, f"checkpoint {oldest.epoch} unacknowledged for over {limit:g} s")

    async def checkpoint(self) -> None:
        res = self.res
        started = time.monotonic()
        try:
            await self.source.pause()
        except SourceError as exc:
            self._no_guest(str(exc))
            return
        try:
            epoch = self.out.boundary()
            data = await self.source.capture()
            if len(data) > MAX_CHECKPOINT:
                raise SourceError(f"a checkpoint of {len(data)} bytes is over the {MAX_CHECKPOINT} limit")
            if res.role != Role.PRIMARY or self._peer_ready() is not None:
                return  # changed while capturing: the next tick decides
            op = res.queue_op(wire.Op.CHECKPOINT, epoch, len(data), data, fua=True)
            res.hold_writes = True  # the guest's next writes are held at the secondary until the next checkpoint
            self.out.holding = True
            self.streaming = True
            self.in_flight[epoch] = InFlight(epoch, time.monotonic(), op, self.open_regions)
            self.open_regions = set()
            self.size_bytes = len(data)
            res.agent.spawn(self._committed(epoch, op))
        except SourceError as exc:
            self._no_guest(str(exc))
            return
        finally:
            with contextlib.suppress(SourceError):
                await self.source.resume()
            self.capture_ms = (time.monotonic() - started) * 1000

    async def _committed(self, epoch: int, op) -> None:
        await op.done.wait()
        flight = self.in_flight.pop(epoch, None)
        if not op.acked or flight is None:
            return  # the peer is gone: the output stays held until the witness outdates it (``_unprotect``)
        now = time.monotonic()
        self.out.release(epoch)
        if not self.last_committed:  # the guest runs and checkpoints: a checkpoint it was restored from is stale
            self.res.agent.restore_path(self.res.name).unlink(missing_ok=True)
        self.last_committed, self.last_commit_at = epoch, now
        self.commit_ms = (now - flight.captured_at) * 1000
        self.state.set(Checkpoint.CHECKPOINTING, f"checkpoint {epoch} acknowledged")

    async def _unprotect(self, why: str) -> None:
        """No checkpoint can commit: once nothing held can be contradicted by the peer, run on without holding."""
        res = self.res
        if self.out.holding:
            peer = res.peer
            if res.peer_replicating() and peer is not None and peer.disk != Disk.UP_TO_DATE:
                pass  # connected, and its replica cannot take over (resyncing, outdated, failed): nothing to fear
            elif res.agent.links.connected:
                return  # connected, its session not attached yet: keep holding, look again at the next tick
            elif not res.peer_outdated:
                await res.agent.outdate_peer(res)  # the witness records it: it can no longer take over
                if res.role != Role.PRIMARY:
                    return  # the peer took over: ``tick`` drops the held output
                if not res.peer_outdated:
                    return  # the witness did not answer: the output stays held, the next tick asks again
            released = self.out.release_all()
            self.out.holding = False
            log.warning("%s: checkpointing stopped (%s): %d held packets released", res.name, why, released)
        self.in_flight.clear()
        self.streaming = False
        res.hold_writes = False
        self.state.set(Checkpoint.UNPROTECTED, why)

    def _no_guest(self, why: str) -> None:
        """The guest does not answer (stopped, crashed, not started yet): its held output is dropped (it may belong
        to a state no checkpoint holds) and the peer is told the stream ended, so that it applies the writes it
        held and forgets its checkpoint: a later failover starts the VM from its disk, as Level 2 does."""
        self.out.holding = False
        self.out.drop_all()
        self.end_stream()
        self.in_flight.clear()
        self.state.set(Checkpoint.NO_GUEST, f"the guest's checkpoint source: {why}")

    def end_stream(self) -> None:
        """The stream ends (an empty ``CHECKPOINT``): the peer applies the writes it held and forgets its checkpoint.
        Also for a planned swap (with ``swapping`` set): the guest runs on, and moves live."""
        if self.streaming and self.res.peer_replicating():
            self.res.queue_op(wire.Op.CHECKPOINT, 0, 0, b"", fua=True)
        self.streaming = False
        self.res.hold_writes = False

    def release_for_swap(self) -> None:
        """The peer flushed after the stream's end: nothing it holds can contradict the guest's output any more,
        which goes out (dropped, its clients would wait for TCP to send it again)."""
        released = self.out.release_all()
        self.out.holding = False
        self.in_flight.clear()
        if released:
            log.info("%s: planned swap: %d held packets released", self.res.name, released)

    def peer_gone(self) -> None:
        """The peer session ended: the writes it acknowledged but held (their checkpoint not committed) may be lost
        there (a restarted agent forgets them): their regions go in the dirty bitmap, so a resync copies them. The
        bits are set at once (the stable write follows), before any resync decision can look."""
        regions = set(self.open_regions)
        for flight in self.in_flight.values():
            regions |= flight.regions
        if regions:
            self.res.agent.spawn(self.res.bitmap.mark(sorted(regions)))

    def status(self) -> dict:
        now = time.monotonic()
        standby = self.res.role != Role.PRIMARY
        committed = self.res.standby_epoch if standby else self.last_committed
        committed_at = self.res.standby_at if standby else self.last_commit_at
        return {
            "epoch_ms": self.cfg.epoch_ms,
            "state": str(self.state),
            "why": self.state.why,
            "last_committed": committed,
            "last_commit_age_ms": round((now - committed_at) * 1000, 1) if committed_at else None,
            "size_bytes": len(self.res.standby_checkpoint or b"") if standby else self.size_bytes,
            "capture_ms": round(self.capture_ms, 3),
            "commit_ms": round(self.commit_ms, 3),
            "output_hold_ms": round(self.out.last_hold_ms, 3),
            "held_packets": len(self.out.held),
            "in_flight": len(self.in_flight),
        }
