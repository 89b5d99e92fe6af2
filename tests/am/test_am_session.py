"""The Attach handshake that starts a peer session, on one Resource with a link layer that records what is sent
where: answers go back on the link they came on, and a lost answer is asked for again."""
from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

from am import sync, wire
from am.resource import Resource
from am.states import Disk, Role
from am.store import Bitmap, Image, Meta

SIZE = 1 << 20


class RecordingLinks:
    """Both links up; ``active`` is the one this side still believes in."""

    def __init__(self, active: str) -> None:
        self.active, self.boot, self.connected = active, "boot-b", True
        self.sent: list[tuple[str, wire.Message]] = []

    def send(self, msg: wire.Message) -> bool:
        self.sent.append((self.active, msg))
        return True

    def send_on(self, link: str, msg: wire.Message) -> None:
        self.sent.append((link, msg))


def resource(tmp_path: Path, role: Role, active: str) -> Resource:
    agent = SimpleNamespace(links=RecordingLinks(active), session=1, timeout=0.5, cfg=None,
                            state_changed=lambda *a: None, event=lambda *a, **k: None,
                            spawn=lambda coro: asyncio.get_event_loop().create_task(coro))
    meta = Meta(name="r", size=SIZE, image=str(tmp_path / "r.img"), role=str(role.value),
                disk=str(Disk.UP_TO_DATE.value), gen="g1")
    image = Image(Path(meta.image), SIZE, create=True)
    res = Resource(agent, meta, tmp_path / "r.meta.json", image, Bitmap(tmp_path / "r.bitmap", SIZE, 64 << 10))
    res.role.set(role, "test")
    return res


def primary_attach(attached: bool, session: str = "boot-a:2") -> wire.Attach:
    return wire.Attach(resource="r", size=SIZE, role=str(Role.PRIMARY.value), epoch=1, gen="g1", history=[],
                       bitmap_base="", disk=str(Disk.UP_TO_DATE.value), dirty=0, crashed=False, session=session,
                       boot="boot-a/1", next_seq=7, attached=attached)


def test_a_new_session_is_answered_on_the_link_it_came_on_not_on_a_silently_dead_active_one(tmp_path):
    # The primary lost link b, then link a came back: it starts a session on a. This secondary has not yet
    # noticed that b is dead (b is still its active link): an answer sent on b would be lost.
    secondary = resource(tmp_path, Role.SECONDARY, active="b")
    sync.on_attach(secondary, "a", primary_attach(attached=False))
    answers = [(link, m) for link, m in secondary.agent.links.sent if isinstance(m, wire.Attach)]
    assert [link for link, _ in answers] == ["a"]
    assert answers[0][1].attached and secondary.applied_seq == 6


def test_an_attach_that_says_its_sender_lacks_ours_is_answered_again_and_an_answer_is_not(tmp_path):
    secondary = resource(tmp_path, Role.SECONDARY, active="a")
    sync.on_attach(secondary, "a", primary_attach(attached=False))
    sent = secondary.agent.links.sent
    assert len(sent) == 1
    sync.on_attach(secondary, "a", primary_attach(attached=False))  # our answer was lost: asked again
    assert len(sent) == 2
    sync.on_attach(secondary, "a", primary_attach(attached=True))  # the primary has ours: no ping-pong
    assert len(sent) == 2


def test_a_primary_whose_attach_went_unanswered_for_a_link_timeout_sends_it_again(tmp_path):
    primary = resource(tmp_path, Role.PRIMARY, active="a")
    primary.peer = primary_attach(attached=True)  # a peer heard of before: writes wait for it
    primary.peer = wire.Attach(**{**{f: getattr(primary.peer, f) for f in primary.peer.__struct_fields__},
                                  "role": str(Role.SECONDARY.value)})
    primary.announce()
    primary.wake_stale()
    assert len(primary.agent.links.sent) == 1  # not yet: the answer may be on its way
    primary.attach_sent_at -= 1.0
    primary.wake_stale()
    assert [m.attached for _, m in primary.agent.links.sent] == [False, False]
    primary.attached = True
    primary.attach_sent_at -= 1.0
    primary.wake_stale()
    assert len(primary.agent.links.sent) == 2
