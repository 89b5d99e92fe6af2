"""The inventory REST API (/api/v1/), its OpenAPI schema and its docs, against real Postgres.

Rows are built with the ORM (tests/inventory/factories.py); creating a pool goes
through the real connection test against a running xapisim.
"""

import re
from io import StringIO

import pytest
from django.contrib.auth.models import Group
from django.contrib.staticfiles import finders
from django.core.management import call_command
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from eac.permissions import ADMINISTRATORS, OPERATORS
from inventory import services
from inventory.choices import ConnectionState, PowerState
from inventory.models import VM, Host, Pool
from tests.inventory.factories import (
    GiB,
    make_disk,
    make_host,
    make_network,
    make_nic,
    make_pbd,
    make_pif,
    make_pool,
    make_sr,
    make_vm,
)
from tests.support import free_port

pytestmark = pytest.mark.django_db

LIST_URLS = ["/api/v1/pools/", "/api/v1/hosts/", "/api/v1/vms/", "/api/v1/srs/", "/api/v1/networks/"]


def token_client(user) -> APIClient:
    """A client that authenticates with the user's DRF token, as automation does."""
    token = Token.objects.create(user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def user(django_user_model):
    """A member of Administrators: reads everything, adds, changes and removes pools."""
    admin = django_user_model.objects.create_user("admin", password="correct horse battery")
    admin.groups.add(Group.objects.get(name=ADMINISTRATORS))
    return admin


@pytest.fixture
def api(user):
    return token_client(user)


@pytest.fixture
def operator_api(django_user_model):
    """A member of Operators: reads only."""
    operator = django_user_model.objects.create_user("operator")
    operator.groups.add(Group.objects.get(name=OPERATORS))
    return token_client(operator)


@pytest.fixture
def lab():
    """The pool "Lab": 2 hosts (the second dead), shared + local SR, 2 networks, VMs of every kind; and a
    second pool, unreachable (not the console's ``demo``: the API's filters need the dead and the hidden)."""
    pool = make_pool(
        name="Lab",
        last_error="",
        ha_enabled=True,
        ha_host_failures_to_tolerate=1,
        ha_plan_exists_for=1,
    )
    master = make_host(pool, name_label="xcp-host-1", is_master=True)
    other = make_host(pool, name_label="xcp-host-2", live=False)
    shared = make_sr(pool, name_label="iSCSI shared storage", shared=True)
    local = make_sr(pool, name_label="Local storage xcp-host-1", shared=False, type="ext")
    make_pbd(master, shared)
    make_pbd(other, shared, currently_attached=False)
    make_pbd(master, local)
    lan = make_network(pool, name_label="Pool-wide network associated with eth0")
    storage_net = make_network(pool, name_label="Storage network")
    make_pif(master, lan, device="eth0", management=True)
    make_pif(master, storage_net, device="eth1", carrier=False)
    make_pif(other, lan, device="eth0", carrier=False)

    web = make_vm(pool, host=master, name_label="web-01")
    make_disk(web, shared, userdevice="0", name_label="web-01 root", virtual_size=20 * GiB)
    make_disk(web, local, userdevice="1", name_label="web-01 data", virtual_size=100 * GiB)
    web.vbds.create(pool=pool, uuid="cd-web-01", ref="OpaqueRef:cd-web-01", userdevice="3", type="CD", vdi=None)
    make_nic(web, lan, device="0", mac="aa:bb:cc:00:00:01")
    make_nic(web, storage_net, device="1", mac="aa:bb:cc:00:00:02")

    db = make_vm(pool, name_label="db-01")  # halted
    paused = make_vm(pool, host=master, name_label="WEB-legacy", power_state=PowerState.PAUSED)
    template = make_vm(pool, name_label="Debian 12 template", is_a_template=True)
    dom0 = make_vm(pool, host=master, name_label="Control domain on host: xcp-host-1", is_control_domain=True)
    snapshot = make_vm(pool, name_label="web-01 before upgrade", is_a_snapshot=True, is_a_template=True)

    other_pool = make_pool(name="Other", connection_state=ConnectionState.UNREACHABLE, last_error="timed out")
    stranger = make_vm(other_pool, name_label="web-elsewhere")
    return {
        "pool": pool,
        "master": master,
        "other": other,
        "shared": shared,
        "local": local,
        "lan": lan,
        "web": web,
        "db": db,
        "paused": paused,
        "template": template,
        "dom0": dom0,
        "snapshot": snapshot,
        "other_pool": other_pool,
        "stranger": stranger,
    }


def names(response) -> set[str]:
    assert response.status_code == 200, response.content
    return {row["name"] for row in response.json()["results"]}


# --- authentication ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", [*LIST_URLS, "/api/v1/", "/api/v1/pools/1/", "/api/v1/vms/1/", "/api/schema/", "/api/docs/"]
)
def test_anonymous_is_refused_everywhere_including_schema_and_docs(client, url):
    response = client.get(url)
    assert response.status_code in (401, 403)
    body = response.content.decode()
    for leak in ("results", "openapi", "swagger", "/api/v1/pools/"):
        assert leak not in body.lower()


def test_anonymous_cannot_create_a_pool(client):
    response = client.post("/api/v1/pools/", {"name": "x"}, content_type="application/json")
    assert response.status_code in (401, 403)
    assert not Pool.objects.exists()


def test_token_in_authorization_header_authenticates(api, lab):
    response = api.get("/api/v1/vms/")
    assert response.status_code == 200
    assert response.json()["count"] == 4


def test_unknown_token_is_401(lab):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token 0123456789abcdef0123456789abcdef01234567")
    response = client.get("/api/v1/vms/")
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"


def test_token_made_by_drf_create_token_command_works(user, lab):
    out = StringIO()
    call_command("drf_create_token", user.username, stdout=out)
    key = re.search(r"Generated token (\w+) for user", out.getvalue()).group(1)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert client.get("/api/v1/pools/").status_code == 200


def test_session_login_authenticates_reads(client, user, lab):
    response = client.post("/login/", {"username": "admin", "password": "correct horse battery"})
    assert response.status_code == 302
    assert names(client.get("/api/v1/hosts/")) == {"xcp-host-1", "xcp-host-2"}


def test_operator_reads_but_cannot_add_change_or_remove_pools(operator_api, lab):
    assert names(operator_api.get("/api/v1/pools/")) == {"Lab", "Other"}
    assert operator_api.get(f"/api/v1/vms/{lab['web'].pk}/").status_code == 200
    pool_url = f"/api/v1/pools/{lab['pool'].pk}/"
    payload = {"name": "New", "url": "http://127.0.0.1:9", "username": "root", "password": "x"}
    for response in (
        operator_api.post("/api/v1/pools/", payload, format="json"),
        operator_api.patch(pool_url, {"name": "renamed"}, format="json"),
        operator_api.put(pool_url, payload, format="json"),
        operator_api.delete(pool_url),
    ):
        assert response.status_code == 403
        assert "Administrators" in response.json()["detail"]
    assert sorted(Pool.objects.values_list("name", flat=True)) == ["Lab", "Other"]


def test_user_without_a_role_is_refused(django_user_model, lab):
    nobody = token_client(django_user_model.objects.create_user("nobody"))
    for url in LIST_URLS:
        assert nobody.get(url).status_code == 403


def test_session_write_without_csrf_token_is_refused(user, lab):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    response = client.patch(f"/api/v1/pools/{lab['pool'].pk}/", {"name": "renamed"}, content_type="application/json")
    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]
    assert Pool.objects.get(pk=lab["pool"].pk).name == "Lab"


# --- VMs -----------------------------------------------------------------------------------------


def test_vm_list_leaves_out_templates_control_domains_and_snapshots(api, lab):
    assert names(api.get("/api/v1/vms/")) == {"web-01", "db-01", "WEB-legacy", "web-elsewhere"}


@pytest.mark.parametrize(
    ("query", "extra"),
    [
        ("templates=true", {"Debian 12 template"}),
        ("control_domains=true", {"Control domain on host: xcp-host-1"}),
        ("snapshots=true", set()),  # this snapshot is also a template: both must be asked for
        ("snapshots=true&templates=true", {"Debian 12 template", "web-01 before upgrade"}),
        ("templates=false", set()),
    ],
)
def test_vm_list_includes_hidden_kinds_only_when_asked(api, lab, query, extra):
    assert names(api.get(f"/api/v1/vms/?{query}")) == {"web-01", "db-01", "WEB-legacy", "web-elsewhere"} | extra


def test_vm_filters_by_pool_host_power_state_name_and_uuid(api, lab):
    pool, master = lab["pool"], lab["master"]
    assert names(api.get(f"/api/v1/vms/?pool={pool.pk}")) == {"web-01", "db-01", "WEB-legacy"}
    assert names(api.get(f"/api/v1/vms/?host={master.pk}")) == {"web-01", "WEB-legacy"}
    assert names(api.get(f"/api/v1/vms/?host={master.pk}&control_domains=true")) == {
        "web-01",
        "WEB-legacy",
        "Control domain on host: xcp-host-1",
    }
    assert names(api.get("/api/v1/vms/?power_state=Running")) == {"web-01"}
    assert names(api.get("/api/v1/vms/?power_state=running")) == {"web-01"}  # any case
    assert names(api.get("/api/v1/vms/?power_state=halted")) == {"db-01", "web-elsewhere"}
    assert names(api.get("/api/v1/vms/?name=web")) == {"web-01", "WEB-legacy", "web-elsewhere"}
    assert names(api.get(f"/api/v1/vms/?name=web&pool={pool.pk}&power_state=paused")) == {"WEB-legacy"}
    assert names(api.get(f"/api/v1/vms/?uuid={lab['db'].uuid}")) == {"db-01"}
    assert names(api.get(f"/api/v1/vms/?uuid={lab['template'].uuid}&templates=true")) == {"Debian 12 template"}


def test_vm_list_row_names_its_host(api, lab):
    rows = {row["name"]: row for row in api.get("/api/v1/vms/").json()["results"]}
    master = lab["master"]
    assert rows["web-01"]["host"] == {"id": master.pk, "uuid": master.uuid, "name": "xcp-host-1"}
    assert rows["web-01"]["power_state"] == "Running"
    assert rows["web-01"]["pool"] == lab["pool"].pk
    assert rows["db-01"]["host"] is None


def test_vm_detail_shows_host_disks_with_sr_and_nics_with_network(api, lab):
    web, master = lab["web"], lab["master"]
    response = api.get(f"/api/v1/vms/{web.pk}/")
    assert response.status_code == 200
    body = response.json()
    assert body["uuid"] == web.uuid
    assert body["host"] == {"id": master.pk, "uuid": master.uuid, "name": "xcp-host-1"}
    disks = {disk["userdevice"]: disk for disk in body["disks"]}
    assert set(disks) == {"0", "1", "3"}
    assert disks["0"]["vdi"]["name"] == "web-01 root"
    assert disks["0"]["vdi"]["virtual_size"] == 20 * GiB
    assert disks["0"]["vdi"]["sr"] == {
        "id": lab["shared"].pk,
        "uuid": lab["shared"].uuid,
        "name": "iSCSI shared storage",
        "shared": True,
    }
    assert disks["1"]["vdi"]["sr"]["name"] == "Local storage xcp-host-1"
    assert disks["1"]["vdi"]["sr"]["shared"] is False
    assert disks["1"]["vdi"]["virtual_size"] == 100 * GiB
    assert disks["3"]["type"] == "CD"
    assert disks["3"]["vdi"] is None  # an empty CD drive
    nics = {nic["device"]: nic for nic in body["nics"]}
    assert nics["0"]["mac"] == "aa:bb:cc:00:00:01"
    assert nics["0"]["network"]["name"] == "Pool-wide network associated with eth0"
    assert nics["1"]["network"]["name"] == "Storage network"


def test_vm_detail_of_a_template_is_reachable_by_id(api, lab):
    # The default filter hides templates from lists; a direct link still works.
    response = api.get(f"/api/v1/vms/{lab['template'].pk}/")
    assert response.status_code == 200
    assert response.json()["is_a_template"] is True


def test_vm_list_page_of_100_costs_a_constant_number_of_queries(api, lab, django_assert_max_num_queries):
    pool, master = lab["pool"], lab["master"]
    VM.objects.bulk_create(
        VM(pool=pool, uuid=f"bulk-{i}", ref=f"OpaqueRef:bulk-{i}", name_label=f"bulk-{i:03}", resident_on=master)
        for i in range(120)
    )
    # token lookup, the user's groups, filter validation of pool, count, page
    with django_assert_max_num_queries(5):
        response = api.get(f"/api/v1/vms/?pool={pool.pk}")
    rows = response.json()["results"]
    assert len(rows) == 100
    assert sum(row["host"] is not None and row["host"]["name"] == "xcp-host-1" for row in rows) >= 99


def test_vm_detail_costs_a_constant_number_of_queries(api, lab, django_assert_max_num_queries):
    web, lan, shared = lab["web"], lab["lan"], lab["shared"]
    for n in range(4, 12):
        make_disk(web, shared, userdevice=str(n))
        make_nic(web, lan, device=str(n))
    # token, the user's groups, VM with host and affinity, disks with VDI and SR, NICs with network
    with django_assert_max_num_queries(5):
        response = api.get(f"/api/v1/vms/{web.pk}/")
    assert len(response.json()["disks"]) == 11
    assert len(response.json()["nics"]) == 10


# --- hosts, SRs, networks ------------------------------------------------------------------------


def test_host_filters_by_pool_and_live(api, lab):
    extra = make_host(lab["other_pool"], name_label="far-host")
    assert names(api.get("/api/v1/hosts/")) == {"xcp-host-1", "xcp-host-2", "far-host"}
    assert names(api.get(f"/api/v1/hosts/?pool={lab['pool'].pk}")) == {"xcp-host-1", "xcp-host-2"}
    assert names(api.get("/api/v1/hosts/?live=true")) == {"xcp-host-1", "far-host"}
    assert names(api.get(f"/api/v1/hosts/?live=false&pool={lab['pool'].pk}")) == {"xcp-host-2"}
    assert names(api.get(f"/api/v1/hosts/?uuid={extra.uuid}")) == {"far-host"}


def test_host_detail_shows_pifs_with_carrier_and_pbds(api, lab):
    master = lab["master"]
    body = api.get(f"/api/v1/hosts/{master.pk}/").json()
    assert body["is_master"] is True
    assert body["live"] is True
    pifs = {pif["device"]: pif for pif in body["pifs"]}
    assert pifs["eth0"]["carrier"] is True
    assert pifs["eth0"]["management"] is True
    assert pifs["eth0"]["network"]["name"] == "Pool-wide network associated with eth0"
    assert pifs["eth1"]["carrier"] is False
    pbds = {pbd["sr"]["name"]: pbd for pbd in body["pbds"]}
    assert set(pbds) == {"iSCSI shared storage", "Local storage xcp-host-1"}
    assert pbds["iSCSI shared storage"]["currently_attached"] is True
    assert pbds["iSCSI shared storage"]["sr"]["shared"] is True


def test_sr_list_filters_and_detail_shows_attachments(api, lab):
    assert names(api.get("/api/v1/srs/?shared=true")) == {"iSCSI shared storage"}
    assert names(api.get("/api/v1/srs/?shared=false")) == {"Local storage xcp-host-1"}
    body = api.get(f"/api/v1/srs/{lab['shared'].pk}/").json()
    attached = {pbd["host"]["name"]: pbd["currently_attached"] for pbd in body["pbds"]}
    assert attached == {"xcp-host-1": True, "xcp-host-2": False}


def test_network_list_and_detail_shows_pifs(api, lab):
    assert names(api.get(f"/api/v1/networks/?pool={lab['pool'].pk}")) == {
        "Pool-wide network associated with eth0",
        "Storage network",
    }
    assert names(api.get("/api/v1/networks/?name=storage")) == {"Storage network"}
    body = api.get(f"/api/v1/networks/{lab['lan'].pk}/").json()
    assert {(pif["host"]["name"], pif["carrier"]) for pif in body["pifs"]} == {
        ("xcp-host-1", True),
        ("xcp-host-2", False),
    }


# --- pools (read, update, delete) ----------------------------------------------------------------


def test_pool_list_shows_connection_ha_and_counts_never_the_password(api, lab):
    response = api.get("/api/v1/pools/")
    assert b"secret" not in response.content
    rows = {row["name"]: row for row in response.json()["results"]}
    lab = rows["Lab"]
    assert "password" not in lab
    assert lab["connection_state"] == "connected"
    assert lab["ha_enabled"] is True
    assert lab["ha_host_failures_to_tolerate"] == 1
    assert lab["ha_plan_exists_for"] == 1
    assert lab["host_count"] == 2
    assert lab["vm_count"] == 3  # web-01, db-01, WEB-legacy: no template, dom0 or snapshot
    other = rows["Other"]
    assert other["connection_state"] == "unreachable"
    assert other["last_error"] == "timed out"
    assert other["host_count"] == 0
    assert other["vm_count"] == 1
    assert "last_event_at" in other


def test_pool_detail_never_returns_the_password(api, lab):
    response = api.get(f"/api/v1/pools/{lab['pool'].pk}/")
    assert response.status_code == 200
    assert "password" not in response.json()
    assert b"secret" not in response.content


def test_pool_filters_by_connection_state(api, lab):
    assert names(api.get("/api/v1/pools/?connection_state=unreachable")) == {"Other"}


def test_pool_rename_keeps_the_stored_password(api, lab):
    pool = lab["pool"]
    response = api.patch(f"/api/v1/pools/{pool.pk}/", {"name": "Lab A"}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["name"] == "Lab A"
    assert response.json()["host_count"] == 2
    assert "password" not in response.json()
    pool.refresh_from_db()
    assert (pool.name, pool.password) == ("Lab A", "secret")


def test_pool_put_without_password_keeps_the_stored_one(api, lab):
    pool = lab["pool"]
    payload = {"name": "Lab B", "url": pool.url, "username": pool.username, "verify_tls": pool.verify_tls}
    response = api.put(f"/api/v1/pools/{pool.pk}/", payload, format="json")
    assert response.status_code == 200, response.content
    pool.refresh_from_db()
    assert (pool.name, pool.password) == ("Lab B", "secret")


def test_pool_update_to_a_name_in_use_is_400(api, lab):
    response = api.patch(f"/api/v1/pools/{lab['pool'].pk}/", {"name": "Other"}, format="json")
    assert response.status_code == 400
    assert "name" in response.json()


def test_pool_delete_is_accepted_and_a_worker_removes_it_and_its_inventory(api, lab):
    pool = lab["pool"]
    response = api.delete(f"/api/v1/pools/{pool.pk}/")
    assert response.status_code == 202
    assert response.json()["removing_since"]
    assert Pool.objects.filter(pk=pool.pk).exists()  # until the worker's turn (tests/inventory/test_pool_removal.py)
    services.pool_remove_rows(pool_id=pool.pk, watcher_wait=0)
    assert not Pool.objects.filter(pk=pool.pk).exists()
    assert not Host.objects.filter(pool_id=pool.pk).exists()
    assert not VM.objects.filter(pool_id=pool.pk).exists()
    assert api.get(f"/api/v1/pools/{pool.pk}/").status_code == 404


# --- pools (create, with the connection test against xapisim) ------------------------------------


def test_pool_create_tests_the_connection_and_never_returns_the_password(api, xapisim):
    payload = {"name": "Simulated", "url": xapisim.url, "username": "root", "password": "demo", "verify_tls": False}
    response = api.post("/api/v1/pools/", payload, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert "password" not in body
    assert b'"demo"' not in response.content
    assert body["name"] == "Simulated"
    assert body["name_label"] == "Demo pool"  # read from the simulator by the connection test
    assert body["uuid"] == xapisim.state()["pool"]["uuid"]
    assert body["host_count"] == 0  # the watcher fills the inventory, not the request
    pool = Pool.objects.get(pk=body["id"])
    assert pool.password == "demo"
    assert api.get(f"/api/v1/pools/{pool.pk}/").json()["url"] == xapisim.url


def test_pool_create_on_a_pool_member_follows_it_to_the_master(api, xapisim):
    member = xapisim.host_url("127.0.0.2")  # xcp-host-2 answers HOST_IS_SLAVE
    payload = {"name": "Via member", "url": member, "username": "root", "password": "demo"}
    response = api.post("/api/v1/pools/", payload, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["master_url"] == xapisim.url

    again = api.post("/api/v1/pools/", {**payload, "name": "Twice", "url": xapisim.url}, format="json")
    assert again.status_code == 400
    assert "already registered" in again.json()["url"][0]


def test_pool_create_with_wrong_password_is_400_with_a_clear_message(api, xapisim):
    payload = {"name": "Demo", "url": xapisim.url, "username": "root", "password": "not-the-password"}
    response = api.post("/api/v1/pools/", payload, format="json")
    assert response.status_code == 400
    message = response.json()["password"][0]
    assert "could not log in" in message.lower()
    assert "not-the-password" not in response.content.decode()
    assert not Pool.objects.exists()


def test_pool_password_change_is_tested_and_refused_when_wrong(api, xapisim):
    pool = api.post(
        "/api/v1/pools/", {"name": "Sim", "url": xapisim.url, "username": "root", "password": "demo"}, format="json"
    ).json()
    response = api.patch(f"/api/v1/pools/{pool['id']}/", {"password": "wrong"}, format="json")
    assert response.status_code == 400
    assert "could not log in" in response.json()["password"][0].lower()
    assert Pool.objects.get(pk=pool["id"]).password == "demo"


def test_pool_create_with_unreachable_url_is_400(api):
    port = free_port()
    payload = {"name": "Nowhere", "url": f"http://127.0.0.1:{port}", "username": "root", "password": "x"}
    response = api.post("/api/v1/pools/", payload, format="json")
    assert response.status_code == 400
    message = response.json()["url"][0]
    assert f"127.0.0.1:{port}" in message
    assert "could not connect" in message.lower()
    assert not Pool.objects.exists()


def test_pool_create_with_invalid_fields_is_400_with_field_errors(api, lab):
    response = api.post("/api/v1/pools/", {"name": "Lab", "url": "not a url", "verify_tls": "perhaps"}, format="json")
    assert response.status_code == 400
    errors = response.json()
    assert set(errors) >= {"name", "url", "username", "password", "verify_tls"}
    assert Pool.objects.count() == 2


def test_pool_create_with_a_non_json_body_is_400(api):
    response = api.generic("POST", "/api/v1/pools/", "{not json", content_type="application/json")
    assert response.status_code == 400


# --- bad input: 400 / 404, never 500 -------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("/api/v1/vms/?power_state=bogus", "power_state"),
        ("/api/v1/vms/?pool=abc", "pool"),
        ("/api/v1/vms/?pool=999999", "pool"),
        ("/api/v1/vms/?host=1.5", "host"),
        ("/api/v1/vms/?templates=perhaps", "templates"),
        ("/api/v1/hosts/?live=maybe", "live"),
        ("/api/v1/hosts/?pool=-1", "pool"),
        ("/api/v1/srs/?shared=2", "shared"),
        ("/api/v1/networks/?pool=%00", "pool"),
        ("/api/v1/vms/?uuid=%00", "uuid"),
        ("/api/v1/hosts/?name=a%00b", "name"),
        ("/api/v1/pools/?connection_state=dancing", "connection_state"),
    ],
)
def test_bad_filter_value_is_400_naming_the_filter(api, lab, url, field):
    response = api.get(url)
    assert response.status_code == 400
    assert field in response.json()


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/vms/?page=999",
        "/api/v1/vms/?page=abc",
        "/api/v1/vms/999999/",
        "/api/v1/vms/abc/",
        "/api/v1/hosts/999999/",
        "/api/v1/srs/0/",
        "/api/v1/networks/-1/",
        "/api/v1/pools/999999/",
    ],
)
def test_unknown_object_or_page_is_404(api, lab, url):
    response = api.get(url)
    assert response.status_code == 404
    assert "detail" in response.json()


def test_inventory_mirrors_are_read_only(api, lab):
    assert api.post("/api/v1/vms/", {"name": "x"}, format="json").status_code == 405
    assert api.delete(f"/api/v1/hosts/{lab['master'].pk}/").status_code == 405
    assert Host.objects.filter(pk=lab["master"].pk).exists()


# --- schema and docs -----------------------------------------------------------------------------


def test_openapi_schema_validates_without_warnings(tmp_path):
    # The management command the CI runs; --fail-on-warn turns any drf-spectacular warning into an error.
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))
    schema = (tmp_path / "schema.yaml").read_text()
    for path in ("/api/v1/pools/", "/api/v1/hosts/", "/api/v1/vms/{id}/", "/api/v1/srs/", "/api/v1/networks/"):
        assert f"{path}:" in schema


def test_schema_is_served_to_a_logged_in_user(api):
    response = api.get("/api/schema/?format=json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    vm_list = schema["paths"]["/api/v1/vms/"]["get"]
    params = {param["name"] for param in vm_list["parameters"]}
    assert params >= {"pool", "host", "power_state", "name", "uuid", "templates", "control_domains", "snapshots"}
    pool_props = schema["components"]["schemas"]["Pool"]["properties"]
    assert pool_props["password"]["writeOnly"] is True


def test_docs_page_uses_only_local_static_files(client, user):
    client.force_login(user)
    response = client.get("/api/docs/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "swagger-ui" in html
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert len(assets) >= 3  # stylesheet, bundle, standalone preset
    # Swagger UI's start-up script comes from the docs' own URL (no inline script under the CSP).
    assert "/api/docs/?script=" in assets
    assert client.get("/api/docs/?script=")["Content-Type"].startswith("application/javascript")
    for url in assets:
        if url == "/api/docs/?script=":
            continue
        assert url.startswith("/static/"), url
        assert finders.find(url.removeprefix("/static/")), f"{url} is not a file the app serves"


def test_browsable_api_renders_the_filter_form_for_a_logged_in_user(client, user, lab):
    # The same FilterSets drive this HTML form (and the UI's): it must render, with the values given.
    client.force_login(user)
    response = client.get("/api/v1/vms/?power_state=running&templates=true&name=web", HTTP_ACCEPT="text/html")
    assert response.status_code == 200
    html = response.content.decode()
    assert "web-01" in html
    assert 'name="power_state"' in html and 'name="templates"' in html
