"""The decisions that keep replicas safe, as pure functions of named facts: tested exhaustively, no I/O here."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from am.states import Disk


class WritePath(enum.Enum):
    MIRROR = "mirror"  # wait for the peer's acknowledgement (protocol C)
    DEGRADED = "degraded"  # acknowledge alone: the bitmap bit first, then the reply
    NEED_OUTDATE = "need-outdate"  # the witness must first record that the peer misses writes
    SUSPEND = "suspend"  # neither peer nor a lease: hold the request, never acknowledge it alone


def write_path(*, peer_replicating: bool, lease_valid: bool, peer_outdated: bool) -> WritePath:
    """How a primary may complete a write. Alone only with a valid lease AND the witness's word that the peer
    is outdated: then no other node can be granted while this one acknowledges writes the peer lacks."""
    if peer_replicating:
        return WritePath.MIRROR
    if not lease_valid:
        return WritePath.SUSPEND
    return WritePath.DEGRADED if peer_outdated else WritePath.NEED_OUTDATE


class SyncKind(enum.Enum):
    NONE = "none"
    BITMAP = "bitmap"  # the regions in the source's dirty bitmap
    FULL = "full"  # every region
    SPLIT_BRAIN = "split-brain"  # both took writes: never merged automatically
    WAIT = "wait"  # nothing can be decided yet (no consistent copy, or no primary)
    STALE_SOURCE = "stale-source"  # the only consistent replica is older than what was acknowledged


CONSISTENT = {Disk.UP_TO_DATE, Disk.OUTDATED}


@dataclass(frozen=True)
class Side:
    gen: str
    history: tuple[str, ...]
    bitmap_base: str
    disk: Disk
    primary: bool
    crashed: bool = False
    split_brain: bool = False


@dataclass(frozen=True)
class Sync:
    kind: SyncKind
    source_is_local: bool = False

    def flipped(self) -> Sync:
        return Sync(self.kind, not self.source_is_local)


def sync_decision(local: Side, remote: Side) -> Sync:
    """Which replica is newer and how much must be copied. Symmetric: the peer, deciding with the arguments
    swapped, reaches the mirror image of this answer."""
    if Disk.FAILED in (local.disk, remote.disk):
        return Sync(SyncKind.WAIT)  # a failed disk is copied to only once the operator says it is repaired
    local_ok, remote_ok = local.disk in CONSISTENT, remote.disk in CONSISTENT
    if not local_ok and not remote_ok:
        return Sync(SyncKind.WAIT)
    if local_ok != remote_ok:  # also how a split brain ends: the operator made one side discard its data
        source, target = (local, remote) if local_ok else (remote, local)
        if target.gen and source.gen != target.gen and source.gen in target.history:
            # the only replica with the latest acknowledged writes failed: copying the older one over it would
            # lose them silently; the operator decides (discard-my-data on the failed side)
            return Sync(SyncKind.STALE_SOURCE, source_is_local=local_ok)
        return Sync(SyncKind.FULL, source_is_local=local_ok)
    if local.split_brain or remote.split_brain:
        return Sync(SyncKind.SPLIT_BRAIN)
    if local.gen == remote.gen:
        if local.crashed or remote.crashed:
            # a primary that crashed may hold writes it never got acknowledged: its current primary is the truth
            if local.primary == remote.primary:
                return Sync(SyncKind.WAIT)
            return Sync(SyncKind.FULL, source_is_local=local.primary)
        return Sync(SyncKind.NONE)
    if remote.gen in local.history:
        return _newer(local, remote)
    if local.gen in remote.history:
        return _newer(remote, local).flipped()
    return Sync(SyncKind.SPLIT_BRAIN)


def _newer(newer: Side, older: Side) -> Sync:
    exact = older.gen == newer.bitmap_base and not older.crashed
    return Sync(SyncKind.BITMAP if exact else SyncKind.FULL, source_is_local=True)
