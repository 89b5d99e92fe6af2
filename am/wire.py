"""The peer protocol between two AMs, declared once: msgspec Structs in a tagged union, framed by a 4-byte length.

Both availability links carry the same messages. Replication ops (``Rep``) carry a per-resource sequence number so
the secondary applies each exactly once and in order, whichever link brought it (see ``resource.py``).
"""
from __future__ import annotations

import asyncio
import enum
import struct

import msgspec

FRAME = struct.Struct(">I")
MAX_FRAME = 40 * 1024 * 1024  # a 32 MiB write plus its header


class Op(enum.IntEnum):
    WRITE = 1
    ZERO = 2  # write zeroes (may punch a hole)
    FLUSH = 3  # fdatasync of the replica before the ack
    SYNC = 4  # resync data: a region copied from the sync source (data empty = zeroes)
    SYNC_DONE = 5  # every dirty region was sent: the target becomes UpToDate with the source's generation
    VERIFY = 6  # hash a region after every earlier op: online verify
    SKIP = 7  # ops seq .. length - 1 completed without the peer (their regions are in the dirty bitmap)
    MAP = 8  # Remote only: which regions of a range read as zeroes (data: the region size, 8 bytes big-endian;
    #          the reply: one byte per region, 1 = zeroes): a pull copies only the others
    CHECKPOINT = 9  # Level 3: offset = the epoch, data = the guest's state; the secondary applies the writes it held
    #                 since the last one, keeps the state, then acknowledges. Empty data: checkpointing ended


class Hello(msgspec.Struct, tag="hello"):
    node: str
    link: str
    boot: str  # changes at every agent start: the peer knows it restarted


class Heartbeat(msgspec.Struct, tag="hb"):
    sent: float
    echo: float = 0.0  # the last ``sent`` received from the other side, for the round-trip time


class Attach(msgspec.Struct, tag="attach"):
    """A resource's state, sent by both sides whenever the peer session (re)starts or the state changes."""

    resource: str
    size: int
    role: str
    epoch: int
    gen: str
    history: list[str]
    bitmap_base: str  # the generation the dirty bitmap counts from
    disk: str
    dirty: int
    crashed: bool  # was a primary that stopped without a clean demotion, not resynced since
    session: str  # the sender's peer session (agent boot and count): each side answers a new one with its Attach
    boot: str  # primary: its stream (agent boot id / epoch); seqs restart their meaning with each
    next_seq: int = 1  # primary: the seq of the first op it will (re)send in this session
    applied_seq: int = 0  # secondary: the last op applied of the stream of ``followed``
    followed: str = ""  # secondary: the stream it applied
    split_brain: bool = False
    attached: bool = False  # the sender holds the receiver's Attach of this session: no answer needed


class Rep(msgspec.Struct, tag="rep"):
    resource: str
    epoch: int
    seq: int
    op: int
    offset: int = 0
    length: int = 0
    data: bytes = b""
    fua: bool = False
    gen: str = ""  # SYNC_DONE: the generation the target adopts
    history: list[str] = []
    held: bool = False  # Level 3: a client op of the open epoch, applied at the next CHECKPOINT (am/checkpoint.py)


class RepAck(msgspec.Struct, tag="ack"):
    resource: str
    seq: int
    error: int = 0  # errno; ESTALE: the sender is not (or no longer) the primary of this epoch
    digest: bytes = b""  # VERIFY


class Remote(msgspec.Struct, tag="rio"):
    """I/O served by the peer's replica: reads of a primary whose disk failed, requests of proxied clients."""

    resource: str
    rid: int
    op: int  # 0 = read, else an Op of a client's request forwarded to the primary
    offset: int = 0
    length: int = 0
    data: bytes = b""
    fua: bool = False


class RemoteReply(msgspec.Struct, tag="rior"):
    resource: str
    rid: int
    error: int = 0
    data: bytes = b""


class Control(msgspec.Struct, tag="ctl"):
    """Role hand-over between peers (planned swap): offer, done, failed."""

    resource: str
    action: str
    epoch: int = 0
    reason: str = ""


class Probe(msgspec.Struct, tag="probe"):
    """Test traffic of active validation: echoed with its payload on the link it came from."""

    pid: int
    payload: bytes
    reply: bool = False


class NicState(msgspec.Struct, tag="nic"):
    """Network pairing (``pairing.py``): this host's NIC and what it does with the peer's. Sent on every up link at
    each heartbeat and at once on a change; the receiver keeps the newest (``boot``, ``seq``)."""

    boot: str  # the sender's agent boot: ``seq`` counts from its start
    seq: int
    carrier: bool  # the sender's NIC has a carrier
    mode_seq: int  # changes whenever the sender starts or stops borrowing
    echo: int = 0  # the receiver's mode_seq as the sender last saw it
    borrow: str = ""  # link: the sender's NIC is out of its bridge and its pairing port of that link in
    lend: str = ""  # link: the sender's pairing port of that link is in its bridge, beside its NIC
    macs: list[str] = []  # borrowing: the MACs behind the sender's bridge, for the lender to announce


Message = Hello | Heartbeat | Attach | Rep | RepAck | Remote | RemoteReply | Control | Probe | NicState

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class BadFrame(Exception):
    """A torn or malformed frame: the link is closed, never the agent."""


def encode(msg: Message) -> bytes:
    return b"".join(encode_parts(msg))


def encode_parts(msg: Message) -> tuple[bytes, bytes]:
    """Header and body apart: a 64 KiB write is not copied once more to be framed."""
    body = _encoder.encode(msg)
    return FRAME.pack(len(body)), body


async def read_message(reader: asyncio.StreamReader) -> Message:
    header = await reader.readexactly(FRAME.size)
    (length,) = FRAME.unpack(header)
    if length > MAX_FRAME:
        raise BadFrame(f"frame of {length} bytes is over the {MAX_FRAME} limit")
    body = await reader.readexactly(length)
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadFrame(f"malformed frame: {exc}") from None
