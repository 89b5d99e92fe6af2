"""eac.realtime's summaries of a pool's changes, throttled for the pages that show the pool only by its labels."""
import threading
import time

from eac.realtime import SummaryThrottle, classes_changed, inventory_changes, protection_change
from tests.support import wait_for


class Sent:
    def __init__(self) -> None:
        self.messages: list[tuple[float, dict]] = []
        self.lock = threading.Lock()

    def __call__(self, message) -> None:
        with self.lock:
            self.messages.append((time.monotonic(), message[1]))

    def classes(self) -> list[dict]:
        with self.lock:
            return [event["classes"] for _at, event in self.messages]


def test_the_first_change_of_a_quiet_pool_is_told_at_once_and_a_burst_once_more_merged_at_the_end():
    sent = Sent()
    throttle = SummaryThrottle(0.2, send=sent)
    throttle.poke("p1", {"vm": {"mod"}})
    assert sent.classes() == [{"vm": ["mod"]}]  # at once, in the caller's thread
    for cls, op in [("vm", "add"), ("vbd", "mod"), ("vm", "mod")]:
        throttle.poke("p1", {cls: {op}})
    assert len(sent.messages) == 1  # the rest waits for the end of the interval
    wait_for(lambda: len(sent.messages) == 2, timeout=5, message="the burst's summary")
    assert sent.classes()[1] == {"vm": ["add", "mod"], "vbd": ["mod"]}
    assert sent.messages[1][0] - sent.messages[0][0] >= 0.2
    # Another pool is throttled on its own.
    throttle.poke("p2", {"protection": {"mod"}})
    assert sent.classes()[2] == {"protection": ["mod"]}


def test_the_summary_says_what_kind_of_change_each_event_was():
    _, change = inventory_changes(pool="p", changes={"vm": {"a": "add", "b": "mod"}, "sr": {"c": "mod"}})
    assert classes_changed(change) == {"vm": {"add", "mod"}, "sr": {"mod"}}
    assert classes_changed(protection_change(pool="p", vm="a")[1]) == {"protection": {"mod"}}
