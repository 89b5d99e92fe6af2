"""Pools by the names they were given, many pools, and pools being removed: the pages (Django test client, real
Postgres), the REST API, alerts, and what the live consumer does when a pool's name changes."""
import asyncio
import datetime as dt
import json
import re

import pytest
from channels.db import database_sync_to_async
from django.core import mail
from django.utils import timezone

from alerts.choices import Condition
from alerts.models import Delivery, Recipient
from alerts.services import alert_raise, delivery_message
from eac.realtime import inventory_change
from inventory.models import Pool
from inventory.services import pool_update
from protection.choices import ProtectionStatus
from protection.models import Protection
from tests.channels_support import ORIGIN, connect, deliver, element, receive_until, run, session_cookie
from tests.inventory.factories import make_host, make_pool, make_vm

RESYNC = '<div id="live-control" data-action="resync"></div>'


@pytest.fixture
def client_in(client, viewer):
    client.force_login(viewer)
    return client


@pytest.fixture
def viewer_api(viewer):
    from rest_framework.test import APIClient

    api = APIClient()
    api.force_authenticate(viewer)
    return api


def pool_with_vms(name: str, name_label: str, *, vms: int = 2, **fields) -> dict:
    pool = make_pool(name=name, name_label=name_label, **fields)
    host = make_host(pool, name_label=f"{name.lower().replace(' ', '-')}-host", is_master=True)
    made = [make_vm(pool, host=host, name_label=f"{name.lower().replace(' ', '-')}-vm-{i}") for i in range(vms)]
    return {"pool": pool, "host": host, "vms": made}


@pytest.fixture
def two_demo_pools():
    """What issue 13 saw: a second pool registered as "Lab pool" whose XAPI name is "Demo pool", as the first's."""
    return pool_with_vms("Demo pool", "Demo pool"), pool_with_vms("Lab pool", "Demo pool")


def card(html: str, pool: Pool) -> str:
    """The overview's card of ``pool`` (its divs nest: up to the next card or the end of the cards)."""
    return re.search(rf'<div id="card-pool-{pool.uuid}".*?(?=<div id="card-|</div>\s*</section>)', html, re.S).group(0)


def text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).strip()


def row_pools(html: str) -> list[str]:
    return [text(c) for c in re.findall(r'<td class="c-pool">(.*?)</td>', html, re.S)]


def row_names(html: str) -> list[str]:
    return re.findall(r'<td class="c-name"><a [^>]*>([^<]+)</a>', html)


# -- the name given is the pool's name -------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_name_given_is_shown_in_header_tree_and_overview_with_xapis_label_beside_it_when_it_differs(
    client_in, two_demo_pools
):
    demo, lab = two_demo_pools[0]["pool"], two_demo_pools[1]["pool"]
    html = client_in.get("/").content.decode()

    chip = element(html, f"hdr-pool-{lab.uuid}")
    assert '<span class="hdr-pool-name">Lab pool</span>' in chip and 'title="Lab pool (XAPI: Demo pool): ' in chip
    assert '<span class="hdr-pool-name">Demo pool</span>' in element(html, f"hdr-pool-{demo.uuid}")
    assert text(element(html, f"tn-pool-{lab.uuid}")) == "Lab pool (XAPI: Demo pool)"
    # The same name in XAPI as given: no suffix.
    assert "XAPI" not in element(html, f"tree-pool-{demo.uuid}")
    assert "Lab pool (XAPI: Demo pool)" in text(card(html, lab))
    assert "XAPI" not in card(html, demo)


@pytest.mark.django_db
def test_the_vm_table_vm_host_and_pool_pages_call_the_pool_by_its_given_name(client_in, two_demo_pools):
    lab = two_demo_pools[1]
    pool, vm, host = lab["pool"], lab["vms"][0], lab["host"]

    html = client_in.get(f"/vms/?pool={pool.pk}").content.decode()
    assert set(row_pools(html)) == {"Lab pool"}
    options = dict(re.findall(r'<option value="(\d+)"[^>]*>([^<]+)</option>', html.split('id="f-pool"')[1]
                              .split("</select>")[0]))  # fmt: skip
    assert options[str(pool.pk)] == "Lab pool (XAPI: Demo pool)"

    page = client_in.get(f"/vms/{vm.uuid}/").content.decode()
    assert re.search(r'<nav class="crumbs"[^>]*><a href="/pools/\d+/">Lab pool</a>', page)
    assert "Lab pool</a></dd>" in page  # the VM panel's Pool row
    page = client_in.get(f"/hosts/{host.uuid}/").content.decode()
    assert re.search(r'<nav class="crumbs"[^>]*><a href="/pools/\d+/">Lab pool</a>', page)

    page = client_in.get(f"/pools/{pool.pk}/").content.decode()
    assert "<title>Lab pool · eAC</title>" in page
    assert text(re.search(r'<h1 id="pool-title-\d+">.*?</h1>', page, re.S).group(0)) == "Lab pool (XAPI: Demo pool)"
    assert '<dd class="pool-xapi-name">Demo pool</dd>' in page


@pytest.mark.django_db
def test_the_api_gives_the_name_given_and_xapis_name_label_read_only(admin_api, two_demo_pools):
    pool = two_demo_pools[1]["pool"]
    data = admin_api.get(f"/api/v1/pools/{pool.pk}/").json()
    assert data["name"] == "Lab pool" and data["xapi_name_label"] == "Demo pool"
    # Read-only: a PATCH that sends it changes nothing of it (and renames nothing through it).
    response = admin_api.patch(f"/api/v1/pools/{pool.pk}/", {"xapi_name_label": "Other"}, format="json")
    assert response.status_code == 200, response.content
    assert Pool.objects.get(pk=pool.pk).name_label == "Demo pool"
    plan = admin_api.get(f"/api/v1/pools/{pool.pk}/failover-plan/").json()
    assert plan["pool_name"] == "Lab pool"


@pytest.mark.django_db
def test_alerts_and_their_mail_name_the_pool_as_given_and_follow_a_rename(client, admin_user, two_demo_pools):
    pool = two_demo_pools[1]["pool"]
    Recipient.objects.create(email="ops@example.org")
    alert, _ = alert_raise(condition=Condition.POOL_UNREACHABLE, object_key=f"pool:{pool.uuid}", pool=pool,
                           message="The console cannot reach pool Lab pool")  # fmt: skip
    assert alert.pool_name == "Lab pool"
    message = delivery_message(Delivery.objects.get(alert=alert))
    assert "Lab pool" in message.subject and "Demo pool" not in message.subject
    assert "Pool:       Lab pool" in message.body

    pool_update(pool=pool, name="Lab pool B")
    client.force_login(admin_user)
    page = client.get("/alerts/").content.decode()
    assert "Lab pool B" in text(element(page, f"alert-{alert.pk}"))
    assert "Pool:       Lab pool B" in delivery_message(Delivery.objects.get(alert=alert)).body
    mail.outbox.clear()


# -- many pools: the pool filter, the counts, the tree and the header ------------------------------------------


@pytest.mark.django_db
def test_the_vm_table_filters_by_pool_through_its_form_and_the_api_through_the_same_filterset(
    client_in, viewer_api, two_demo_pools
):
    demo, lab = two_demo_pools
    html = client_in.get("/vms/").content.decode()
    assert 'id="f-pool"' in html  # several pools: the form has a pool filter
    # Hosts grouped by pool in the host filter.
    assert '<optgroup label="Lab pool">' in html and '<optgroup label="Demo pool">' in html
    assert sorted(row_names(html)) == sorted(vm.name_label for vm in demo["vms"] + lab["vms"])

    html = client_in.get(f"/vms/?pool={lab['pool'].pk}").content.decode()
    assert sorted(row_names(html)) == sorted(vm.name_label for vm in lab["vms"])
    assert re.search(rf'<option value="{lab["pool"].pk}" selected>', html)
    # The host filter lists that pool's hosts only.
    host_select = html.split('id="f-host"')[1].split("</select>")[0]
    assert lab["host"].name_label in host_select and demo["host"].name_label not in host_select
    # The live consumer re-runs the query the table shows, pool included.
    assert f"pool={lab['pool'].pk}" in re.search(r'data-query="([^"]*)"', html).group(1)

    data = viewer_api.get(f"/api/v1/vms/?pool={lab['pool'].pk}").json()
    assert sorted(v["name"] for v in data["results"]) == sorted(vm.name_label for vm in lab["vms"])
    assert {v["pool"] for v in data["results"]} == {lab["pool"].pk}


@pytest.mark.django_db
def test_a_pool_filter_naming_no_pool_is_ignored_and_said_so(client_in, two_demo_pools):
    html = client_in.get("/vms/?pool=999999").content.decode()
    assert "Ignored invalid filter: pool" in html
    assert len(row_names(html)) == 4


@pytest.mark.django_db
def test_the_overview_counts_hosts_vms_running_and_protected_per_pool(client_in, two_demo_pools):
    lab = two_demo_pools[1]
    make_vm(lab["pool"], name_label="lab-halted", power_state="Halted")
    Protection.objects.create(vm=lab["vms"][0], pool=lab["pool"], status=ProtectionStatus.PROTECTED)
    Protection.objects.create(vm=lab["vms"][1], pool=lab["pool"], status=ProtectionStatus.PROTECTING)  # not yet
    shown = card(client_in.get("/").content.decode(), lab["pool"])
    assert text(re.search(r'<dd class="stat-hosts">.*?</dd>', shown, re.S).group(0)) == "1 /1"
    assert text(re.search(r'<dd class="stat-vms">.*?</dd>', shown, re.S).group(0)) == "2 /3"
    assert text(re.search(r'<dd class="stat-protected">.*?</dd>', shown, re.S).group(0)) == "1"
    assert f'href="/vms/?pool={lab["pool"].pk}"' in shown  # the card leads to the pool's VMs


@pytest.mark.django_db
def test_with_many_pools_the_tree_starts_folded_and_the_header_shows_a_count_and_a_menu(client_in):
    pools = [make_pool(name=f"Pool {i:02}", name_label=f"xapi-{i}") for i in range(20)]
    pools[3].connection_state = "unreachable"
    pools[3].save()
    html = client_in.get("/").content.decode()
    for pool in pools:
        assert re.search(rf'<li id="ti-pool-{pool.uuid}"[^>]*aria-expanded="false"', html)
    header = element(html, "hdr-pools")
    assert 'class="hdr-menu"' in header
    summary = re.search(r'<span id="hdr-pools-summary".*?</summary>', html, re.S).group(0)
    assert text(summary) == "20 pools 1 needs attention"
    # Every pool's chip is still there (in the menu), for the live pushes to find by id.
    assert all(f'id="hdr-pool-{p.uuid}"' in header for p in pools)
    assert "20 pools" in text(element(html, "tree"))


@pytest.mark.django_db
def test_with_a_few_pools_the_tree_starts_open_and_the_header_has_a_chip_each(client_in, two_demo_pools):
    html = client_in.get("/").content.decode()
    for entry in two_demo_pools:
        assert re.search(rf'<li id="ti-pool-{entry["pool"].uuid}"[^>]*aria-expanded="true"', html)
    assert 'class="hdr-menu"' not in html and 'id="hdr-pools-summary"' not in html


# -- a pool being removed ----------------------------------------------------------------------------------------


@pytest.fixture
def removing(two_demo_pools):
    lab = two_demo_pools[1]
    Pool.objects.filter(pk=lab["pool"].pk).update(removing_since=timezone.now())
    lab["pool"].refresh_from_db()
    return lab


@pytest.mark.django_db
def test_a_pool_being_removed_is_badged_in_header_tree_and_overview_and_shows_nothing_below_it(
    client_in, two_demo_pools, removing
):
    pool, demo = removing["pool"], two_demo_pools[0]
    html = client_in.get("/").content.decode()
    assert "being removed" in text(element(html, f"hdr-pool-{pool.uuid}"))
    assert "being removed" in text(element(html, f"tree-pool-{pool.uuid}"))
    assert "being removed" in text(card(html, pool))
    # Its node has nothing to open; the other pool's hosts are still there.
    assert f'id="ti-host-{removing["host"].uuid}"' not in html
    assert f'id="ti-host-{demo["host"].uuid}"' in html
    assert not re.search(rf'<li id="ti-pool-{pool.uuid}"[^>]*aria-expanded', html)
    # The Protected VM Summary counts the VMs the table shows: not the removed pool's.
    counts = sum(int(n) for n in re.findall(r'<span class="summary-count">(\d+)</span>', html))
    assert counts == len(demo["vms"])


@pytest.mark.django_db
def test_a_pool_being_removed_has_its_vms_hidden_from_the_table_and_its_filter(client_in, two_demo_pools, removing):
    html = client_in.get("/vms/").content.decode()
    assert sorted(row_names(html)) == sorted(vm.name_label for vm in two_demo_pools[0]["vms"])
    assert f'<option value="{removing["pool"].pk}"' not in html
    # Asked for by the filter, it is no choice: ignored, and its VMs still not shown.
    html = client_in.get(f"/vms/?pool={removing['pool'].pk}").content.decode()
    assert "Ignored invalid filter: pool" in html
    assert not set(row_names(html)) & {vm.name_label for vm in removing["vms"]}


@pytest.mark.django_db
def test_a_pool_being_removed_offers_no_action(client, admin_user, removing):
    client.force_login(admin_user)
    vm = removing["vms"][0]
    page = client.get(f"/vms/{vm.uuid}/").content.decode()
    panel = element(page, f"vm-{vm.uuid}")
    assert "act-start" not in panel and "act-shutdown" not in panel and "act-protect" not in panel
    assert "is being removed" in panel
    page = client.get(f"/pools/{removing['pool'].pk}/").content.decode()
    assert 'class="notice pool-removing"' in page and 'id="pool-plan-link"' not in page
    assert "being removed" in text(element(page, f"pool-{removing['pool'].uuid}"))
    # Its host's page still opens (its pool's overview lists no hosts any more).
    assert client.get(f"/hosts/{removing['host'].uuid}/").status_code == 200
    page = client.get(f"/protection/pools/{removing['pool'].pk}/plan/").content.decode()
    assert "can no longer be changed" in page and 'name="failures_to_tolerate"' not in page


# -- the watcher line on the pool page ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_pool_page_says_which_watcher_holds_the_pool_and_since_when(client_in):
    since = dt.datetime(2026, 12, 7, 9, 30, 5, tzinfo=dt.UTC)
    watched = make_pool(name="Watched", watcher="console-2:4242", watched_since=since)
    page = client_in.get(f"/pools/{watched.pk}/").content.decode()
    line = text(re.search(r'<dd class="pool-watcher">.*?</dd>', page, re.S).group(0))
    assert line == f"Watched by console-2:4242 since {since.strftime('%Y-%m-%d %H:%M:%S')} UTC"

    alone = make_pool(name="Alone")
    page = client_in.get(f"/pools/{alone.pk}/").content.decode()
    assert text(re.search(r'<dd class="pool-watcher">.*?</dd>', page, re.S).group(0)) == "Not watched"


# -- live: a pool renamed on either side ---------------------------------------------------------------------------


@database_sync_to_async
def hello_for(user, path: str) -> dict:
    """What eac.js sends when the page opens its socket: the view and when the page was rendered."""
    from django.test import Client

    client = Client()
    client.force_login(user)
    page = client.get(path).content.decode()
    view = re.search(r'<main id="main" class="main" data-view="([^"]*)"', page).group(1)
    rendered_at = float(re.search(r'data-rendered-at="([\d.]+)"', page).group(1))
    return {"view": view, "open": [], "rendered_at": rendered_at}


@pytest.mark.django_db(transaction=True)
def test_a_rename_in_the_console_or_in_xapi_makes_open_pages_resync_and_other_changes_only_patch_labels(
    viewer, two_demo_pools
):
    cookie = session_cookie(viewer)
    lab = two_demo_pools[1]["pool"]

    async def scenario():
        communicator, connected = await connect([ORIGIN, cookie])
        assert connected
        await communicator.send_to(text_data=json.dumps(await hello_for(viewer, "/vms/")))
        assert await communicator.receive_nothing(timeout=0.3)  # rendered after every change: no resync

        # Not a name: the labels are patched in place.
        await database_sync_to_async(Pool.objects.filter(pk=lab.pk).update)(connection_state="unreachable")
        await deliver(inventory_change(pool=lab.uuid, cls="pool", uuid=lab.uuid))
        html = await receive_until(communicator, lambda t: f'id="tree-pool-{lab.uuid}"' in t)
        assert RESYNC not in html and "conn-unreachable" in element(html, f"hdr-pool-{lab.uuid}")

        # Renamed through the services (the API, the admin): announced after commit, the page rebuilds.
        await database_sync_to_async(pool_update)(pool=lab, name="Lab pool B")
        await receive_until(communicator, lambda t: t == RESYNC)
        await communicator.send_to(text_data=json.dumps({"view": "vms", "open": []}))  # what eac.js does then

        # Renamed in XAPI: the watcher writes name_label and announces the pool record's change. (The names the
        # rebuilt page shows are still known to the socket: no label needs to have been sent since.)
        await database_sync_to_async(Pool.objects.filter(pk=lab.pk).update)(name_label="Lab in XAPI")
        await deliver(inventory_change(pool=lab.uuid, cls="pool", uuid=lab.uuid))
        await receive_until(communicator, lambda t: t == RESYNC)
        await communicator.disconnect()

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_a_pool_marked_for_removal_makes_open_pages_resync(viewer, two_demo_pools):
    cookie = session_cookie(viewer)
    lab = two_demo_pools[1]["pool"]

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        await communicator.send_to(text_data=json.dumps(await hello_for(viewer, "/")))
        assert await communicator.receive_nothing(timeout=0.3)
        await database_sync_to_async(Pool.objects.filter(pk=lab.pk).update)(removing_since=timezone.now())
        await deliver(inventory_change(pool=lab.uuid, cls="pool", uuid=lab.uuid))
        await receive_until(communicator, lambda t: t == RESYNC)
        await communicator.disconnect()

    run(scenario)


# -- what a socket follows of each pool -----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_page_showing_one_pool_gets_only_the_labels_of_the_others_and_only_from_their_summary(
    viewer, two_demo_pools
):
    from eac.realtime import inventory_summary

    cookie = session_cookie(viewer)
    demo, lab = two_demo_pools[0], two_demo_pools[1]
    lab_vm = lab["vms"][0]

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        hello = await hello_for(viewer, f"/vms/?pool={demo['pool'].pk}")
        await communicator.send_to(text_data=json.dumps({**hello, "query": f"pool={demo['pool'].pk}"}))
        assert await communicator.receive_nothing(timeout=0.3)
        # A VM of the other pool changes: its change is not sent to this page's channel at all...
        from channels.layers import get_channel_layer

        await database_sync_to_async(Pool.objects.filter(pk=lab["pool"].pk).update)(connection_state="unreachable")
        await get_channel_layer().group_send(*inventory_change(pool=lab["pool"].uuid, cls="pool",
                                                               uuid=lab["pool"].uuid))  # fmt: skip
        assert await communicator.receive_nothing(timeout=0.3)
        # ...its summary is, and the labels that changed go.
        await get_channel_layer().group_send(*inventory_summary(pools={lab["pool"].uuid: {"pool": ["mod"]}}))
        html = await receive_until(communicator, lambda t: f'id="hdr-pool-{lab["pool"].uuid}"' in t)
        assert "conn-unreachable" in element(html, f"hdr-pool-{lab['pool'].uuid}")
        assert f"tree-vm-{lab_vm.uuid}" not in html

        # The page shows the other pool now (its VM's page): its changes are followed in detail from then on. It
        # changed just now, perhaps after that page was rendered and before the socket followed it: the page
        # resyncs.
        await database_sync_to_async(Pool.objects.filter(pk=lab["pool"].pk).update)(last_event_at=timezone.now())
        await communicator.send_to(text_data=json.dumps({"view": f"vm:{lab_vm.uuid}", "open": []}))
        await receive_until(communicator, lambda t: t == RESYNC)
        await database_sync_to_async(lambda: lab_vm.__class__.objects.filter(pk=lab_vm.pk).update(
            name_label="renamed-in-lab"))()  # fmt: skip
        await deliver(inventory_change(pool=lab["pool"].uuid, cls="vm", uuid=lab_vm.uuid))
        html = await receive_until(communicator, lambda t: "renamed-in-lab" in t)
        assert f'id="vm-{lab_vm.uuid}"' in html
        await communicator.disconnect()

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_a_message_lost_by_the_channel_layer_makes_the_page_resync(viewer, two_demo_pools):
    from channels.layers import get_channel_layer

    cookie = session_cookie(viewer)
    demo = two_demo_pools[0]
    vm = demo["vms"][0]

    def numbered(seq):
        group, event = inventory_change(pool=demo["pool"].uuid, cls="vm", uuid=vm.uuid)
        return group, {**event, "stream": "sender-1", "seq": seq}

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        await communicator.send_to(text_data=json.dumps(await hello_for(viewer, f"/vms/{vm.uuid}/")))
        assert await communicator.receive_nothing(timeout=0.3)
        layer = get_channel_layer()
        for seq in (7, 8):  # in sequence: patched in place
            await layer.group_send(*numbered(seq))
        html = await receive_until(communicator, lambda t: f'id="vm-{vm.uuid}"' in t)
        assert RESYNC not in html
        assert await communicator.receive_nothing(timeout=0.3)
        await layer.group_send(*numbered(10))  # 9 never came
        await receive_until(communicator, lambda t: t == RESYNC)
        await communicator.disconnect()

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_a_rename_between_the_render_and_the_socket_makes_the_page_resync(viewer, two_demo_pools):
    cookie = session_cookie(viewer)
    lab = two_demo_pools[1]["pool"]

    async def scenario():
        hello = await hello_for(viewer, "/")
        # Renamed in the console after the page was rendered, before its socket opened: no socket heard of it.
        await database_sync_to_async(pool_update)(pool=lab, name="Lab pool renamed")
        communicator, _ = await connect([ORIGIN, cookie])
        await communicator.send_to(text_data=json.dumps(hello))
        await receive_until(communicator, lambda t: t == RESYNC)
        await communicator.disconnect()

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_a_pool_shown_by_its_labels_only_that_is_read_again_from_scratch_makes_the_page_resync(
    viewer, two_demo_pools
):
    """Its first sync, or a reconnect: hosts may have come or gone, which label updates cannot show."""
    from eac.realtime import inventory_resync

    cookie = session_cookie(viewer)
    lab = two_demo_pools[1]["pool"]

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        await communicator.send_to(text_data=json.dumps(await hello_for(viewer, "/")))
        assert await communicator.receive_nothing(timeout=0.3)
        await deliver(inventory_resync(pool=lab.uuid))  # the home page follows it by its summary only
        await receive_until(communicator, lambda t: t == RESYNC)
        await communicator.disconnect()

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_a_pool_entering_the_focus_just_after_it_was_read_from_scratch_makes_the_page_resync(
    viewer, two_demo_pools
):
    """Its first sync may have fallen between the page's render and the socket following it (the full suite found
    it: a pool registered and synced while the overview was open, its host node open from an earlier visit)."""
    cookie = session_cookie(viewer)
    lab = two_demo_pools[1]

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        await communicator.send_to(text_data=json.dumps(await hello_for(viewer, "/")))
        assert await communicator.receive_nothing(timeout=0.3)
        await database_sync_to_async(Pool.objects.filter(pk=lab["pool"].pk).update)(last_sync_at=timezone.now())
        await communicator.send_to(text_data=json.dumps({"view": "home", "open": [f"host-{lab['host'].uuid}"]}))
        await receive_until(communicator, lambda t: t == RESYNC)
        await communicator.disconnect()

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_a_change_of_the_shown_pool_goes_while_the_labels_of_the_others_are_still_being_read(viewer, two_demo_pools):
    """The labels of the pools a page shows only by their labels are read on a thread of their own
    (``console.reads``), in a batch of their own: a change of the pool the page shows never waits behind them. In one
    batch on one thread, the shown pool's updates waited for the other nineteen pools' labels (0.15 s a read, up to
    six summaries a second under load): seconds in bench_pools."""
    import threading

    from channels.layers import get_channel_layer

    from console import reads
    from eac.realtime import inventory_summary
    from inventory.choices import PowerState
    from inventory.models import VM

    cookie = session_cookie(viewer)
    demo, lab = two_demo_pools
    vm = demo["vms"][0]
    reading = threading.Event()
    release = threading.Event()

    def slow_read() -> None:  # what a slow read of labels does to the thread: holds it
        reading.set()
        release.wait(30)

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        hello = await hello_for(viewer, f"/vms/?pool={demo['pool'].pk}")
        await communicator.send_to(text_data=json.dumps({**hello, "query": f"pool={demo['pool'].pk}",
                                                         "rows": [v.uuid for v in demo["vms"]]}))  # fmt: skip
        assert await communicator.receive_nothing(timeout=0.3)
        reads._BACKGROUND.submit(slow_read)
        await asyncio.to_thread(reading.wait, 5)
        # The other pool changes: its labels are to be read on the busy thread.
        await database_sync_to_async(Pool.objects.filter(pk=lab["pool"].pk).update)(connection_state="unreachable")
        await get_channel_layer().group_send(*inventory_summary(pools={lab["pool"].uuid: {"pool": ["mod"]}}))
        # The shown pool's VM stops meanwhile: its row comes all the same, without the other pool's labels.
        await database_sync_to_async(VM.objects.filter(pk=vm.pk).update)(power_state=PowerState.HALTED,
                                                                          resident_on=None)  # fmt: skip
        await deliver(inventory_change(pool=demo["pool"].uuid, cls="vm", uuid=vm.uuid))
        html = await receive_until(communicator, lambda t: f'id="row-vm-{vm.uuid}"' in t)
        assert "Halted" in text(element(html, f"row-vm-{vm.uuid}"))
        assert f'id="hdr-pool-{lab["pool"].uuid}"' not in html
        # The thread free again, the other pool's labels follow.
        release.set()
        html = await receive_until(communicator, lambda t: f'id="hdr-pool-{lab["pool"].uuid}"' in t)
        assert "conn-unreachable" in element(html, f"hdr-pool-{lab['pool'].uuid}")
        await communicator.disconnect()

    try:
        run(scenario)
    finally:
        release.set()
