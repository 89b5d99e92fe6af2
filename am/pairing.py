"""Network pairing, the pure part: who carries the VMs' traffic when a host's NIC fails (no I/O here).

Each host bridges its VMs' ports with its NIC (``eth0`` in ``xenbr0``). Each AM also has a *pairing interface* per
availability link (a tunnel to the peer's bridge that rides that link), in no bridge. When a host's NIC loses its
carrier while the peer's NIC has one, the host **borrows** the peer's NIC: its NIC leaves its bridge, the pairing
interface of an up link joins it, and the peer **lends**: its pairing interface of that link joins its own bridge,
beside its NIC. The VMs' frames then go VM -> bridge -> pairing -> peer's bridge -> peer's NIC.

The one thing that must never happen is a loop: both NICs and a pairing port in the bridges on both hosts (or both
pairing ports at once). Three rules make it impossible:

* a host never has its NIC and a pairing port in its bridge while it borrows, nor two pairing ports ever, and it
  takes ports out before it puts others in (``steps``);
* a host says it borrows (``NicState.borrow``) only once its NIC is out of its bridge;
* a host lends only to a borrow that answers its *current* mode: the peer's message echoes the ``mode_seq`` it had
  seen, and a host's ``mode_seq`` changes whenever it starts or stops borrowing. Two hosts could otherwise lend to
  each other on crossed, stale messages (each one's "I borrow" arriving after it stopped); with the echo, each of
  the two borrows would have to be sent after the other host's lending began, which cannot both be true.

``decide`` is the whole policy: given what this host sees, whether it borrows, lends, or neither, and over which
link. ``ports`` says which devices are then in the bridge, ``steps`` how to get there safely.
"""
from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass


class Mode(enum.StrEnum):
    ALONE = "alone"  # the NIC in the bridge, no pairing port
    BORROWING = "borrowing"  # the NIC out, the pairing port of one link in: the peer's NIC carries the traffic
    LENDING = "lending"  # the NIC and the pairing port of one link in: this NIC carries the peer's traffic too


@dataclass(frozen=True)
class PeerNic:
    """The peer's latest ``NicState`` (as long as a link is up)."""

    carrier: bool
    borrow: str | None = None  # the peer borrows over this link: its NIC is out of its bridge
    echo: int = 0  # this host's mode_seq the peer had seen when it sent this


@dataclass(frozen=True)
class Situation:
    carrier: bool  # this host's NIC
    links_up: Sequence[str]  # the availability links up now, in preference order
    peer: PeerNic | None  # None: nothing heard from the peer on the current links
    protecting: bool  # this host runs a protected VM (a resource is primary here)
    borrowing: str | None  # the link this host borrows over now
    mode_seq: int  # changes whenever this host starts or stops borrowing


@dataclass(frozen=True)
class Decision:
    borrow: str | None = None
    lend: str | None = None

    @property
    def mode(self) -> Mode:
        return Mode.BORROWING if self.borrow else Mode.LENDING if self.lend else Mode.ALONE

    @property
    def link(self) -> str | None:
        return self.borrow or self.lend


def borrow_link(s: Situation) -> str | None:
    """The link to borrow the peer's NIC over, or None.

    Borrow while this NIC has no carrier, the peer's has one and a link is up. A borrow already running stays on
    its link while that link is up (no flapping between links), and moves to the other when it goes down. A new
    borrow starts only for a protected VM: Level 1 does not handle a NIC failure, and pairing a host that runs no
    Level 2 VM would change what its unprotected VMs see."""
    if s.carrier or s.peer is None or not s.peer.carrier or not s.links_up:
        return None
    if s.borrowing in s.links_up:
        return s.borrowing
    if s.borrowing is None and not s.protecting:
        return None
    return s.links_up[0]


def decide(s: Situation) -> Decision:
    borrow = borrow_link(s)
    if borrow is not None:
        return Decision(borrow=borrow)
    peer = s.peer
    if (s.borrowing is None and s.carrier and peer is not None and peer.borrow in s.links_up
            and peer.echo == s.mode_seq):
        return Decision(lend=peer.borrow)
    return Decision()


def ports(decision: Decision, nic: str, pairing: dict[str, str]) -> frozenset[str]:
    """The devices in the bridge (besides the VMs' ports) once ``decision`` is in force."""
    if decision.borrow is not None:
        return frozenset({pairing[decision.borrow]})
    if decision.lend is not None:
        return frozenset({nic, pairing[decision.lend]})
    return frozenset({nic})


def steps(have: frozenset[str], want: frozenset[str]) -> list[tuple[str, bool]]:
    """(device, into the bridge?) in a safe order: every port out before any port in, so that no intermediate
    state holds both the NIC and a pairing port of a borrower, or two pairing ports."""
    return [(dev, False) for dev in sorted(have - want)] + [(dev, True) for dev in sorted(want - have)]
