"""The console follows the change feed of every AM that a Level 2 protection uses (``GET /v1/events``, long
polled: am/README.md), so that a change on a host (a link, a NIC, a disk, a peer, a promotion) is read at once
rather than at the next beat (``EAC_AM_HEALTH_INTERVAL``, which stays the safety net).

One thread per AM waits on its feed and only says "this AM changed"; the follower's own thread, the only one that
touches the database, maps the AM to the protections that use it and enqueues ``level2_poll`` for each, at most
once per ``debounce`` (a burst of events is one read). An AM that does not answer is asked again after a second;
when it answers again (a restart numbers its events from 1) the follower takes its feed from its current end and
reads its protections, as for a change. Run by ``manage.py follow_ams``; several followers only read twice.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from django.conf import settings
from django.db import close_old_connections, connections

from .am_client import AMClient, AMError
from .choices import AM_LEVELS
from .health import am_urls
from .models import Protection

log = logging.getLogger(__name__)

RETRY_S = 1.0  # an AM that did not answer is asked again after this


def followed() -> dict[str, set[int]]:
    """Each AM URL that a Level 2 or 3 protection uses, and those protections' ids. (A Level 3 AM's checkpoint
    state changes are ``state`` events of its feed like the others: each one enqueues a read.)"""
    out: dict[str, set[int]] = {}
    for protection in Protection.objects.filter(level__in=AM_LEVELS).select_related("observed_host",
                                                                                     "secondary_host"):
        for url in am_urls(protection):
            if url:
                out.setdefault(url, set()).add(protection.pk)
    return out


class Feed(threading.Thread):
    """One AM's change feed: ``changed(url)`` after each batch of its events, and once each time it answers
    after a silence (its feed taken from its current end: what happened meanwhile is for the read to find)."""

    def __init__(self, url: str, changed: Callable[[str], None], wait: float) -> None:
        super().__init__(name=f"am-feed {url}", daemon=True)
        self.url, self.changed, self.wait = url, changed, wait
        self.stop = threading.Event()

    def run(self) -> None:
        after: int | None = None
        try:
            client = AMClient(self.url, timeout=self.wait + settings.EAC_AM_TIMEOUT)
        except AMError as exc:
            log.warning("not following an AM: %s", exc.sentence)
            return
        with client:
            while not self.stop.is_set():
                try:
                    if after is None:
                        batch = client.events(0)
                        after = max((e.get("seq", 0) for e in batch if isinstance(e, dict)), default=0)
                        self.changed(self.url)
                        continue
                    batch = client.events(after, self.wait)
                except AMError as exc:
                    if after is not None:
                        log.info("AM feed interrupted: %s", exc.sentence)
                        self.changed(self.url)  # silent: a lost host's AM is news too
                    after = None
                    self.stop.wait(RETRY_S)
                    continue
                seqs = [e["seq"] for e in batch or [] if isinstance(e, dict) and isinstance(e.get("seq"), int)]
                if seqs:
                    after = max(after, *seqs)
                    self.changed(self.url)


class Follower:
    """Keeps a ``Feed`` for each AM in use (looked up every ``refresh`` seconds) and turns their changes into
    ``enqueue(protection_id)`` calls."""

    def __init__(self, enqueue: Callable[[int], None], *, refresh: float = 5.0, debounce: float = 0.2,
                 wait: float | None = None) -> None:
        self.enqueue, self.refresh, self.debounce = enqueue, refresh, debounce
        self.wait = settings.EAC_AM_FOLLOW_WAIT if wait is None else wait
        self.feeds: dict[str, Feed] = {}
        self.users: dict[str, set[int]] = {}
        self.changes: queue.Queue[str] = queue.Queue()
        self.stop = threading.Event()

    def _update(self) -> None:
        close_old_connections()  # a long-running process: a connection the server dropped is opened again
        self.users = followed()
        for url in set(self.feeds) - set(self.users):
            self.feeds.pop(url).stop.set()
        for url in set(self.users) - set(self.feeds):
            self.feeds[url] = Feed(url, self.changes.put, self.wait)
            self.feeds[url].start()

    def run(self) -> None:
        next_update = 0.0
        try:
            while not self.stop.is_set():
                if time.monotonic() >= next_update:
                    try:
                        self._update()
                    except Exception:  # the database away for a moment: the feeds go on, the next look retries
                        log.exception("looking up the AMs to follow")
                    next_update = time.monotonic() + self.refresh
                try:
                    urls = {self.changes.get(timeout=min(self.refresh, 1.0))}
                except queue.Empty:
                    continue
                self.stop.wait(self.debounce)  # the rest of a burst
                while True:
                    try:
                        urls.add(self.changes.get_nowait())
                    except queue.Empty:
                        break
                for pk in sorted({pk for url in urls for pk in self.users.get(url, ())}):
                    try:
                        self.enqueue(pk)
                    except Exception:
                        log.exception("enqueuing the read of protection %s", pk)
        finally:
            for feed in self.feeds.values():
                feed.stop.set()
            connections.close_all()  # this thread's
