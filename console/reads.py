"""Database reads shared by the live consumers of one process (``SharedReads``).

With twenty open pages, one change is read and rendered once, not twenty times: the consumers of an
event loop that ask for the same key share one read, as long as it starts after the event that asked.
"""
from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.db import close_old_connections

T = TypeVar("T")

# What ``get_many`` gives for a key the read did not find (a VM that no longer exists).
MISSING = object()
# The thread (and so the database connection) of the background reads: the labels of the pools a page shows only by
# their labels. Under load they are most of the reads (0.15 s for nineteen pools of 2,500 VMs); on the thread of the
# other reads, a change of the pool a page shows waited behind them.
_BACKGROUND = ThreadPoolExecutor(max_workers=1, thread_name_prefix="live-background-reads")


async def in_background(work: Callable[[], T]) -> T:
    """``work`` (no database access) on the thread of the background reads, not on the event loop: the labels of
    nineteen busy pools are a hundred fragments to render, and rendered on the event loop they held back the changes
    of the pool the page shows."""
    return await asyncio.get_running_loop().run_in_executor(_BACKGROUND, work)


class SharedReads:
    """Database reads shared by the consumers of one event loop.

    A read serves a consumer if it starts after the consumer received the event that asked
    for it: the watcher emits after commit, so such a read sees the change. A new read is
    scheduled ``GATHER`` seconds ahead; consumers that ask for the same kind of read before
    it starts add their keys to it, so the sockets of a process that got the same change a
    few milliseconds apart cause one query. A consumer that goes away cancels nothing.
    """

    GATHER = 0.008
    TTL = 10.0

    def __init__(self) -> None:
        self._entries: dict[tuple[bool, Hashable], tuple[float, asyncio.Future]] = {}
        self._gathering: dict[tuple[bool, Callable], tuple[float, set, asyncio.Future]] = {}
        self._pruned = time.monotonic()

    async def get_many(self, keys: Iterable[Hashable], since: float, fetch: Callable[[list], dict], *,
                       background: bool = False) -> dict:
        """{key: what ``fetch`` read for it, or MISSING}, read after ``since``. ``background``: on a thread of its own,
        apart from the other reads (neither waits for the other; their reads are not shared either)."""
        self._prune()
        waits: list[tuple[Hashable, asyncio.Future]] = []
        missing: list[Hashable] = []
        for key in keys:
            entry = self._entries.get((background, key))
            if entry is not None and entry[0] >= since:
                waits.append((key, entry[1]))
            else:
                missing.append(key)
        if missing:
            gathering = self._gathering.get((background, fetch))
            if gathering is None or gathering[2].done():
                start_at = max(time.monotonic(), since) + self.GATHER
                future = asyncio.ensure_future(self._read_at(start_at, fetch, background))
                gathering = (start_at, set(), future)
                self._gathering[background, fetch] = gathering
            start_at, gathered, future = gathering
            gathered.update(missing)
            for key in missing:
                self._entries[background, key] = (start_at, future)
            waits += [(key, future) for key in missing]
        results = {}
        for key, future in waits:
            data = await asyncio.shield(future)
            results[key] = data.get(key, MISSING)
        return results

    async def _read_at(self, start_at: float, fetch: Callable[[list], dict], background: bool) -> dict:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        keys = self._gathering[background, fetch][1]
        del self._gathering[background, fetch]  # from now on a new read is needed: this one may have started
        if background:
            return await sync_to_async(_closing(fetch), thread_sensitive=False, executor=_BACKGROUND)(list(keys))
        return await database_sync_to_async(fetch)(list(keys))

    async def get(self, key: Hashable, since: float, fetch: Callable[[], object]) -> object:
        result = await self.get_many([key], since, _single(key, fetch))
        return result[key]

    def _prune(self) -> None:
        now = time.monotonic()
        if now - self._pruned < 1.0:
            return
        self._pruned = now
        stale = [k for k, (started, fut) in self._entries.items() if now - started > self.TTL and fut.done()]
        for key in stale:
            fut = self._entries.pop(key)[1]
            if not fut.cancelled():
                fut.exception()  # retrieved: no "exception never retrieved" warning


def _closing(fetch: Callable[[list], dict]) -> Callable[[list], dict]:
    """``fetch`` with Django's connection hygiene (CONN_MAX_AGE) around it, inside the read's own context: on a
    thread that is not the thread-sensitive one, channels' DatabaseSyncToAsync runs close_old_connections outside
    the context asgiref runs the function in, so it never saw the connection the read opened (left open, one per
    background thread; a test database could not be dropped)."""

    def read(keys: list) -> dict:
        close_old_connections()
        try:
            return fetch(keys)
        finally:
            close_old_connections()

    return read


def _single(key: Hashable, fetch: Callable[[], object]) -> Callable[[list], dict]:
    return lambda keys: {key: fetch()}


_shared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared_reads() -> SharedReads:
    loop = asyncio.get_running_loop()
    reads = _shared.get(loop)
    if reads is None:
        reads = _shared[loop] = SharedReads()
    return reads
