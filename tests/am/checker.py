"""The acknowledged-write checker: a workload that records exactly what the export acknowledged, and the rule
every surviving primary must satisfy afterwards.

Each worker has its own connection and its own blocks, and never has two writes in flight on one block, so the
writes of a block are totally ordered. Every write carries a unique id in every 16 bytes of its block. After any
fault schedule, each block must hold the last acknowledged write, or one issued after it that never got an answer
(in flight when the fault hit) — never an older acknowledged one, never zeroes once a write was acknowledged.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from am.nbd_client import NBDClient, NBDReplyError

BLOCK = 4096
STAMP = struct.Struct(">QQ")

ACKED, FAILED, PENDING = "acked", "failed", "pending"


def pattern(write_id: int, block: int) -> bytes:
    return STAMP.pack(write_id, block) * (BLOCK // STAMP.size)


def stamp_of(data: bytes, block: int) -> int | str:
    """The write id a block holds: 0 for zeroes, or a description of what is wrong with it."""
    if not any(data):
        return 0
    write_id, which = STAMP.unpack_from(data)
    if which != block or data != pattern(write_id, block):
        return f"torn or foreign content (first stamp {write_id}/{which})"
    return write_id


@dataclass
class Ledger:
    blocks: int
    writes: dict[int, list[list]] = field(default_factory=dict)  # block -> [[id, outcome], ...] in issue order
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    acked: int = 0
    failed: int = 0
    flushes: int = 0
    reconnects: int = 0

    def issue(self, block: int) -> list:
        entry = [next(self.ids), PENDING]
        self.writes.setdefault(block, []).append(entry)
        return entry

    def violations(self, read: dict[int, bytes]) -> list[str]:
        found = []
        for block in range(self.blocks):
            history = self.writes.get(block, [])
            got = stamp_of(read[block], block)
            if isinstance(got, str):
                found.append(f"block {block}: {got}")
                continue
            last_acked = max((i for i, (_, outcome) in enumerate(history) if outcome == ACKED), default=-1)
            allowed = {wid for wid, _ in history[last_acked + 1:]}  # answered with an error, or never answered
            if last_acked >= 0:
                allowed.add(history[last_acked][0])
            else:
                allowed.add(0)
            if got not in allowed:
                acked_id = history[last_acked][0] if last_acked >= 0 else None
                found.append(f"block {block}: holds write {got}, but write {acked_id} was the last acknowledged")
        return found


async def workload(ledger: Ledger, connect: Callable[[], Awaitable[NBDClient]], stop: asyncio.Event, *,
                   workers: int = 4, depth: int = 8, seed: int = 0, flush_every: int = 50) -> None:
    """Write until ``stop`` is set; a lost connection is re-opened (to whatever ``connect`` returns) until then."""

    async def worker(w: int) -> None:
        rng = random.Random(seed * 1000 + w)
        mine = list(range(w, ledger.blocks, workers))
        busy: set[int] = set()
        client: NBDClient | None = None
        count = 0

        async def one(c: NBDClient, block: int) -> None:
            entry = ledger.issue(block)
            try:
                await c.write(block * BLOCK, pattern(entry[0], block), fua=rng.random() < 0.05)
                entry[1] = ACKED
                ledger.acked += 1
            except (NBDReplyError, ConnectionError, OSError):
                entry[1] = FAILED
                ledger.failed += 1
            finally:
                busy.discard(block)

        tasks: set[asyncio.Task] = set()
        while not stop.is_set():
            if client is None or client._lost is not None:
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
                    tasks.clear()
                try:
                    client = await asyncio.wait_for(connect(), 2)
                    ledger.reconnects += 1
                except (TimeoutError, OSError, ConnectionError, Exception):
                    client = None
                    await asyncio.sleep(0.05)
                    continue
            free = [b for b in mine if b not in busy]
            if len(tasks) >= depth or not free:
                _, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                continue
            block = rng.choice(free)
            busy.add(block)
            task = asyncio.create_task(one(client, block))
            tasks.add(task)
            count += 1
            if count % flush_every == 0:
                with contextlib.suppress(NBDReplyError, ConnectionError, OSError):
                    await asyncio.wait_for(client.flush(), 5)
                    ledger.flushes += 1
            await asyncio.sleep(0)
        # writes still unanswered at the end stay PENDING: the check allows them either way
        for task in tasks:
            task.cancel()
        if client is not None and client._lost is None:
            with contextlib.suppress(Exception):
                client._writer.transport.abort()

    await asyncio.gather(*(worker(w) for w in range(workers)))


async def read_all(client: NBDClient, blocks: int) -> dict[int, bytes]:
    sem = asyncio.Semaphore(32)

    async def one(block: int) -> tuple[int, bytes]:
        async with sem:
            return block, await client.read(block * BLOCK, BLOCK)

    return dict(await asyncio.gather(*(one(b) for b in range(blocks))))
