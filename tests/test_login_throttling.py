"""Failed logins are throttled (django-axes): per user name and address, visible to administrators in the admin."""
from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from axes.models import AccessAttempt
from django.conf import settings
from django.contrib.auth import SESSION_KEY
from django.http import HttpRequest
from django.test import AsyncClient, Client

from tests.roles import role_user

pytestmark = pytest.mark.django_db

LIMIT = settings.AXES_FAILURE_LIMIT


def sign_in(client: Client, username: str, password: str, **extra):
    return client.post("/login/", {"username": username, "password": password}, **extra)


def locked_out(response) -> bool:
    return response.status_code == 429 and 'id="locked-out"' in response.content.decode()


@pytest.fixture
def viewer():
    return role_user("vic-viewer", viewer=True)


def test_the_nth_failed_login_locks_the_user_out_even_with_the_right_password_then(viewer):
    client = Client()
    for _ in range(LIMIT - 1):
        response = sign_in(client, "vic-viewer", "wrong")
        assert response.status_code == 200 and "did not match" in response.content.decode()
    response = sign_in(client, "vic-viewer", "wrong")
    assert locked_out(response)
    page = response.content.decode()
    minutes = int(settings.AXES_COOLOFF_TIME.total_seconds() // 60)
    assert "Too many failed sign-ins for vic-viewer" in page and f"locked for {minutes} minutes" in page

    response = sign_in(client, "vic-viewer", "pw-vic-viewer")
    assert locked_out(response)
    assert SESSION_KEY not in client.session
    assert client.get("/vms/")["Location"].startswith("/login/")


def test_the_lock_out_is_for_that_user_name_from_that_address_only(viewer):
    role_user("olga-operator", viewer=True)
    for _ in range(LIMIT):
        sign_in(Client(), "vic-viewer", "wrong")
    assert locked_out(sign_in(Client(), "vic-viewer", "pw-vic-viewer"))
    # Negative controls: another user from the same address, the same user from another one.
    assert sign_in(Client(), "olga-operator", "pw-olga-operator").status_code == 302
    assert sign_in(Client(), "vic-viewer", "pw-vic-viewer", REMOTE_ADDR="192.0.2.7").status_code == 302


def test_fewer_failures_than_the_limit_are_forgotten_on_a_successful_login(viewer):
    client = Client()
    for _ in range(LIMIT - 1):
        sign_in(client, "vic-viewer", "wrong")
    assert sign_in(client, "vic-viewer", "pw-vic-viewer").status_code == 302
    for _ in range(LIMIT - 1):
        sign_in(Client(), "vic-viewer", "wrong")
    assert sign_in(Client(), "vic-viewer", "pw-vic-viewer").status_code == 302


def test_the_lock_out_page_is_served_through_asgi_too(viewer):
    """daphne runs the middleware chain asynchronously: Axes' async path must give the same page."""

    async def attempts():
        client = AsyncClient()
        for _ in range(LIMIT - 1):
            await client.post("/login/", {"username": "vic-viewer", "password": "wrong"})
        return await client.post("/login/", {"username": "vic-viewer", "password": "wrong"})

    response = async_to_sync(attempts)()
    assert locked_out(response)
    assert "Too many failed sign-ins for vic-viewer" in response.content.decode()


def test_an_administrator_sees_the_attempts_in_the_admin_and_can_lift_the_lock_out(viewer, django_user_model):
    for _ in range(LIMIT):
        sign_in(Client(), "vic-viewer", "wrong")
    admin = Client()
    admin.force_login(django_user_model.objects.create_superuser("sue-super", password="pw-sue-super"))
    listing = admin.get("/admin/axes/accessattempt/")
    assert listing.status_code == 200
    page = listing.content.decode()
    assert "vic-viewer" in page and "127.0.0.1" in page
    attempt = AccessAttempt.objects.get(username="vic-viewer")
    assert attempt.failures_since_start == LIMIT

    response = admin.post(f"/admin/axes/accessattempt/{attempt.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert sign_in(Client(), "vic-viewer", "pw-vic-viewer").status_code == 302


def test_tests_that_call_client_login_pass_a_request_as_axes_requires(viewer):
    """Django's ``client.login()`` authenticates without a request, which Axes refuses (it keys on the
    address): such a test passes one. (The suite signs in with ``force_login`` or the login page.)"""
    client = Client()
    with pytest.raises(ValueError, match="requires a request"):
        client.login(username="vic-viewer", password="pw-vic-viewer")
    assert client.login(request=HttpRequest(), username="vic-viewer", password="pw-vic-viewer")
    assert client.get("/vms/").status_code == 200
