"""The live consumer through the real ASGI stack (session auth, origin check) on the Redis channel layer.

Changes are made the way the watcher makes them: rows written and committed, then the message
``eac.realtime`` builds for them sent to the pool's group.
"""
import json
import re
import time

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db import connection
from django.utils import timezone

from eac.realtime import alerts_change, inventory_change, inventory_resync, pool_group
from inventory.choices import PowerState
from inventory.models import VM
from tests.channels_support import ORIGIN, connect, deliver, element, receive_until, run, session_cookie
from tests.inventory.factories import make_vm

pytestmark = pytest.mark.django_db(transaction=True)


@database_sync_to_async
def update_vm(vm, **fields):
    VM.objects.filter(pk=vm.pk).update(**fields)


# -- who may connect --------------------------------------------------------------------------------


def test_anonymous_socket_is_refused(demo):
    async def scenario():
        communicator, connected = await connect([ORIGIN])
        assert not connected
        await communicator.disconnect()

    run(scenario)


def test_user_without_the_view_permission_is_refused(demo, django_user_model):
    cookie = session_cookie(django_user_model.objects.create_user("nobody", password="pw-nobody-1"))

    async def scenario():
        communicator, connected = await connect([ORIGIN, cookie])
        assert not connected

    run(scenario)


def test_socket_from_a_foreign_origin_is_refused(demo, viewer):
    cookie = session_cookie(viewer)

    async def scenario():
        communicator, connected = await connect([(b"origin", b"http://evil.example.org"), cookie])
        assert not connected

    run(scenario)


def test_deactivated_user_is_refused(demo, viewer):
    cookie = session_cookie(viewer)
    viewer.is_active = False
    viewer.save()

    async def scenario():
        communicator, connected = await connect([ORIGIN, cookie])
        assert not connected

    run(scenario)


# -- fragments ------------------------------------------------------------------------------------------


def test_vm_change_arrives_as_tree_item_table_row_and_host_labels_with_stable_ids(demo, viewer):
    cookie = session_cookie(viewer)
    pool, web, h1 = demo["pool"], demo["web"], demo["h1"]

    async def scenario():
        communicator, connected = await connect([ORIGIN, cookie])
        assert connected
        await communicator.send_to(
            text_data=json.dumps({"view": "vms", "open": ["pvs", f"pool-{pool.uuid}", f"host-{h1.uuid}"],
                                  "rows": [web.uuid]})  # fmt: skip
        )
        await update_vm(web, power_state=PowerState.HALTED, resident_on=None)
        await deliver(inventory_change(pool=pool.uuid, cls="vm", uuid=web.uuid))
        # The VM's fragments first, then the labels (they read more: the VM's update does not wait for them).
        html = await receive_until(communicator, lambda t: f'id="tree-host-{h1.uuid}"' in t)
        assert html.index(f'id="row-vm-{web.uuid}"') < html.index(f'id="tree-host-{h1.uuid}"')
        item = element(html, f"tree-vm-{web.uuid}")
        assert f'data-parent="halted-{pool.uuid}"' in item and 'aria-label="Halted"' in item
        row = element(html, f"row-vm-{web.uuid}")
        assert "Halted" in row and "Running" not in row
        host = element(html, f"tree-host-{h1.uuid}")
        assert '<span class="count" title="Resident VMs">0</span>' in host
        assert f'id="tree-halted-{pool.uuid}"' in html and f'id="hdr-pool-{pool.uuid}"' in html
        await communicator.disconnect()

    run(scenario)


def test_vm_moved_between_hosts_updates_both_hosts_and_only_what_changed(demo, viewer):
    cookie = session_cookie(viewer)
    pool, web, h1, h2 = demo["pool"], demo["web"], demo["h1"], demo["h2"]

    async def scenario():
        communicator, connected = await connect([ORIGIN, cookie])
        await communicator.send_to(text_data=json.dumps({"view": "home", "open": [f"host-{h1.uuid}"]}))
        # The first batch sends every label: a baseline.
        await deliver(inventory_change(pool=pool.uuid, cls="vm", uuid=web.uuid))
        await receive_until(communicator, lambda t: f'id="hdr-pool-{pool.uuid}"' in t)

        await update_vm(web, resident_on=h2)
        await deliver(inventory_change(pool=pool.uuid, cls="vm", uuid=web.uuid))
        html = await receive_until(communicator, lambda t: f'id="tree-host-{h2.uuid}"' in t)
        assert f'data-parent="host-{h2.uuid}"' in element(html, f"tree-vm-{web.uuid}")
        assert '<span class="count" title="Resident VMs">0</span>' in element(html, f"tree-host-{h1.uuid}")
        assert '<span class="count" title="Resident VMs">2</span>' in element(html, f"tree-host-{h2.uuid}")
        # Labels that did not change are not sent again.
        assert f'id="hdr-pool-{pool.uuid}"' not in html and f'id="tree-halted-{pool.uuid}"' not in html
        await communicator.disconnect()

    run(scenario)


def test_vm_page_gets_its_detail_panel_when_the_vm_changes(demo, viewer):
    cookie = session_cookie(viewer)
    pool, web = demo["pool"], demo["web"]

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        await communicator.send_to(text_data=json.dumps({"view": f"vm:{web.uuid}", "open": []}))
        await update_vm(web, power_state=PowerState.PAUSED)
        await deliver(inventory_change(pool=pool.uuid, cls="vm", uuid=web.uuid))
        html = await receive_until(communicator, lambda t: f'<section id="vm-{web.uuid}"' in t)
        panel = element(html, f"vm-{web.uuid}")
        assert "Paused" in panel and "xcp-host-1" in panel
        await receive_until(communicator, lambda t: 'id="hdr-pools-summary"' in t)  # then every label (the first)
        # Another VM's change does not re-render this page's panel.
        await deliver(inventory_change(pool=pool.uuid, cls="vm", uuid=demo["db"].uuid))
        assert await communicator.receive_nothing(timeout=0.5)
        await communicator.disconnect()

    run(scenario)


def test_deleted_vm_is_removed_from_tree_and_table(demo, viewer):
    cookie = session_cookie(viewer)
    pool, db, h2 = demo["pool"], demo["db"], demo["h2"]

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        await communicator.send_to(
            text_data=json.dumps({"view": "vms", "open": [f"host-{h2.uuid}"], "rows": [db.uuid]})
        )
        await database_sync_to_async(VM.objects.filter(pk=db.pk).delete)()
        await deliver(inventory_change(pool=pool.uuid, cls="vm", uuid=db.uuid, op="del"))
        html = await receive_until(communicator, lambda t: f'id="row-vm-{db.uuid}" hx-swap-oob="delete"' in t)
        assert f'<li id="tree-vm-{db.uuid}" hx-swap-oob="delete">' in html
        await communicator.disconnect()

    run(scenario)


def test_pool_resync_asks_the_page_to_resync(demo, viewer):
    cookie = session_cookie(viewer)
    pool = demo["pool"]

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        await deliver(inventory_resync(pool=pool.uuid))
        text = await communicator.receive_from(timeout=5)
        assert text == '<div id="live-control" data-action="resync"></div>'
        await communicator.disconnect()

    run(scenario)


def test_page_rendered_before_a_change_is_told_to_resync_when_its_socket_opens(demo, viewer):
    cookie = session_cookie(viewer)
    pool = demo["pool"]
    rendered_at = time.time() - 5
    pool.last_event_at = timezone.now()
    pool.save()

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        await communicator.send_to(text_data=json.dumps({"view": "home", "rendered_at": rendered_at}))
        assert "resync" in await communicator.receive_from(timeout=5)
        # A page rendered after the last event is up to date: nothing to do.
        await communicator.send_to(text_data=json.dumps({"view": "home", "rendered_at": time.time() + 1}))
        assert await communicator.receive_nothing(timeout=0.3)
        await communicator.disconnect()

    run(scenario)


def test_user_gets_nothing_about_pools_they_may_not_see(demo, viewer):
    """A message about another pool is dropped even when it reaches the socket's group."""
    cookie = session_cookie(viewer)
    pool, web = demo["pool"], demo["web"]

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        await communicator.send_to(text_data=json.dumps({"view": "vms", "rows": [web.uuid]}))
        _, about_another_pool = inventory_change(pool="11111111-2222-3333-4444-555555555555", cls="vm", uuid=web.uuid)
        await get_channel_layer().group_send(pool_group(pool.uuid), about_another_pool)
        assert await communicator.receive_nothing(timeout=0.5)
        await communicator.disconnect()

    run(scenario)


def test_bad_messages_from_the_page_are_ignored(demo, viewer):
    cookie = session_cookie(viewer)
    pool, web = demo["pool"], demo["web"]

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        for bad in ["not json", "[]", '{"view": 5}', '{"view": "vm:../../etc"}', '{"open": "x"}',
                    '{"rows": [1, null, "zz"]}', '{"rendered_at": "soon"}', "x" * 100_000,
                    '{"view": "pool:99999999999999999999999"}']:  # fmt: skip
            await communicator.send_to(text_data=bad)
        await communicator.send_to(text_data=json.dumps({"view": "vms", "rows": [web.uuid]}))
        await deliver(inventory_change(pool=pool.uuid, cls="vm", uuid=web.uuid))
        html = await receive_until(communicator, lambda t: f'id="row-vm-{web.uuid}"' in t)
        assert "web-01" in html
        await communicator.disconnect()

    run(scenario)


def test_a_burst_of_changes_costs_a_fixed_number_of_queries(demo, viewer):
    cookie = session_cookie(viewer)
    pool, h1 = demo["pool"], demo["h1"]
    vms = [make_vm(pool, host=h1, name_label=f"burst-{i:03d}") for i in range(60)]

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        await communicator.send_to(text_data=json.dumps({"view": "vms", "open": [f"host-{h1.uuid}"],
                                                         "rows": [vm.uuid for vm in vms]}))  # fmt: skip
        await database_sync_to_async(VM.objects.filter(pk__in=[vm.pk for vm in vms]).update)(
            power_state=PowerState.HALTED, resident_on=None
        )
        queries.clear()
        for vm in vms:
            await deliver(inventory_change(pool=pool.uuid, cls="vm", uuid=vm.uuid))
        last = vms[-1].uuid
        html = await receive_until(communicator, lambda t: f'id="row-vm-{last}"' in t, timeout=10)
        assert all(f'id="row-vm-{vm.uuid}"' in html for vm in vms)
        await communicator.disconnect()

    # The consumer's reads run on this thread's connection (thread-sensitive sync_to_async).
    queries: list[str] = []

    def count(execute, sql, params, many, context):
        queries.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(count):
        run(scenario)
    # Each batch reads the pools first and costs a few queries whatever its size. How many batches a burst
    # makes depends on the machine's speed (events arriving within the coalescing window share one), so
    # only the cost per batch is pinned here; benchmarks/bench_live.py measures the coalescing.
    batches = sum(1 for sql in queries if sql.startswith('SELECT "inventory_pool"."id"'))
    print(f"{len(vms)} changes: {batches} batches, {len(queries)} queries")
    assert 1 <= batches <= len(vms)
    assert len(queries) <= 8 * batches, queries


def test_open_alerts_counter_is_pushed_when_an_alert_opens(demo, viewer):
    from alerts.choices import Condition
    from alerts.models import Alert

    cookie = session_cookie(viewer)
    condition = Condition.values[0]

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        alert = await database_sync_to_async(Alert.objects.create)(
            condition=condition, object_key=f"host:{demo['h1'].uuid}", pool=demo["pool"], message="Host lost"
        )
        await deliver(alerts_change(alert=alert.pk))
        text = await communicator.receive_from(timeout=5)
        assert 'id="alerts-counter"' in text and 'class="alerts-count">1<' in text
        await communicator.disconnect()

    run(scenario)


def test_a_socket_idle_longer_than_the_layers_blocking_read_still_gets_changes(demo, viewer):
    """channels_redis blocks 5 s per receive; the Redis client must not time out before it returns."""
    cookie = session_cookie(viewer)
    pool, web = demo["pool"], demo["web"]

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        await communicator.send_to(text_data=json.dumps({"view": "vms", "rows": [web.uuid]}))
        assert await communicator.receive_nothing(timeout=6.5)
        await deliver(inventory_change(pool=pool.uuid, cls="vm", uuid=web.uuid))
        html = await receive_until(communicator, lambda t: f'id="row-vm-{web.uuid}"' in t)
        assert "web-01" in html
        await communicator.disconnect()

    run(scenario)


def test_after_the_pages_hello_only_labels_that_changed_are_sent(demo, viewer):
    cookie = session_cookie(viewer)
    pool, web, h1 = demo["pool"], demo["web"], demo["h1"]

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        await communicator.send_to(text_data=json.dumps(
            {"view": "home", "open": [f"pool-{pool.uuid}", f"host-{h1.uuid}"], "rendered_at": time.time()}
        ))  # fmt: skip
        assert await communicator.receive_nothing(timeout=0.3)  # the page is up to date: no resync
        await update_vm(web, name_label="web-01-renamed")
        await deliver(inventory_change(pool=pool.uuid, cls="vm", uuid=web.uuid))
        html = await receive_until(communicator, lambda t: f'id="tree-vm-{web.uuid}"' in t)
        assert "web-01-renamed" in html
        assert re.findall(r'^<\w+ id="([^"]+)"', html, re.M) == [f"tree-vm-{web.uuid}"]
        await communicator.disconnect()

    run(scenario)


def test_a_removed_pool_makes_the_page_resync(demo, viewer):
    cookie = session_cookie(viewer)
    pool = demo["pool"]
    uuid = pool.uuid

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        await database_sync_to_async(pool.delete)()
        await deliver(inventory_change(pool=uuid, cls="pool", uuid=uuid, op="del"))
        assert "resync" in await communicator.receive_from(timeout=5)
        await communicator.disconnect()

    run(scenario)
