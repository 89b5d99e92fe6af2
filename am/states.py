"""Named states of a replicated resource, as DRBD names them, and the one function that changes them.

Every change goes through ``StateCell.set``: an illegal transition raises, a legal one is logged and announced to
the agent's change feed. The tables below are the whole truth about which moves exist.
"""
from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger("am.states")


class Role(enum.StrEnum):
    PRIMARY = "Primary"
    SECONDARY = "Secondary"


class Disk(enum.StrEnum):
    UP_TO_DATE = "UpToDate"
    INCONSISTENT = "Inconsistent"  # being synced, or a replica whose content is unknown
    OUTDATED = "Outdated"  # consistent, but the peer took writes it does not have
    FAILED = "Failed"  # local I/O errors: served from the peer's replica


class Conn(enum.StrEnum):
    STANDALONE = "StandAlone"  # no peer connection (peer lost)
    CONNECTED = "Connected"
    SYNC_SOURCE = "SyncSource"
    SYNC_TARGET = "SyncTarget"
    SPLIT_BRAIN = "SplitBrain"  # both replicas took writes: waits for an operator's choice


class Link(enum.StrEnum):
    UP = "Up"
    DOWN = "Down"


class IO(enum.StrEnum):
    """What the primary does with a client's request right now."""

    RUNNING = "Running"
    SUSPENDED = "Suspended"  # neither peer nor witness: held, never acknowledged alone
    UNAVAILABLE = "Unavailable"  # not primary (or no readable copy)


class Checkpoint(enum.StrEnum):
    """Level 3: where a resource's checkpointing stands (``am/checkpoint.py``)."""

    CHECKPOINTING = "Checkpointing"  # primary, checkpoints acknowledged by the peer
    STALLED = "Stalled"  # primary, the peer connected but no acknowledgement for max(10 epochs, 1 s)
    UNPROTECTED = "Unprotected"  # primary without a replicating peer: the output is not held
    STANDBY = "Standby"  # secondary: keeps the last committed checkpoint
    NO_GUEST = "NoGuest"  # primary whose guest's checkpoint source does not answer


class IllegalTransition(RuntimeError):
    pass


TRANSITIONS: dict[type[enum.Enum], dict[enum.Enum, set[enum.Enum]]] = {
    Role: {Role.PRIMARY: {Role.SECONDARY}, Role.SECONDARY: {Role.PRIMARY}},
    Disk: {
        Disk.UP_TO_DATE: {Disk.OUTDATED, Disk.FAILED, Disk.INCONSISTENT},
        Disk.INCONSISTENT: {Disk.UP_TO_DATE, Disk.FAILED},
        Disk.OUTDATED: {Disk.INCONSISTENT, Disk.UP_TO_DATE, Disk.FAILED},
        Disk.FAILED: {Disk.INCONSISTENT},
    },
    Conn: {
        Conn.STANDALONE: {Conn.CONNECTED, Conn.SYNC_SOURCE, Conn.SYNC_TARGET, Conn.SPLIT_BRAIN},
        Conn.CONNECTED: {Conn.STANDALONE, Conn.SYNC_SOURCE, Conn.SYNC_TARGET, Conn.SPLIT_BRAIN},
        Conn.SYNC_SOURCE: {Conn.CONNECTED, Conn.STANDALONE},
        Conn.SYNC_TARGET: {Conn.CONNECTED, Conn.STANDALONE},
        Conn.SPLIT_BRAIN: {Conn.STANDALONE, Conn.SYNC_SOURCE, Conn.SYNC_TARGET},
    },
    Link: {Link.UP: {Link.DOWN}, Link.DOWN: {Link.UP}},
    # every move is possible: each state follows from what the peer, the guest and the role are at the moment
    Checkpoint: {state: set(Checkpoint) - {state} for state in Checkpoint},
    IO: {
        IO.RUNNING: {IO.SUSPENDED, IO.UNAVAILABLE},
        IO.SUSPENDED: {IO.RUNNING, IO.UNAVAILABLE},
        IO.UNAVAILABLE: {IO.RUNNING, IO.SUSPENDED},
    },
}


S = TypeVar("S", bound=enum.Enum)


class StateCell(Generic[S]):
    """One named state of one object; ``set`` is the only way to change it."""

    def __init__(self, owner: str, initial: S, on_change: Callable[[str, S, S, str], None] | None = None) -> None:
        self.owner = owner
        self.value: S = initial
        self.why = ""  # the reason given with the last change
        self._on_change = on_change

    def set(self, new: S, why: str) -> bool:
        """Move to ``new`` (True), stay (False, same state) or raise IllegalTransition."""
        old = self.value
        if new == old:
            return False
        if new not in TRANSITIONS[type(old)][old]:
            raise IllegalTransition(f"{self.owner}: {type(old).__name__} {old} -> {new} is not allowed ({why})")
        self.value, self.why = new, why
        log.info("%s: %s %s -> %s (%s)", self.owner, type(old).__name__.lower(), old, new, why)
        if self._on_change is not None:
            self._on_change(self.owner, old, new, why)
        return True

    def __eq__(self, other: object) -> bool:  # a cell compares as its state
        return self.value == other

    __hash__ = None  # type: ignore[assignment]

    def __str__(self) -> str:
        return str(self.value)
