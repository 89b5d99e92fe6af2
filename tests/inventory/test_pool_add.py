"""Registering a pool: the services, ``manage.py pool_add`` and the admin form, against a live xapisim."""
import subprocess
import sys

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.db import connection
from django.urls import reverse

from inventory.models import Pool
from inventory.services import pool_create, pool_update
from tests.support import ROOT, free_port, start_sim, subprocess_env

pytestmark = pytest.mark.django_db(transaction=True)


def stored_password(pool: Pool) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT password FROM inventory_pool WHERE id = %s", [pool.pk])
        return cursor.fetchone()[0]


# -- services ------------------------------------------------------------------------------------


def test_pool_create_tests_the_connection_and_stores_the_pool_identity(xapisim):
    pool = pool_create(name="demo", url=xapisim.url, username="root", password="demo")

    sim_pool = xapisim.state()["pool"]
    pool.refresh_from_db()
    assert pool.uuid == sim_pool["uuid"]
    assert pool.name_label == sim_pool["name"] == "Demo pool"
    assert pool.master_url == xapisim.url
    assert pool.password == "demo"
    # Encrypted at rest: the column never holds the password itself.
    raw = stored_password(pool)
    assert raw and "demo" not in raw


def test_pool_create_with_wrong_password_says_so_and_saves_nothing(xapisim):
    with pytest.raises(ValidationError) as err:
        pool_create(name="demo", url=xapisim.url, username="root", password="not-the-password")
    assert "refused the user name or password" in str(err.value.message_dict["password"])
    assert "not-the-password" not in str(err.value)
    assert not Pool.objects.exists()


def test_pool_create_unreachable_says_nothing_answers():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ValidationError) as err:
        pool_create(name="nowhere", url=url, username="root", password="demo")
    message = " ".join(err.value.message_dict["url"])
    assert "Nothing answers at" in message and "connection refused" in message
    assert not Pool.objects.exists()


def test_pool_create_given_a_slave_follows_to_the_master(xapisim):
    pool = pool_create(name="demo", url=xapisim.host_url("127.0.0.3"), username="root", password="demo")
    assert pool.url == xapisim.host_url("127.0.0.3")
    assert pool.master_url == xapisim.url  # xcp-host-1 on 127.0.0.1, same scheme and port


def test_pool_create_refuses_the_same_pool_twice(xapisim):
    pool_create(name="demo", url=xapisim.url, username="root", password="demo")
    with pytest.raises(ValidationError) as err:
        pool_create(name="again", url=xapisim.host_url("127.0.0.2"), username="root", password="demo")
    assert "already registered, as 'demo'" in " ".join(err.value.message_dict["url"])
    with pytest.raises(ValidationError) as err:
        pool_create(name="demo", url=xapisim.url, username="root", password="demo")
    assert "exists already" in " ".join(err.value.message_dict["name"])
    assert Pool.objects.count() == 1


@pytest.mark.parametrize(
    "url, message",
    [
        ("ftp://127.0.0.1", "not a valid http:// or https:// URL"),
        ("http://root:demo@127.0.0.1", "in their own fields"),
        ("http://127.0.0.1/some/path", "without a path"),
        ("", "Give the URL"),
    ],
)
def test_pool_create_rejects_bad_urls_before_connecting(url, message):
    with pytest.raises(ValidationError) as err:
        pool_create(name="x", url=url, username="root", password="demo")
    assert message in " ".join(err.value.message_dict["url"])
    assert "demo" not in str(err.value)


def test_pool_update_keeps_the_password_when_none_given_and_tests_a_new_one(xapisim):
    pool = pool_create(name="demo", url=xapisim.url, username="root", password="demo")
    pool_update(pool=pool, name="renamed", password="")
    pool.refresh_from_db()
    assert (pool.name, pool.password) == ("renamed", "demo")

    with pytest.raises(ValidationError) as err:
        pool_update(pool=pool, password="wrong-one")
    assert "refused" in " ".join(err.value.message_dict["password"])
    pool.refresh_from_db()
    assert pool.password == "demo"

    pool_update(pool=pool, url=xapisim.host_url("127.0.0.2"))
    pool.refresh_from_db()
    assert pool.url == xapisim.host_url("127.0.0.2")
    assert pool.master_url == xapisim.url


# -- manage.py pool_add --------------------------------------------------------------------------


def test_pool_add_registers_a_pool_with_the_password_from_the_environment(xapisim, monkeypatch, capsys):
    monkeypatch.setenv("EAC_POOL_PASSWORD", "demo")
    call_command("pool_add", "demo", "--url", xapisim.url, "--user", "root")
    pool = Pool.objects.get(name="demo")
    assert pool.uuid == xapisim.state()["pool"]["uuid"]
    out = capsys.readouterr().out
    # The name given is the pool's name; XAPI's own is said beside it, because it differs.
    assert f"Added pool 'demo' (XAPI name 'Demo pool', uuid {pool.uuid}), master at {xapisim.url}." in out


def test_pool_add_says_xapis_name_only_when_it_differs_from_the_name_given(xapisim, monkeypatch, capsys):
    monkeypatch.setenv("EAC_POOL_PASSWORD", "demo")
    call_command("pool_add", "Demo pool", "--url", xapisim.url, "--user", "root")
    pool = Pool.objects.get(name="Demo pool")
    out = capsys.readouterr().out
    assert f"Added pool 'Demo pool' (uuid {pool.uuid}), master at {xapisim.url}." in out
    assert "XAPI" not in out


def test_pool_add_asks_for_the_password_when_the_environment_has_none(xapisim, monkeypatch):
    monkeypatch.delenv("EAC_POOL_PASSWORD", raising=False)
    prompts = []
    monkeypatch.setattr("getpass.getpass", lambda prompt: prompts.append(prompt) or "demo")
    call_command("pool_add", "demo", "--url", xapisim.url, "--user", "root")
    assert prompts and "root" in prompts[0]
    assert Pool.objects.filter(name="demo").exists()


def test_pool_add_with_wrong_password_fails_clearly(xapisim, monkeypatch):
    monkeypatch.setenv("EAC_POOL_PASSWORD", "nope-secret")
    with pytest.raises(CommandError) as err:
        call_command("pool_add", "demo", "--url", xapisim.url, "--user", "root")
    assert "refused the user name or password" in str(err.value)
    assert "nope-secret" not in str(err.value)
    assert not Pool.objects.exists()


def test_pool_add_unreachable_fails_clearly(monkeypatch):
    monkeypatch.setenv("EAC_POOL_PASSWORD", "demo")
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(CommandError) as err:
        call_command("pool_add", "nowhere", "--url", url, "--user", "root")
    assert f"Nothing answers at {url} (connection refused)" in str(err.value)
    assert not Pool.objects.exists()


def test_pool_add_given_a_slave_registers_its_master(xapisim, monkeypatch):
    monkeypatch.setenv("EAC_POOL_PASSWORD", "demo")
    call_command("pool_add", "demo", "--url", xapisim.host_url("127.0.0.4"), "--user", "root")
    assert Pool.objects.get(name="demo").master_url == xapisim.url


def test_pool_add_command_exits_non_zero_without_traceback(xapisim):
    env = subprocess_env(EAC_POOL_PASSWORD="wrong-secret")
    proc = subprocess.run(
        [sys.executable, "manage.py", "pool_add", "demo", "--url", xapisim.url, "--user", "root"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert "refused the user name or password" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "wrong-secret" not in proc.stderr + proc.stdout


# -- the admin -----------------------------------------------------------------------------------

SECRET = "Pw-7f3k-secret"


@pytest.fixture
def secret_sim():
    """A simulator whose password appears nowhere else, so that finding it in a page means a leak."""
    sim = start_sim(password=SECRET)
    yield sim
    sim.stop()


@pytest.fixture
def superuser_client(client, django_user_model):
    """Logged in to the Django admin: pytest-django's ``admin_client``, whose ``admin_user`` tests/conftest.py
    replaces with a member of the console's Administrators group."""
    client.force_login(django_user_model.objects.create_superuser("admin", "admin@example.com", "password"))
    return client


def test_admin_adds_a_pool_after_testing_it_and_never_shows_the_password(secret_sim, superuser_client):
    xapisim = secret_sim
    add_url = reverse("admin:inventory_pool_add")
    form = {"name": "lab", "url": xapisim.url, "username": "root", "password": "bad-secret", "verify_tls": "on"}
    response = superuser_client.post(add_url, form)
    assert response.status_code == 200  # the form again, with the error
    page = response.content.decode()
    assert "refused the user name or password" in page
    assert "bad-secret" not in page
    assert not Pool.objects.exists()

    response = superuser_client.post(add_url, {**form, "password": SECRET})
    assert response.status_code == 302
    pool = Pool.objects.get(name="lab")
    assert pool.master_url == xapisim.url

    change_url = reverse("admin:inventory_pool_change", args=[pool.pk])
    page = superuser_client.get(change_url).content.decode()
    assert 'name="password"' in page and SECRET not in page
    assert pool.uuid in page
    assert SECRET not in superuser_client.get(reverse("admin:inventory_pool_changelist")).content.decode()

    # Left empty, the password field keeps the stored password.
    response = superuser_client.post(change_url, {**form, "name": "lab2", "password": ""})
    assert response.status_code == 302
    pool.refresh_from_db()
    assert (pool.name, pool.password) == ("lab2", SECRET)

    # A wrong new password is refused on edit too, and the stored one stays.
    response = superuser_client.post(change_url, {**form, "password": "another-bad"})
    assert response.status_code == 200 and "refused the user name or password" in response.content.decode()
    pool.refresh_from_db()
    assert pool.password == SECRET
