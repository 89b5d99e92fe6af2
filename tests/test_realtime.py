"""eac.realtime's summaries of pools' changes, throttled for the pages that show pools only by their labels."""
import asyncio
import contextlib
import logging
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

    def pools(self) -> list[dict]:
        with self.lock:
            return [event["pools"] for _at, event in self.messages]


def test_the_first_change_after_a_quiet_interval_is_told_at_once_and_a_burst_once_more_merged_at_the_end():
    sent = Sent()
    throttle = SummaryThrottle(0.2, send=sent)
    throttle.poke("p1", {"vm": {"mod"}})
    assert sent.pools() == [{"p1": {"vm": ["mod"]}}]  # at once, in the caller's thread
    for pool, cls, op in [("p1", "vm", "add"), ("p2", "vbd", "mod"), ("p1", "vm", "mod"), ("p2", "resync", "resync")]:
        throttle.poke(pool, {cls: {op}})
    assert len(sent.messages) == 1  # the rest waits for the end of the interval, every pool in one message
    wait_for(lambda: len(sent.messages) == 2, timeout=5, message="the burst's summary")
    assert sent.pools()[1] == {"p1": {"vm": ["add", "mod"]}, "p2": {"vbd": ["mod"], "resync": ["resync"]}}
    assert sent.messages[1][0] - sent.messages[0][0] >= 0.2


def test_the_summary_says_what_kind_of_change_each_event_was():
    _, change = inventory_changes(pool="p", changes={"vm": {"a": "add", "b": "mod"}, "sr": {"c": "mod"}})
    assert classes_changed(change) == {"vm": {"add", "mod"}, "sr": {"mod"}}
    assert classes_changed(protection_change(pool="p", vm="a")[1]) == {"protection": {"mod"}}


def test_a_process_without_an_event_loop_sends_every_batch_over_the_same_redis_connection(caplog):
    """The watcher's sends: async_to_sync made a new event loop per call, and channels_redis a Redis connection per
    loop, so that each batch connected to Redis anew (a tenth of a busy watcher's time)."""
    import redis
    from asgiref.sync import async_to_sync
    from channels import DEFAULT_CHANNEL_LAYER
    from channels.layers import channel_layers
    from django.conf import settings

    from eac.realtime import pool_group, send_now

    def run(coroutine_function, *args):
        # A loop of its own: the test process's main thread may be tied to the loop of an earlier test's server.
        return async_to_sync(coroutine_function, force_new_loop=True)(*args)

    def change(vm: str):
        return inventory_changes(pool="sender-loop-test", changes={"vm": {vm: "mod"}})

    # The receiving end is a layer of its own: the process's one may hold the receive state an earlier test's
    # interrupted receive left it (channels_redis lets one event loop at a time receive on a layer).
    layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
    channel = run(layer.new_channel)
    group = pool_group("sender-loop-test")
    run(layer.group_add, group, channel)
    server = redis.Redis.from_url(settings.REDIS_URL)
    opened: list[int] = []

    def watcher_thread() -> None:  # a thread of the kind the watcher's are: no event loop, not sync_to_async's
        send_now([change("a")])  # the sender's connection, made if it was not yet
        before = server.info("stats")["total_connections_received"]
        for i in range(30):
            send_now([change(f"vm-{i}")])
        opened.append(server.info("stats")["total_connections_received"] - before)

    try:
        thread = threading.Thread(target=watcher_thread)
        thread.start()
        thread.join(60)
        assert opened, "the sends did not end"
        assert opened[0] <= 2, f"{opened[0]} Redis connections opened for 30 sends"

        async def receive_all() -> list[str]:
            got: list[str] = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    while len(got) < 31:
                        message = await layer.receive(channel)
                        got += list(message["changes"]["vm"])
            return got

        failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert run(receive_all) == ["a", *(f"vm-{i}" for i in range(30))], failures  # every one, in order
    finally:
        run(layer.group_discard, group, channel)
        server.close()
