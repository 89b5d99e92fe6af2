"""Protection in the console's pages and live push: the tree, the table, the summary, the marks and the
VM, pool and header links read the protection app's state, and its changes are pushed where they show."""
from __future__ import annotations

import json
import re

import pytest
from channels.db import database_sync_to_async
from django.test import Client

from eac.realtime import inventory_change, protection_change
from inventory.models import VM
from protection import services
from protection.models import Protection
from tests.channels_support import ORIGIN, connect, deliver, element, receive_until, run, session_cookie
from tests.inventory.factories import make_disk, make_host, make_pool, make_vm

pytestmark = pytest.mark.django_db


@pytest.fixture
def viewer_client(viewer):
    """A user who may see the inventory but is in neither protection role (a client of their own)."""
    client = Client()
    client.force_login(viewer)
    return client


def protect(vm, status="protected", level=1) -> Protection:
    return Protection.objects.create(vm=vm, pool=vm.pool, level=level, status=status)


def tree_row(html: str, dom_id: str) -> str:
    return re.search(rf'<div id="{dom_id}".*?</div>', html, re.S).group(0)


def group_count(html: str, key: str) -> str:
    return re.search(rf'id="tree-{key}".*?class="count[^"]*">(\d+)<', html, re.S).group(1)


def table_row(html: str, vm) -> str:
    return re.search(rf'<tr id="row-vm-{vm.uuid}".*?</tr>', html, re.S).group(0)


def row_ids(html: str) -> list[str]:
    return re.findall(r'<tr id="(row-vm-[^"]+)"', html)


def section(html: str, dom_id: str) -> str:
    return re.search(rf'<section id="{dom_id}".*?</section>', html, re.S).group(0)


# -- pages -------------------------------------------------------------------------------------------


def test_a_protected_vm_shows_level1_in_the_table_the_summary_and_its_page(admin_client, pool_setup):
    agile, pinned = pool_setup["agile"], pool_setup["pinned"]
    before = admin_client.get("/").content.decode()
    assert (group_count(before, "pvs-level1"), group_count(before, "pvs-candidate")) == ("0", "1")

    protection = protect(agile)
    home = admin_client.get("/").content.decode()
    assert (group_count(home, "pvs-level1"), group_count(home, "pvs-candidate")) == ("1", "0")
    assert group_count(home, "pvs-unprotected") == "1"
    assert f'id="tree-pvsvm-{agile.uuid}"' in admin_client.get("/tree/pvs-level1/").content.decode()

    row = table_row(admin_client.get("/vms/").content.decode(), agile)
    assert 'class="status-pill st-level1"' in row and "Protected at Level 1" in row
    assert "Protected VM" in row and ">L1<" in row and 'class="health st-good"' in row
    assert row_ids(admin_client.get("/vms/?status=level1").content.decode()) == [f"row-vm-{agile.uuid}"]
    assert row_ids(admin_client.get("/vms/?status=candidate").content.decode()) == []
    pinned_row = table_row(admin_client.get("/vms/").content.decode(), pinned)
    assert 'class="status-pill st-unprotected"' in pinned_row and "Unprotected VM" in pinned_row

    page = section(admin_client.get(f"/vms/{agile.uuid}/").content.decode(), f"vm-{agile.uuid}")
    assert "Protected at Level 1" in page and "Level 1" in page
    assert "Host: " in page and "Failover plan: " in page  # the protection's components
    assert f'hx-post="/protection/{protection.pk}/unprotect/"' in page
    assert f'href="/protection/pools/{agile.pool.pk}/plan/"' in page


def test_a_degraded_or_failed_protection_marks_its_host_and_pool_nodes(admin_client, pool_setup):
    agile, pool = pool_setup["agile"], pool_setup["pool"]
    host = agile.resident_on
    protection = protect(agile)
    html = admin_client.get("/").content.decode()
    assert "component below" not in tree_row(html, f"tree-host-{host.uuid}")
    assert "component below" not in tree_row(html, f"tree-pool-{pool.uuid}")

    Protection.objects.filter(pk=protection.pk).update(status="degraded", status_reason="HA is off on the pool.")
    html = admin_client.get("/").content.decode()
    assert "A degraded component below" in tree_row(html, f"tree-host-{host.uuid}")
    assert "A degraded component below" in tree_row(html, f"tree-pool-{pool.uuid}")
    assert group_count(html, "pvs-degraded") == "1" and group_count(html, "pvs-level1") == "0"
    other = pool_setup["hosts"][2]
    assert "component below" not in tree_row(html, f"tree-host-{other.uuid}")
    assert "HA is off on the pool." in admin_client.get(f"/vms/{agile.uuid}/").content.decode()

    Protection.objects.filter(pk=protection.pk).update(status="failed")
    html = admin_client.get("/").content.decode()
    assert "A failed component below" in tree_row(html, f"tree-host-{host.uuid}")
    assert "A failed component below" in tree_row(html, f"tree-pool-{pool.uuid}")

    # Not running any more: the mark moves to the pool's halted VMs.
    type(agile).objects.filter(pk=agile.pk).update(resident_on=None, power_state="Halted")
    html = admin_client.get("/").content.decode()
    assert "component below" not in tree_row(html, f"tree-host-{host.uuid}")
    assert "A failed component below" in tree_row(html, f"tree-halted-{pool.uuid}")
    assert "A failed component below" in tree_row(html, f"tree-pool-{pool.uuid}")


def test_administrators_get_protect_and_unprotect_actions_and_a_selection(admin_client, pool_setup):
    agile, pinned = pool_setup["agile"], pool_setup["pinned"]
    protection = protect(agile)
    html = admin_client.get("/vms/").content.decode()
    assert re.search(r'<form id="vm-selection"[^>]*method="get" action="/protection/protect/"', html)
    for vm in (agile, pinned):
        assert f'name="vm" value="{vm.uuid}"' in table_row(html, vm)
    assert f'href="/protection/protect/?vm={pinned.uuid}"' in table_row(html, pinned)
    assert f'hx-post="/protection/{protection.pk}/unprotect/"' in table_row(html, agile)
    # The ticked boxes make the wizard's query: ?vm=<uuid>&vm=<uuid>.
    wizard = admin_client.get(f"/protection/protect/?vm={agile.uuid}&vm={pinned.uuid}").content.decode()
    assert f'id="preflight-{agile.uuid}"' in wizard and f'id="preflight-{pinned.uuid}"' in wizard

    page = section(admin_client.get(f"/vms/{pinned.uuid}/").content.decode(), f"vm-{pinned.uuid}")
    assert f'href="/protection/protect/?vm={pinned.uuid}"' in page and "act-unprotect" not in page


def test_boosted_protect_links_open_the_whole_wizard_and_its_own_form_refreshes_the_preflight(
    admin_client, pool_setup
):
    url = f"/protection/protect/?vm={pool_setup['agile'].uuid}"
    boosted = admin_client.get(url, HTTP_HX_REQUEST="true", HTTP_HX_BOOSTED="true").content.decode()
    assert 'id="main"' in boosted and 'id="wizard-form"' in boosted
    refresh = admin_client.get(url, HTTP_HX_REQUEST="true").content.decode()
    assert 'id="main"' not in refresh and f'id="preflight-{pool_setup["agile"].uuid}"' in refresh


def test_operators_see_protection_but_no_protect_or_unprotect_buttons(operator_client, pool_setup):
    agile, pinned = pool_setup["agile"], pool_setup["pinned"]
    protect(agile)
    html = operator_client.get("/vms/").content.decode()
    assert "Protected at Level 1" in table_row(html, agile)
    for text in ("vm-selection", "vm-select", "act-protect", "act-unprotect", "Protect selected"):
        assert text not in html
    for vm in (agile, pinned):
        page = section(operator_client.get(f"/vms/{vm.uuid}/").content.decode(), f"vm-{vm.uuid}")
        assert "act-protect" not in page and "act-unprotect" not in page and "Change settings" not in page
    assert 'href="/protection/"' in html and 'href="/alerts/"' in html


def test_header_links_to_protection_alerts_recipients_and_audit_for_the_two_roles_only(
    admin_client, viewer_client, pool_setup
):
    links = ('href="/protection/"', 'href="/alerts/"', 'href="/alerts/recipients/"', 'href="/protection/audit/"')
    html = admin_client.get("/").content.decode()
    nav = re.search(r'<nav class="topnav".*?</nav>', html, re.S).group(0)
    assert all(link in nav for link in links)
    assert re.search(r'<a id="alerts-counter"[^>]*href="/alerts/"', html)
    alerts_page = admin_client.get("/alerts/").content.decode()
    assert re.search(r'data-section="alerts"\s+aria-current="page"', alerts_page)

    html = viewer_client.get("/").content.decode()  # sees the inventory, not the protection pages
    nav = re.search(r'<nav class="topnav".*?</nav>', html, re.S).group(0)
    assert not any(link in nav for link in links)
    assert '<span id="alerts-counter"' in html


def test_pool_page_shows_ha_state_and_links_to_its_failover_plan(admin_client, viewer_client, pool_setup):
    pool = pool_setup["pool"]
    html = admin_client.get(f"/pools/{pool.pk}/").content.decode()
    assert "HA off" in html and f'href="/protection/pools/{pool.pk}/plan/"' in html
    pool.ha_enabled, pool.ha_host_failures_to_tolerate, pool.ha_plan_exists_for = True, 1, 1
    pool.save()
    html = admin_client.get(f"/pools/{pool.pk}/").content.decode()
    assert "HA on" in html
    assert admin_client.get(f"/protection/pools/{pool.pk}/plan/").status_code == 200
    assert "/plan/" not in viewer_client.get(f"/pools/{pool.pk}/").content.decode()


def test_unprotect_button_posts_with_the_pages_csrf_token_and_is_refused_without(admin_user, pool_setup):
    agile = pool_setup["agile"]
    protection = protect(agile)
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    html = client.get(f"/vms/{agile.uuid}/").content.decode()
    token = json.loads(re.search(r"hx-headers='([^']+)'", html).group(1))["X-CSRFToken"]
    assert client.post(f"/protection/{protection.pk}/unprotect/").status_code == 403
    response = client.post(f"/protection/{protection.pk}/unprotect/", HTTP_X_CSRFTOKEN=token)
    assert response.status_code == 302 and "/protection/runs/?ids=" in response["Location"]
    assert Protection.objects.get(pk=protection.pk).status == "unprotecting"


# -- the live push -------------------------------------------------------------------------------------


async def protection_changed(pool, vm):
    """What the protection app sends after committing a change of the VM's protection."""
    await deliver(protection_change(pool=pool.uuid, vm=vm.uuid))


@database_sync_to_async
def set_status(vm, status: str, level: int = 1) -> None:
    Protection.objects.update_or_create(vm=vm, defaults={"pool": vm.pool, "status": status, "level": level})


@pytest.mark.django_db(transaction=True)
def test_a_protection_change_moves_the_vm_between_summary_groups_and_rerenders_its_row(
    admin_user, pool_setup
):
    cookie = session_cookie(admin_user)
    pool, agile = pool_setup["pool"], pool_setup["agile"]
    host = agile.resident_on

    async def scenario():
        communicator, connected = await connect([ORIGIN, cookie])
        assert connected
        await communicator.send_to(text_data=json.dumps({
            "view": "vms", "rows": [agile.uuid],
            "open": ["pvs", "pvs-candidate", "pvs-level1", "pvs-degraded", f"pool-{pool.uuid}", f"host-{host.uuid}"],
        }))
        await set_status(agile, "protected")
        await protection_changed(pool, agile)
        html = await receive_until(communicator, lambda t: 'id="tree-pvs-level1"' in t)  # the row, then labels
        assert 'data-parent="pvs-level1"' in element(html, f"tree-pvsvm-{agile.uuid}")
        assert ">L1<" in element(html, f"tree-vm-{agile.uuid}")
        assert group_count(html, "pvs-level1") == "1" and group_count(html, "pvs-candidate") == "0"
        row = element(html, f"row-vm-{agile.uuid}")
        assert "st-level1" in row and "act-unprotect" in row and 'class="vm-select"' in row

        await set_status(agile, "degraded")
        await protection_changed(pool, agile)
        html = await receive_until(communicator, lambda t: f'id="tree-host-{host.uuid}"' in t)
        assert 'data-parent="pvs-degraded"' in element(html, f"tree-pvsvm-{agile.uuid}")
        assert "A degraded component below" in element(html, f"tree-host-{host.uuid}")
        assert "A degraded component below" in element(html, f"tree-pool-{pool.uuid}")
        assert group_count(html, "pvs-degraded") == "1" and group_count(html, "pvs-level1") == "0"
        await communicator.disconnect()

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_the_vm_page_gets_its_protection_panel_when_the_protection_service_changes_it(
    admin_user, celery_queue, pool_setup
):
    cookie = session_cookie(admin_user)
    agile, shared = pool_setup["agile"], pool_setup["shared"]

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        await communicator.send_to(text_data=json.dumps({"view": f"vm:{agile.uuid}", "open": []}))
        # The real service, whose emit is the one the worker's steps use (no worker here: the run waits).
        run_ = await database_sync_to_async(services.protection_start)(
            vm=agile, level=1, settings={"heartbeat_sr": shared.uuid}, requested_by=admin_user)
        html = await receive_until(communicator, lambda t: f'<section id="vm-{agile.uuid}"' in t)
        panel = element(html, f"vm-{agile.uuid}")
        assert "Protecting" in panel and f"/protection/runs/?ids={run_.pk}" in panel
        assert "act-unprotect" not in panel  # not while a workflow runs

        await set_status(agile, "protected")
        await protection_changed(pool_setup["pool"], agile)
        html = await receive_until(communicator, lambda t: f'<section id="vm-{agile.uuid}"' in t)
        assert "st-level1" in element(html, f"vm-{agile.uuid}")
        await communicator.disconnect()

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_an_operators_socket_gets_rows_and_panels_without_actions(operator_user, pool_setup):
    cookie = session_cookie(operator_user)
    pool, agile = pool_setup["pool"], pool_setup["agile"]
    second = make_vm(pool, host=pool_setup["hosts"][2], name_label="web-2")
    make_disk(second, pool_setup["shared"])

    async def scenario():
        communicator, _ = await connect([ORIGIN, cookie])
        await communicator.send_to(text_data=json.dumps({"view": "vms", "rows": [agile.uuid, second.uuid]}))
        await set_status(agile, "protected")
        await protection_changed(pool, agile)
        await deliver(inventory_change(pool=pool.uuid, cls="vm", uuid=second.uuid))
        html = await receive_until(communicator, lambda t: f'id="row-vm-{second.uuid}"' in t)
        html += await receive_until(communicator, lambda t: f'id="row-vm-{agile.uuid}"' in t) \
            if f'id="row-vm-{agile.uuid}"' not in html else ""
        for vm in (agile, second):
            row = element(html, f"row-vm-{vm.uuid}")
            assert "act-" not in row and "vm-select" not in row
        assert "st-level1" in element(html, f"row-vm-{agile.uuid}")
        await communicator.disconnect()

    run(scenario)


# -- cost of the live reads ----------------------------------------------------------------------------------------


def _subplan_loops(plan: dict) -> list[tuple[str, int]]:
    """(name, how many times it ran) of every subquery PostgreSQL ran per row in an EXPLAIN ANALYZE (JSON) plan."""
    found = []
    if plan.get("Parent Relationship") == "SubPlan":
        found.append((plan.get("Subplan Name", ""), plan["Actual Loops"]))
    for child in plan.get("Plans", []):
        found += _subplan_loops(child)
    return found


def test_placing_vms_runs_the_failed_over_lookup_only_for_failed_over_vms(pool_setup):
    """``vm_annotate_placement`` (the tree's counts per host, read on every live batch of a pool) looks for a
    VM's running copy only when its protection failed over. Looked for first, for every VM, it cost a pool of
    2,500 VMs 0.8 s per read (bench_pools: the shown pool's updates took 0.78 s at idle)."""
    from django.db import connection
    from django.db.models import Count

    from inventory.choices import PowerState
    from protection.selectors import vm_annotate_placement, vm_exclude_stand_ins

    pool, hosts = pool_setup["pool"], pool_setup["hosts"]
    # Running VMs elsewhere: the lookup's alternative, a hash of every running VM, is then too big for work_mem
    # (below), and PostgreSQL runs the lookup per VM, as it did for one pool of twenty at 50,000 VMs.
    other = make_pool()
    other_host = make_host(other)
    VM.objects.bulk_create(VM(pool=other, resident_on=other_host, power_state=PowerState.RUNNING,
                              name_label=f"other-{i:04d}", uuid=f"00000000-0000-4000-8000-{i:012d}",
                              ref=f"OpaqueRef:other-{i}") for i in range(2000))  # fmt: skip
    for i in range(200):
        make_vm(pool, host=hosts[i % 3], name_label=f"plain-{i:03d}")
    # One VM failed over (Level 2): its copy runs on the third host, and the VM is shown there, running.
    moved = make_vm(pool, host=hosts[0], name_label="moved", power_state=PowerState.HALTED)
    copy = make_vm(pool, host=hosts[2], name_label="moved-copy")
    Protection.objects.create(vm=moved, pool=pool, level=2, status="protected", secondary_host=hosts[2],
                              secondary_vm_uuid=copy.uuid, failed_over_to=hosts[2])  # fmt: skip
    qs = vm_annotate_placement(vm_exclude_stand_ins(VM.objects.ordinary().filter(pool_id__in=[pool.pk])))
    shown = dict(qs.values_list("name_label", "shown_host_id"))
    assert shown["moved"] == hosts[2].pk and "moved-copy" not in shown
    assert qs.get(pk=moved.pk).shown_power_state == PowerState.RUNNING
    assert qs.get(pk=pool_setup["agile"].pk).shown_host_id == hosts[1].pk

    counts = qs.values_list("pool_id", "shown_host_id", "shown_power_state").annotate(n=Count("pk")).order_by()
    sql, params = counts.query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE inventory_vm")
        cursor.execute("SET LOCAL work_mem = '64kB'")  # the test's transaction only
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params)
        plan = cursor.fetchone()[0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    loops = _subplan_loops(plan[0]["Plan"])
    # The copy's lookup (EXISTS, then the copy's host) runs for the one VM that failed over, not for the 200 others.
    assert all(n <= 1 for _, n in loops), loops


def test_tree_counts_place_a_failed_over_vm_on_its_copys_host_beside_a_pool_counted_plainly(pool_setup):
    """``pool_overviews`` counts the VMs of pools where no Level 2/3 protection failed over as XAPI places them, and
    applies the placement rules where one did: read together, each pool is counted by its own rule."""
    from console.nodes import pool_overviews
    from inventory.choices import PowerState

    pool, hosts = pool_setup["pool"], pool_setup["hosts"]
    moved = make_vm(pool, host=None, name_label="moved", power_state=PowerState.HALTED)
    copy = make_vm(pool, host=hosts[2], name_label="moved-copy")
    plain_pool = make_pool()
    plain_host = make_host(plain_pool)
    make_vm(plain_pool, host=plain_host, name_label="plain-running")
    make_vm(plain_pool, host=None, name_label="plain-halted", power_state=PowerState.HALTED)

    def counts():
        overviews = pool_overviews([pool.pk, plain_pool.pk])
        return {pk: (ov.pool.vms_total, ov.pool.vms_running, ov.halted.count, [h.vm_count for h in ov.hosts])
                for pk, ov in overviews.items()}

    host_order = [h.pk for h in sorted(hosts, key=lambda h: (h.name_label, h.uuid))]
    before = counts()
    # Not failed over: the copy is an ordinary running VM on the third host, "moved" is halted.
    assert before[plain_pool.pk] == (2, 1, 1, [1])
    assert before[pool.pk][:3] == (4, 3, 1)

    Protection.objects.create(vm=moved, pool=pool, level=2, status="protected", secondary_host=hosts[2],
                              secondary_vm_uuid=copy.uuid, failed_over_to=hosts[2])  # fmt: skip
    after = counts()
    # Failed over: "moved" is shown running on the copy's host, and the copy is left out.
    assert after[pool.pk][:3] == (3, 3, 0)
    per_host = dict(zip(host_order, after[pool.pk][3], strict=True))
    assert per_host == {hosts[0].pk: 1, hosts[1].pk: 1, hosts[2].pk: 1}  # db-local, web-1, moved
    assert after[plain_pool.pk] == before[plain_pool.pk]
