"""The dirty bitmap's bulk operations against a brute-force oracle (a disk of many GiB has 10^5+ regions)."""
from __future__ import annotations

import random

import pytest

from am.store import Bitmap

REGION = 64 * 1024


@pytest.mark.parametrize("regions", [1, 7, 8, 9, 63, 64, 65, 1000, 4099])
def test_dirty_count_and_mark_all_agree_with_one_bit_at_a_time(tmp_path, regions):
    bitmap = Bitmap(tmp_path / "bits", regions * REGION, REGION)
    rng = random.Random(regions)
    for density in (0.0, 0.01, 0.5, 0.99, 1.0):
        for i in range(regions):
            bitmap.clear(i)
            if rng.random() < density:
                bitmap._set(i, True)
        oracle = [i for i in range(regions) if bitmap.is_set(i)]
        assert bitmap.dirty() == oracle and bitmap.count() == len(oracle)
    bitmap.mark_all()
    assert bitmap.dirty() == list(range(regions)) and bitmap.count() == regions
    reopened = Bitmap(tmp_path / "bits", regions * REGION, REGION)  # mark_all is on the disk
    assert reopened.count() == regions
