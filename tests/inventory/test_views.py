"""The console's pages (Django test client, real Postgres): access, tree, table, detail pages."""
import re

import pytest

from console.nodes import TREE_PAGE
from console.tree import OPEN_COOKIE
from inventory.choices import ConnectionState, PowerState
from tests.inventory.factories import GiB, make_host, make_pool, make_vm

pytestmark = pytest.mark.django_db


@pytest.fixture
def client_in(client, viewer):
    client.force_login(viewer)
    return client


def section(html: str, dom_id: str) -> str:
    """The detail panel with this id (the tree around it mentions other VMs too)."""
    return re.search(rf'<section id="{dom_id}".*?</section>', html, re.S).group(0)


def ids_in(html: str) -> set[str]:
    return set(re.findall(r'\bid="([^"]+)"', html))


# -- access --------------------------------------------------------------------------------------


NO_UUID = "00000000-0000-0000-0000-000000000000"


PAGES = ["/", "/vms/", f"/vms/{NO_UUID}/", f"/hosts/{NO_UUID}/", "/pools/1/", "/tree/pvs-candidate/"]


@pytest.mark.parametrize("path", PAGES)
def test_anonymous_requests_redirect_to_the_login_page(client, path):
    response = client.get(path)
    assert response.status_code == 302
    assert response["Location"].startswith("/login/?next=")


def test_login_page_signs_a_user_in_and_sends_them_to_the_console(client, viewer, demo):
    page = client.get("/login/")
    assert page.status_code == 200
    assert b'name="username"' in page.content and b'name="password"' in page.content
    response = client.post("/login/", {"username": "viewer", "password": "pw-viewer-1"}, follow=True)
    assert response.status_code == 200
    assert b"Demo pool" in response.content
    bad = client.post("/login/", {"username": "viewer", "password": "wrong"})
    assert bad.status_code == 200 and b"did not match" in bad.content


def test_user_without_the_view_permission_sees_no_pool_and_gets_no_socket(client, django_user_model, demo):
    user = django_user_model.objects.create_user("nobody", password="pw-nobody-1")
    client.force_login(user)
    home = client.get("/")
    assert home.status_code == 200
    assert b"No access to any pool" in home.content
    assert b"Demo pool" not in home.content and b"ws-connect" not in home.content
    for path in ("/vms/", f"/vms/{demo['web'].uuid}/", f"/hosts/{demo['h1'].uuid}/", f"/pools/{demo['pool'].pk}/"):
        response = client.get(path)
        assert response.status_code == 403, path
        assert b"web-01" not in response.content


def test_superuser_sees_everything_without_the_permission(client, django_user_model, demo):
    admin = django_user_model.objects.create_superuser("admin", password="pw-admin-1")
    client.force_login(admin)
    assert b"web-01" in client.get("/vms/").content


# -- layout and tree --------------------------------------------------------------------------------


def test_layout_has_pools_with_connection_state_alert_counter_tree_and_socket(client_in, demo):
    pool = demo["pool"]
    make_pool(name="Far pool", name_label="Far pool", connection_state=ConnectionState.UNREACHABLE)
    html = client_in.get("/").content.decode()
    ids = ids_in(html)
    assert f"hdr-pool-{pool.uuid}" in ids
    assert re.search(r'class="hdr-pool conn-unreachable"[^>]*title="Far pool: Unreachable"', html)
    assert "alerts-counter" in ids and 'class="alerts-count">0<' in html
    assert 'role="tree"' in html and 'ws-connect="/ws/live/"' in html
    # A small pool starts open: hosts, their VMs, and the halted VMs under the pool.
    assert {f"tree-pool-{pool.uuid}", f"tree-host-{demo['h1'].uuid}", f"tree-vm-{demo['web'].uuid}",
            f"tree-vm-{demo['stopped'].uuid}", f"tree-halted-{pool.uuid}"} <= ids  # fmt: skip
    stopped_item = re.search(rf'<li id="tree-vm-{demo["stopped"].uuid}"[^>]*>', html).group(0)
    assert f'data-parent="halted-{pool.uuid}"' in stopped_item
    # Every tree icon has a text alternative; the legend explains them.
    assert 'aria-label="Running"' in html and 'aria-label="Halted"' in html
    assert "Legend" in html and "A degraded component below" in html


def test_protected_vm_summary_groups_vms_by_status(client_in, demo):
    html = client_in.get("/").content.decode()
    for status, label in [("level1", "Protected at Level 1"), ("level2", "Protected at Level 2"),
                          ("level3", "Protected at Level 3"), ("degraded", "Degraded"),
                          ("candidate", "Candidate"), ("unprotected", "Unprotected")]:  # fmt: skip
        assert f'id="tree-pvs-{status}"' in html
        assert label in html
    # web-01 and build-01 have only shared disks (or none): candidates; db-01 has a local disk.
    candidate = re.search(r'id="tree-pvs-candidate".*?class="count[^"]*">(\d+)<', html, re.S).group(1)
    unprotected = re.search(r'id="tree-pvs-unprotected".*?class="count[^"]*">(\d+)<', html, re.S).group(1)
    assert (candidate, unprotected) == ("2", "1")
    children = client_in.get("/tree/pvs-unprotected/").content.decode()
    assert f'id="tree-pvsvm-{demo["db"].uuid}"' in children and "web-01" not in children


def test_failed_and_degraded_components_mark_the_nodes_above_them(client_in, demo):
    demo["pif1"].carrier = False
    demo["pif1"].save()
    html = client_in.get("/").content.decode()
    host1 = re.search(rf'<div id="tree-host-{demo["h1"].uuid}".*?</div>', html, re.S).group(0)
    assert "A degraded component below" in host1
    pool_row = re.search(rf'<div id="tree-pool-{demo["pool"].uuid}".*?</div>', html, re.S).group(0)
    assert "A degraded component below" in pool_row

    demo["h2"].live = False
    demo["h2"].save()
    html = client_in.get("/").content.decode()
    host2 = re.search(rf'<div id="tree-host-{demo["h2"].uuid}".*?</div>', html, re.S).group(0)
    assert 'class="icon host-dead"' in host2 and 'aria-label="Dead"' in host2
    pool_row = re.search(rf'<div id="tree-pool-{demo["pool"].uuid}".*?</div>', html, re.S).group(0)
    assert "A failed component below" in pool_row


def test_a_host_with_many_vms_loads_its_children_on_demand_in_pages(client_in, django_assert_max_num_queries):
    pool = make_pool()
    host = make_host(pool, name_label="big-host")
    for i in range(TREE_PAGE + 30):
        make_vm(pool, host=host, name_label=f"vm-{i:04d}")
    with django_assert_max_num_queries(25):
        html = client_in.get("/").content.decode()
    # A big pool starts folded: no VM item is in the page.
    assert f'id="tree-host-{host.uuid}"' in html and "tree-vm-" not in html
    first = client_in.get(f"/tree/host-{host.uuid}/").content.decode()
    assert first.count('class="ti ti-vm"') == TREE_PAGE
    assert "vm-0000" in first and "Show more (30 left)" in first
    more = re.search(r'data-more="([^"]+)"', first).group(1).replace("&amp;", "&")
    rest = client_in.get(more).content.decode()
    assert rest.count('class="ti ti-vm"') == 30 and "Show more" not in rest
    assert "vm-0229" in rest


def test_open_nodes_from_the_cookie_come_with_the_page(client_in, demo):
    client_in.cookies[OPEN_COOKIE] = f"pool-{demo['pool'].uuid}.host-{demo['h2'].uuid}.garbage;<script>"
    html = client_in.get("/").content.decode()
    assert f'id="tree-vm-{demo["db"].uuid}"' in html  # h2 open
    assert f'id="tree-vm-{demo["web"].uuid}"' not in html  # h1 folded
    assert re.search(rf'id="ti-host-{demo["h1"].uuid}"[^>]*aria-expanded="false"', html)


@pytest.mark.parametrize("path,status", [("/tree/host-not-a-uuid/", 404), ("/tree/nonsense/", 404),
                                         ("/tree/pvs-candidate/?offset=abc", 400),
                                         ("/tree/pvs-candidate/?offset=-5", 400),
                                         ("/tree/host-00000000-0000-0000-0000-000000000000/", 200)])  # fmt: skip
def test_bad_tree_requests_get_a_4xx_not_a_500(client_in, demo, path, status):
    assert client_in.get(path).status_code == status


# -- the Virtual Machine Status table ------------------------------------------------------------------


def row_names(html: str) -> list[str]:
    return re.findall(r'<td class="c-name"><a [^>]*>([^<]+)</a>', html)


def test_vm_table_has_the_original_columns_and_a_row_per_vm(client_in, demo):
    html = client_in.get("/vms/").content.decode()
    for column in ("Status", "Name", "Type", "Power", "Hosts", "Pool", "Level", "Health"):
        assert f">{column}<" in html
    assert row_names(html) == ["build-01", "db-01", "web-01"]
    row = re.search(rf'<tr id="row-vm-{demo["web"].uuid}".*?</tr>', html, re.S).group(0)
    assert "xcp-host-1" in row and "Demo pool" in row and "Running" in row and "Candidate" in row


def test_vm_table_sorts_by_any_column(client_in, demo):
    assert row_names(client_in.get("/vms/?sort=-name").content.decode()) == ["web-01", "db-01", "build-01"]
    by_power = row_names(client_in.get("/vms/?sort=power").content.decode())
    assert by_power[0] == "build-01"  # Halted before Running
    by_status = row_names(client_in.get("/vms/?sort=-status").content.decode())
    assert by_status[0] == "db-01"  # unprotected last in status order, first when reversed
    hosts = row_names(client_in.get("/vms/?sort=hosts").content.decode())
    assert hosts[:2] == ["web-01", "db-01"]
    html = client_in.get("/vms/?sort=name").content.decode()
    assert 'aria-sort="ascending"' in html


def test_vm_table_filters_by_name_power_host_and_status(client_in, demo):
    assert row_names(client_in.get("/vms/?name=WEB").content.decode()) == ["web-01"]
    assert row_names(client_in.get("/vms/?power_state=halted").content.decode()) == ["build-01"]
    assert row_names(client_in.get(f"/vms/?host={demo['h2'].pk}").content.decode()) == ["db-01"]
    assert row_names(client_in.get("/vms/?status=unprotected").content.decode()) == ["db-01"]
    assert row_names(client_in.get("/vms/?status=candidate&power_state=Running").content.decode()) == ["web-01"]


def test_vm_table_paginates(client_in):
    pool = make_pool()
    for i in range(60):
        make_vm(pool, name_label=f"vm-{i:02d}")
    first = client_in.get("/vms/?per_page=25").content.decode()
    assert len(row_names(first)) == 25 and "Page 1 of 3" in first
    third = client_in.get("/vms/?per_page=25&page=3").content.decode()
    assert row_names(third) == [f"vm-{i:02d}" for i in range(50, 60)]


@pytest.mark.parametrize("query", ["page=abc", "page=99999", "page=-1", "sort=evil", "sort=-", "per_page=-1",
                                   "per_page=abc", "host=abc", "host=999999", "power_state=Exploded",
                                   "status=nope", "pool=x", "name=%00", "sort=name;drop"])  # fmt: skip
def test_vm_table_ignores_bad_query_parameters(client_in, demo, query):
    response = client_in.get(f"/vms/?{query}")
    assert response.status_code == 200
    assert len(row_names(response.content.decode())) >= 1


def test_vm_table_says_which_filters_it_ignored(client_in, demo):
    html = client_in.get("/vms/?power_state=Exploded&name=web").content.decode()
    assert "Ignored invalid filter: power_state" in html
    assert row_names(html) == ["web-01"]


def test_vm_table_needs_a_constant_number_of_queries(client_in, django_assert_max_num_queries):
    pool = make_pool()
    hosts = [make_host(pool) for _ in range(3)]
    for i in range(120):
        make_vm(pool, host=hosts[i % 3])
    with django_assert_max_num_queries(25):
        assert client_in.get("/vms/?per_page=100").status_code == 200


# -- detail pages ------------------------------------------------------------------------------------------


def test_vm_page_shows_state_host_memory_vcpus_disks_nics_and_protection(client_in, demo):
    web = demo["web"]
    html = section(client_in.get(f"/vms/{web.uuid}/").content.decode(), f"vm-{web.uuid}")
    assert "xcp-host-1" in html and "8.0\xa0GB" in html and ">4<" in html
    assert "web-01 root" in html and "iSCSI shared storage" in html and "40.0\xa0GB" in html and ">shared<" in html
    assert "Pool-wide network" in html and ">Up<" in html
    assert "Not protected" in html and "candidate for Level 1" in html
    db_html = client_in.get(f"/vms/{demo['db'].uuid}/").content.decode()
    assert ">local<" in db_html and "Local storage" in db_html


def test_vm_page_shows_the_carrier_of_the_hosts_nic_and_why_protection_is_empty(client_in, demo):
    demo["pif1"].carrier = False
    demo["pif1"].save()
    pool = demo["pool"]
    pool.connection_state = ConnectionState.UNREACHABLE
    pool.save()
    html = client_in.get(f"/vms/{demo['web'].uuid}/").content.decode()
    assert ">Down<" in html
    assert "Pool unreachable" in html


def test_host_page_shows_memory_pifs_pbds_and_resident_vms(client_in, demo):
    host = demo["h1"]
    host.memory_total, host.memory_free = 256 * GiB, 64 * GiB
    host.save()
    html = section(client_in.get(f"/hosts/{host.uuid}/").content.decode(), f"host-{host.uuid}")
    assert "192.0\xa0GB used of 256.0\xa0GB (75%)" in html
    assert "eth0" in html and "Pool-wide network" in html and ">Up<" in html
    assert "iSCSI shared storage" in html and ">Attached<" in html
    assert "web-01" in html and "db-01" not in html


def test_pool_page_shows_connection_ha_hosts_and_vm_counts(client_in, demo):
    pool = demo["pool"]
    pool.ha_enabled, pool.ha_host_failures_to_tolerate = True, 1
    pool.save()
    html = section(client_in.get(f"/pools/{pool.pk}/").content.decode(), f"pool-{pool.uuid}")
    assert "Connected" in html and "Enabled" in html
    assert "xcp-host-1" in html and "xcp-host-2" in html and "Master" in html
    assert re.search(r"<span>Not protected</span><b>3</b>", html)
    assert re.search(r"<span>Unprotected</span><b>3</b>", html)


@pytest.mark.parametrize("path", ["/vms/not-a-uuid/", "/vms/00000000-0000-0000-0000-000000000000/",
                                  "/hosts/zzz/", "/pools/999999/", "/vms/%3Cscript%3E/"])  # fmt: skip
def test_unknown_objects_are_404(client_in, demo, path):
    assert client_in.get(path).status_code == 404


def test_pages_refuse_other_methods(client_in, demo):
    assert client_in.post("/vms/").status_code == 405


def test_halted_vm_page_says_it_runs_nowhere(client_in, demo):
    html = client_in.get(f"/vms/{demo['stopped'].uuid}/").content.decode()
    assert "Not running on a host" in html
    assert demo["stopped"].power_state == PowerState.HALTED
