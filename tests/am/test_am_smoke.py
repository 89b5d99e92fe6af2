from __future__ import annotations

import asyncio

from tests.am.checker import BLOCK, Ledger, read_all, workload


def test_mirrored_writes_land_on_both_replicas(healthy):
    c = healthy
    c.create_pair("smoke", 8 << 20)

    async def run():
        ledger = Ledger(blocks=256)
        stop = asyncio.Event()
        task = asyncio.create_task(workload(ledger, lambda: c.connect("hosta", "smoke"), stop))
        await asyncio.sleep(1.0)
        stop.set()
        await task
        client = await c.connect("hosta", "smoke")
        data = await read_all(client, 256)
        await client.close()
        return ledger, data

    ledger, data = c.loop.run(run())
    assert ledger.acked > 100, ledger
    assert ledger.violations(data) == []
    c.wait_in_sync("smoke")
    assert c.image_digest("hosta", "smoke") == c.image_digest("hostb", "smoke")
    print("acked", ledger.acked, "flushes", ledger.flushes, BLOCK)
