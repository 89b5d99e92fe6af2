"""One rule for pages, the API and sockets (eac.permissions), and bad form input refused with a 400."""
import pytest
from django.contrib.auth.models import Group, Permission
from django.test import Client

from alerts.models import Recipient
from eac.permissions import ADMINISTRATORS
from protection.models import Protection
from tests.inventory.factories import make_pool, make_vm

pytestmark = pytest.mark.django_db


def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def viewer(django_user_model):
    """May see the inventory (the permission given directly), in neither console group."""
    user = django_user_model.objects.create_user("vera-viewer", password="pw-vera-1")
    user.user_permissions.add(Permission.objects.get(codename="view_pool", content_type__app_label="inventory"))
    return user


@pytest.fixture
def administrator(django_user_model):
    user = django_user_model.objects.create_user("ada-admin", password="pw-ada-1")
    user.groups.add(Group.objects.get(name=ADMINISTRATORS))
    return user


def test_a_user_who_may_see_the_inventory_sees_it_in_the_pages_and_the_api_alike(viewer, django_user_model):
    vm = make_vm(make_pool(), name_label="web-1")
    client = signed_in(viewer)
    assert client.get("/vms/").status_code == 200
    assert client.get(f"/vms/{vm.uuid}/").status_code == 200
    listed = client.get("/api/v1/vms/")
    assert listed.status_code == 200 and [row["uuid"] for row in listed.json()["results"]] == [vm.uuid]
    # ... but protection and alerts stay for the console's two groups, in both places.
    assert client.get("/protection/").status_code == 403
    assert client.get("/api/v1/protections/").status_code == 403
    # Negative control: without the permission, neither the pages nor the API show the inventory.
    nobody = signed_in(django_user_model.objects.create_user("nadia", password="pw-nadia-1"))
    assert nobody.get("/vms/").status_code == 403
    assert nobody.get("/api/v1/vms/").status_code == 403


@pytest.mark.parametrize("post", [
    {"action": "update", "pk": "abc", "conditions": ["host_lost"]},
    {"action": "delete", "pk": "99999999999999999999"},
    {"action": "delete"},
    {"action": "explode"},
    {"action": "add", "email": "ops@example.org", "conditions": ["no_such_condition"]},
])
def test_recipients_page_refuses_bad_input_with_a_400_and_changes_nothing(administrator, post):
    Recipient.objects.create(email="keep@example.org", conditions=["host_lost"])
    response = signed_in(administrator).post("/alerts/recipients/", post)
    assert response.status_code == 400
    assert list(Recipient.objects.values_list("email", flat=True)) == ["keep@example.org"]


def test_wizard_refuses_settings_out_of_bounds_with_a_400_that_names_the_field(administrator):
    vm = make_vm(make_pool(), name_label="db-1")
    response = signed_in(administrator).post("/protection/protect/", {"vm": vm.uuid, "level": "1", "order": "-3",
                                                                       "start_delay": "not a number"})
    assert response.status_code == 400
    page = response.content.decode()
    assert "Order" in page and "Start delay" in page
    assert not Protection.objects.filter(vm=vm).exists()
