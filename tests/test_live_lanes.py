"""The live consumer's labels lane: how often the labels of the pools a page shows only by their labels are read."""

import pytest

from console.consumers import LABELS_INTERVAL, LABELS_MAX_INTERVAL, LABELS_MAX_SHARE, labels_interval


def test_cheap_labels_are_rendered_at_the_summaries_pace():
    assert labels_interval(0.0) == labels_interval(0.01) == LABELS_INTERVAL


def test_dear_labels_are_rendered_less_often_keeping_the_lane_to_its_share_of_the_time():
    cost = LABELS_INTERVAL * LABELS_MAX_SHARE * 3  # three times what the summaries' pace allows
    assert labels_interval(cost) == pytest.approx(cost / LABELS_MAX_SHARE)
    assert cost / labels_interval(cost) == pytest.approx(LABELS_MAX_SHARE)


def test_labels_are_never_left_staler_than_the_longest_interval():
    assert labels_interval(60.0) == LABELS_MAX_INTERVAL
