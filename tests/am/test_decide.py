"""The pure decisions of am/decide.py, exhaustively: every combination of the facts they take."""
from __future__ import annotations

import itertools

from am.decide import Side, SyncKind, WritePath, sync_decision, write_path
from am.states import Disk


def test_a_write_completes_alone_only_with_a_lease_and_the_peer_outdated_at_the_witness():
    for replicating, lease, outdated in itertools.product([False, True], repeat=3):
        path = write_path(peer_replicating=replicating, lease_valid=lease, peer_outdated=outdated)
        if path is WritePath.DEGRADED:
            assert lease and outdated and not replicating
        if not replicating and not lease:
            assert path is WritePath.SUSPEND
        if replicating:
            assert path is WritePath.MIRROR


GENS = ["g1", "g2", "g3"]
SIDES = [
    Side(gen, tuple(history), base, disk, primary, crashed, split)
    for gen, history, base in [("g1", (), "g1"), ("g2", ("g1",), "g1"), ("g3", ("g2", "g1"), "g2"),
                               ("g3", ("g1",), "g1"), ("", (), "")]
    for disk in Disk
    for primary in (False, True)
    for crashed in (False, True)
    for split in (False, True)
]


def test_sync_decision_is_symmetric():
    for a, b in itertools.product(SIDES, repeat=2):
        here, there = sync_decision(a, b), sync_decision(b, a)
        assert here.kind == there.kind, (a, b)
        if here.kind in (SyncKind.BITMAP, SyncKind.FULL, SyncKind.STALE_SOURCE):
            assert here.source_is_local != there.source_is_local, (a, b)


def test_the_source_of_a_copy_is_always_consistent_and_never_older():
    for a, b in itertools.product(SIDES, repeat=2):
        verdict = sync_decision(a, b)
        if verdict.kind not in (SyncKind.BITMAP, SyncKind.FULL):
            continue
        source, target = (a, b) if verdict.source_is_local else (b, a)
        assert source.disk in (Disk.UP_TO_DATE, Disk.OUTDATED)
        assert Disk.FAILED not in (source.disk, target.disk)
        assert not (target.gen and source.gen != target.gen and source.gen in target.history), (a, b)


def test_a_bitmap_resync_only_when_the_bitmap_counts_from_the_targets_generation():
    for a, b in itertools.product(SIDES, repeat=2):
        verdict = sync_decision(a, b)
        if verdict.kind is SyncKind.BITMAP:
            source, target = (a, b) if verdict.source_is_local else (b, a)
            assert source.bitmap_base == target.gen and not target.crashed


def test_diverged_generations_are_a_split_brain_never_a_copy():
    a = Side("g2", ("g1",), "g1", Disk.UP_TO_DATE, True)
    b = Side("g3", ("g1",), "g1", Disk.UP_TO_DATE, False)
    assert sync_decision(a, b).kind is SyncKind.SPLIT_BRAIN


def test_a_crashed_primary_is_copied_in_full_from_whoever_is_primary_now():
    old = Side("g1", (), "g1", Disk.UP_TO_DATE, False, crashed=True)
    new = Side("g2", ("g1",), "g1", Disk.UP_TO_DATE, True)
    verdict = sync_decision(new, old)
    assert verdict.kind is SyncKind.FULL and verdict.source_is_local


def test_a_failed_replica_is_never_a_source_nor_a_target_until_repaired():
    failed = Side("g1", (), "g1", Disk.FAILED, True)
    ok = Side("g1", (), "g1", Disk.UP_TO_DATE, False)
    assert sync_decision(failed, ok).kind is SyncKind.WAIT


def test_a_repaired_disk_that_held_the_newest_writes_is_not_overwritten_by_an_older_peer():
    repaired = Side("g2", ("g1",), "g1", Disk.INCONSISTENT, True)
    older = Side("g1", (), "g1", Disk.UP_TO_DATE, False)
    assert sync_decision(repaired, older).kind is SyncKind.STALE_SOURCE
    discarded = Side("", (), "", Disk.INCONSISTENT, True)  # after discard-my-data
    verdict = sync_decision(discarded, older)
    assert verdict.kind is SyncKind.FULL and not verdict.source_is_local
