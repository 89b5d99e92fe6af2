"""Level 3's disk epochs on the secondary (protocol D, am/resource.py): what a replica does with the held writes of
an open epoch, op by op, deterministically. A Resource on a real image and bitmap in a temporary folder; its agent is
a recorder of what it sends (the only part replaced: no link, no peer)."""

from __future__ import annotations

import asyncio

import pytest

from am import wire
from am.resource import Resource
from am.states import Disk
from am.store import Bitmap, Image, Meta

SIZE = 1 << 20
NAME = "r0"


class Links:
    def __init__(self) -> None:
        self.sent: list[object] = []
        self.connected = True

    def send_on(self, link: str, msg) -> bool:  # noqa: ARG002 - the link does not matter here
        self.sent.append(msg)
        return True

    send = send_on


class Agent:
    """What a secondary's Resource asks of its agent while it applies the stream."""

    def __init__(self) -> None:
        self.links = Links()
        self.timeout = 0.5
        self.checkpointer = None

    def state_changed(self, *_args) -> None:
        pass

    def spawn(self, coro):
        return asyncio.get_running_loop().create_task(coro)


@pytest.fixture
def replica(tmp_path):
    meta = Meta(name=NAME, size=SIZE, image=str(tmp_path / "r0.img"), role="Secondary", disk=str(Disk.UP_TO_DATE),
                epoch=1, gen="g1")
    image = Image(tmp_path / "r0.img", SIZE, create=True)
    res = Resource(Agent(), meta, tmp_path / "r0.meta.json", image, Bitmap(tmp_path / "r0.bitmap", SIZE, 65536))
    yield res
    image.close()


def op(seq: int, kind: wire.Op, offset: int = 0, data: bytes = b"", *, held: bool = False,
       length: int | None = None) -> wire.Rep:
    return wire.Rep(NAME, 1, seq, int(kind), offset, len(data) if length is None else length, data, held=held)


def acks(res: Resource) -> list[int]:
    return [m.seq for m in res.agent.links.sent if isinstance(m, wire.RepAck) and not m.error]


def test_held_writes_wait_for_their_checkpoint_then_land_in_stream_order(replica):
    asyncio.run(_held_writes(replica))


async def _held_writes(res: Resource) -> None:
    res.on_rep("a", op(1, wire.Op.WRITE, 0, b"A" * 512, held=True))
    res.on_rep("a", op(2, wire.Op.WRITE, 256, b"B" * 512, held=True))
    assert acks(res) == [1, 2]  # acknowledged on receipt
    assert res.image.read(0, 768) == bytes(768)  # but not on the replica
    assert res._overlay(0, res.image.read(0, 768)) == b"A" * 256 + b"B" * 512  # a remote read sees them
    assert res.zero_map(0, SIZE, 65536)[0] == 0  # and a pull would copy their region
    checkpoint = op(3, wire.Op.CHECKPOINT, 7, b"state-7", length=7)
    checkpoint.fua = True  # as the primary sends it: acknowledged once durable
    res.on_rep("a", checkpoint)
    assert acks(res) == [1, 2]
    for _ in range(100):  # the acknowledgement follows the fdatasync, in a task
        await asyncio.sleep(0.01)
        if acks(res) == [1, 2, 3]:
            break
    assert res.image.read(0, 768) == b"A" * 256 + b"B" * 512
    assert (res.standby_checkpoint, res.standby_epoch, res.held_ops) == (b"state-7", 7, [])
    assert acks(res) == [1, 2, 3]


def test_a_takeover_drops_the_open_epoch_and_restores_the_last_checkpoint(replica):
    res = replica
    res.on_rep("a", op(1, wire.Op.CHECKPOINT, 1, b"state-1", length=7))
    res.on_rep("a", op(2, wire.Op.WRITE, 4096, b"lost" * 128, held=True))
    assert res.restore_point() == b"state-1"
    assert res.held_ops == [] and res.image.read(4096, 512) == bytes(512)


def test_an_op_that_is_not_held_applies_the_held_ones_first_and_forgets_the_checkpoint(replica):
    # The primary went on without checkpoints (its peer was lost, then came back): the held writes are older than
    # anything after them in the stream, and the replica is past its checkpoint.
    res = replica
    res.on_rep("a", op(1, wire.Op.CHECKPOINT, 1, b"state-1", length=7))
    res.on_rep("a", op(2, wire.Op.WRITE, 0, b"old!" * 128, held=True))
    res.on_rep("a", op(3, wire.Op.SYNC, 0, b"new!" * 128))
    assert res.image.read(0, 512) == b"new!" * 128
    assert res.standby_checkpoint is None and res.held_ops == []


def test_an_empty_checkpoint_ends_the_stream_with_the_writes_kept(replica):
    res = replica
    res.on_rep("a", op(1, wire.Op.CHECKPOINT, 1, b"state-1", length=7))
    res.on_rep("a", op(2, wire.Op.WRITE, 0, b"kept" * 128, held=True))
    res.on_rep("a", op(3, wire.Op.CHECKPOINT, 0, b"", length=0))
    assert res.image.read(0, 512) == b"kept" * 128
    assert res.standby_checkpoint is None and res.restore_point() is None
