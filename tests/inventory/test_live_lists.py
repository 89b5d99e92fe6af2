"""What an open page lists changes live: a pool registered (or removed) while the page is open, a VM that starts or
stops matching the VM table's filters. Through the real ASGI stack on the Redis channel layer; the pools are
registered and removed by the services (their messages leave on commit, as in production), the VM changes are
written and announced the way the watcher does it."""
import dataclasses
import html as htmllib
import json
import re
import time

import pytest
from channels.db import database_sync_to_async
from django.db.models.expressions import RawSQL
from django.test import Client

from console import table
from eac.realtime import inventory_change, pools_change
from inventory.choices import PowerState
from inventory.models import VM, Pool
from inventory.services import pool_create, pool_remove_request, pool_remove_rows
from inventory.watcher import sync_once
from tests.channels_support import ORIGIN, connect, deliver, receive_until, run, session_cookie
from tests.inventory.factories import make_pool, make_vm

pytestmark = pytest.mark.django_db(transaction=True)

RESYNC = '<div id="live-control" data-action="resync"></div>'
REFRESH_TABLE = '<div id="live-control" data-action="refresh-table"></div>'


def table_hello(user, query: str) -> dict:
    """What eac.js sends for the VM table rendered for ``user`` at ``/vms/?query``: its rows in order, its
    data-query and data-total, read from the page the view renders."""
    client = Client()
    client.force_login(user)
    page = client.get(f"/vms/?{query}").content.decode()
    region = re.search(r'<div id="vm-table" data-query="([^"]*)" data-total="(\d+)">', page)
    assert region, "the table region carries its query and count"
    rows = re.findall(r'<tr id="row-vm-([0-9a-f-]{36})"', page)
    return {"view": "vms", "rows": rows, "query": htmllib.unescape(region.group(1)), "total": int(region.group(2))}


async def next_message(communicator, timeout: float = 0.3) -> str | None:
    """The next message, or None if none comes (a timed-out ``receive_from`` would stop the consumer)."""
    if await communicator.receive_nothing(timeout=timeout):
        return None
    return await communicator.receive_from()


@database_sync_to_async
def set_power(vm: VM, state: str, host=None) -> None:
    VM.objects.filter(pk=vm.pk).update(power_state=state, resident_on=host)


# -- pools ---------------------------------------------------------------------------------------------------


def test_a_pool_registered_while_the_page_is_open_is_joined_and_the_page_resyncs(demo, viewer, xapisim,
                                                                                celery_queue):
    cookie = session_cookie(viewer)

    async def scenario():
        communicator, connected = await connect([ORIGIN, cookie])
        assert connected
        await communicator.send_to(text_data=json.dumps({"view": "home", "open": []}))
        pool = await database_sync_to_async(pool_create)(
            name="Second pool", url=xapisim.url, username=xapisim.user, password=xapisim.password, verify_tls=False
        )
        assert await communicator.receive_from(timeout=5) == RESYNC
        # The socket is in the new pool's group now: its changes arrive, with its header chip.
        await deliver(inventory_change(pool=pool.uuid, cls="pool", uuid=pool.uuid))
        text = await receive_until(communicator, lambda t: f'id="hdr-pool-{pool.uuid}"' in t)
        assert f'id="tree-pool-{pool.uuid}"' in text

        # Removed (marked, then deleted by the task's code): the page resyncs and the socket leaves the pool's
        # group (nothing more about it arrives).
        await database_sync_to_async(pool_remove_request)(pool=pool, requested_by=None)
        await database_sync_to_async(pool_remove_rows)(pool_id=pool.pk, watcher_wait=0)
        assert await receive_until(communicator, lambda t: t == RESYNC)
        await deliver(inventory_change(pool=pool.uuid, cls="pool", uuid=pool.uuid))
        assert await communicator.receive_nothing(timeout=0.5)
        await communicator.disconnect()

    run(scenario)


def test_a_pool_that_gets_its_uuid_at_its_first_sync_is_joined(demo, viewer, xapisim):
    """A pool registered without a uuid (none of the pages may show it yet) gets one from the watcher's first
    sync: that sync announces it to every open page."""
    cookie = session_cookie(viewer)
    pool = make_pool(name="Unsynced pool", url=xapisim.url, username=xapisim.user, password=xapisim.password,
                     verify_tls=False, uuid="", ref="")  # fmt: skip

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        await communicator.send_to(text_data=json.dumps({"view": "home", "open": []}))
        await database_sync_to_async(sync_once)(pool)
        await receive_until(communicator, lambda t: t == RESYNC)
        uuid = await database_sync_to_async(lambda: Pool.objects.get(pk=pool.pk).uuid)()
        assert uuid
        await deliver(inventory_change(pool=uuid, cls="pool", uuid=uuid))
        assert f'id="hdr-pool-{uuid}"' in await receive_until(communicator, lambda t: f'id="hdr-pool-{uuid}"' in t)
        await communicator.disconnect()

    run(scenario)


def test_a_pool_change_that_changes_nothing_the_user_sees_sends_nothing(demo, viewer):
    cookie = session_cookie(viewer)
    pool = demo["pool"]

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        await deliver(pools_change(pool=pool.uuid, op="mod"))  # a rename: the pool's own group re-renders it
        assert await communicator.receive_nothing(timeout=0.5)
        await communicator.disconnect()

    run(scenario)


# -- the VM table's rows -------------------------------------------------------------------------------------


def test_a_vm_that_stops_or_starts_matching_the_tables_filter_makes_the_page_refresh_its_table(demo, viewer):
    cookie = session_cookie(viewer)
    pool, web, db, h1 = demo["pool"], demo["web"], demo["db"], demo["h1"]
    hello = table_hello(viewer, "power_state=Running")
    assert hello["rows"] == [db.uuid, web.uuid] and hello["total"] == 2
    assert "power_state=Running" in hello["query"] and "page=1" in hello["query"]

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        await communicator.send_to(text_data=json.dumps(hello))

        # Negative control: a change that leaves the table's rows as they are re-renders the row (and, a first
        # batch, sends every label), nothing more.
        await deliver(inventory_change(pool=pool.uuid, cls="vm", uuid=web.uuid))
        text = await receive_until(communicator, lambda t: 'id="hdr-pools-summary"' in t)
        assert f'id="row-vm-{web.uuid}"' in text and REFRESH_TABLE not in text
        assert await communicator.receive_nothing(timeout=0.3)

        # web-01 shuts down: it no longer matches power_state=Running.
        await set_power(web, PowerState.HALTED)
        await deliver(inventory_change(pool=pool.uuid, cls="vm", uuid=web.uuid))
        text = await receive_until(communicator, lambda t: t == REFRESH_TABLE)
        assert text.endswith(REFRESH_TABLE)  # after the batch's own fragments

        # It starts again: it comes back (the consumer kept what the table shows since).
        await set_power(web, PowerState.RUNNING, h1)
        await deliver(inventory_change(pool=pool.uuid, cls="vm", uuid=web.uuid))
        await receive_until(communicator, lambda t: t == REFRESH_TABLE)
        await communicator.disconnect()

    run(scenario)


def test_a_vm_entering_the_filter_on_another_page_refreshes_the_count(demo, viewer):
    """Only the match count changes (the VM sorts after the page shown): the table is fetched again for it."""
    cookie = session_cookie(viewer)
    pool, h1 = demo["pool"], demo["h1"]
    for i in range(25):
        make_vm(pool, host=h1, name_label=f"app-{i:02d}")
    late = make_vm(pool, name_label="zz-last")  # halted; sorts after every page-1 row
    hello = table_hello(viewer, "power_state=Running&per_page=25")
    assert len(hello["rows"]) == 25 and hello["total"] == 27

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        await communicator.send_to(text_data=json.dumps(hello))
        await set_power(late, PowerState.RUNNING, h1)
        await deliver(inventory_change(pool=pool.uuid, cls="vm", uuid=late.uuid))
        await receive_until(communicator, lambda t: t == REFRESH_TABLE)
        await communicator.disconnect()

    run(scenario)


def test_the_tables_query_runs_only_for_batches_that_touch_its_vms(demo, viewer, monkeypatch):
    cookie = session_cookie(viewer)
    pool, web, h1 = demo["pool"], demo["web"], demo["h1"]
    hello = table_hello(viewer, "power_state=Running")
    runs: list[str] = []
    real = table.vm_table_page_rows

    def counted(**kwargs):  # the real query, counted
        runs.append(kwargs["params"].urlencode())
        return real(**kwargs)

    monkeypatch.setattr(table, "vm_table_page_rows", counted)

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        await communicator.send_to(text_data=json.dumps(hello))
        await deliver(inventory_change(pool=pool.uuid, cls="host", uuid=h1.uuid))
        await receive_until(communicator, lambda t: f'id="tree-host-{h1.uuid}"' in t)
        assert await communicator.receive_nothing(timeout=0.3)
        assert runs == []  # a host's change: no query
        await deliver(inventory_change(pool=pool.uuid, cls="vm", uuid=web.uuid))
        await receive_until(communicator, lambda t: f'id="row-vm-{web.uuid}"' in t)
        assert await communicator.receive_nothing(timeout=0.3)
        assert runs == [table.vm_table_params(hello["query"]).urlencode()]  # a VM's: one, the page's query
        await communicator.disconnect()

    run(scenario)


def test_a_table_query_the_page_could_not_have_sent_is_ignored(demo, viewer):
    cookie = session_cookie(viewer)
    pool, web = demo["pool"], demo["web"]

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        for query in ["x" * 5000, "&".join(["a=1"] * 400), "pool=%C2%B2", "page=-3&per_page=7&sort=nonsense",
                      "power_state=Running&page=99999999999999999999"]:  # fmt: skip
            await communicator.send_to(text_data=json.dumps({"view": "vms", "rows": [web.uuid], "query": query,
                                                             "total": True}))  # fmt: skip
            await deliver(inventory_change(pool=pool.uuid, cls="vm", uuid=web.uuid))
            text = await receive_until(communicator, lambda t: f'id="row-vm-{web.uuid}"' in t)
            assert "web-01" in text
            while (more := await next_message(communicator)) is not None:  # its labels, perhaps a refresh
                assert more != RESYNC  # never a resync after an error
        await communicator.disconnect()

    run(scenario)


def test_a_table_query_slower_than_its_budget_is_given_up_and_the_table_no_longer_followed(
    demo, viewer, monkeypatch
):
    pool, web, h1 = demo["pool"], demo["web"], demo["h1"]
    params = table.vm_table_params("power_state=Running&page=1")
    assert table.vm_table_page_rows(user=viewer, params=params, timeout_ms=1000) == ((demo["db"].uuid, web.uuid), 2)
    # The database's timeout stops a query that takes too long (a sleep stands in for a slow sort).
    slow = table.vm_table_query(user=viewer, params=params)
    sleeping = RawSQL("SELECT id FROM inventory_vm, pg_sleep(1)", [])
    slow = dataclasses.replace(slow, rows=slow.rows.filter(pk__in=sleeping))
    monkeypatch.setattr(table, "vm_table_query", lambda **kwargs: slow)
    started = time.monotonic()
    assert table.vm_table_page_rows(user=viewer, params=params, timeout_ms=100) is None
    assert time.monotonic() - started < 0.9
    assert table.vm_table_page_rows(user=viewer, params=params) is not None  # no budget: it waits

    # The consumer gives that table up: a VM leaving its filter no longer asks for a refresh (rows still change).
    hello = table_hello(viewer, "power_state=Running")
    monkeypatch.setattr(table, "vm_table_page_rows", lambda **kwargs: None)
    cookie = session_cookie(viewer)

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        await communicator.send_to(text_data=json.dumps(hello))
        for state, host in ((PowerState.HALTED, None), (PowerState.RUNNING, h1)):
            await set_power(web, state, host)
            await deliver(inventory_change(pool=pool.uuid, cls="vm", uuid=web.uuid))
            await receive_until(communicator, lambda t: f'id="row-vm-{web.uuid}"' in t)
            while (more := await next_message(communicator)) is not None:  # its labels
                assert more != REFRESH_TABLE
        await communicator.disconnect()

    run(scenario)

