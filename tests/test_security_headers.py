"""Every page carries a Content-Security-Policy that it satisfies, and the cookies are what check --deploy wants.

The policy allows scripts, styles and connections from the console's own origin only (plus the WebSocket
origin of the host), so the pages must hold no inline script, style or event handler: checked here on the
HTML of each page as served. (tests/test_csp_browser.py loads them in Chromium and listens for violations.)
"""
from __future__ import annotations

import re

import pytest
from django.conf import settings
from django.test import Client

from alerts.models import Alert
from eac.permissions import ADMINISTRATORS
from protection.models import WorkflowRun
from tests.inventory.factories import make_disk, make_host, make_pbd, make_pool, make_sr, make_vm
from tests.roles import role_user

pytestmark = pytest.mark.django_db

POLICY = {
    "default-src": ["'self'"],
    "script-src": ["'self'"],
    "style-src": ["'self'"],
    "img-src": ["'self'", "data:"],
    "connect-src": ["'self'", "ws://testserver"],
    "object-src": ["'none'"],
    "base-uri": ["'self'"],
    "form-action": ["'self'"],
    "frame-ancestors": ["'none'"],
}
INLINE = {
    "inline script": re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.I),
    "style element": re.compile(r"<style\b", re.I),
    "style attribute": re.compile(r"\sstyle\s*=", re.I),
    "event handler attribute": re.compile(r"\son[a-z]+\s*=", re.I),
    "hx-on attribute": re.compile(r"\s(data-)?hx-on", re.I),
    "javascript: URL": re.compile(r"javascript:", re.I),
}


def policy(response) -> dict[str, list[str]]:
    header = response["Content-Security-Policy"]
    return {name: values for name, *values in (part.split() for part in header.split(";"))}


@pytest.fixture
def pages():
    pool = make_pool(name="Headers pool")
    host = make_host(pool, is_master=True)
    shared = make_sr(pool, shared=True)
    make_pbd(host, shared)
    vm = make_vm(pool, host=host, name_label="web-1")
    make_disk(vm, shared)
    run = WorkflowRun.objects.create(kind="protect", state="succeeded", pool=pool, vm=vm, vm_name=vm.name_label)
    Alert.objects.create(condition="host_lost", object_key=f"host:{host.uuid}", pool=pool, message="Host lost")
    return [
        "/", "/vms/", f"/vms/{vm.uuid}/", f"/hosts/{host.uuid}/", f"/pools/{pool.pk}/", f"/tree/host-{host.uuid}/",
        "/protection/", f"/protection/protect/?vm={vm.uuid}", f"/protection/runs/?ids={run.pk}",
        f"/protection/pools/{pool.pk}/plan/", "/protection/failover-events/", "/protection/audit/", "/alerts/",
        "/alerts/recipients/", "/api/docs/",
    ]  # fmt: skip


def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_every_page_carries_the_policy_and_holds_nothing_inline_it_would_block(pages):
    client = signed_in(role_user("adam-admin", group=ADMINISTRATORS))  # an Administrator sees every button
    for url in pages:
        response = client.get(url)
        assert response.status_code == 200, url
        assert policy(response) == POLICY, url
        html = response.content.decode()
        found = {what: pattern.findall(html)[:3] for what, pattern in INLINE.items() if pattern.search(html)}
        assert not found, f"{url}: {found}"


def test_the_login_and_lock_out_pages_carry_the_policy_too():
    client = Client()
    responses = [client.get("/login/")]
    responses += [client.post("/login/", {"username": "mallory", "password": "guess"})
                  for _ in range(settings.AXES_FAILURE_LIMIT)]  # fmt: skip
    assert responses[-1].status_code == 429  # the lock-out page
    for response in responses:
        assert policy(response) == POLICY
        assert not any(pattern.search(response.content.decode()) for pattern in INLINE.values())


def test_drf_browsable_api_alone_may_use_inline_styles_and_no_page_inline_scripts():
    client = signed_in(role_user("vic-viewer", viewer=True))
    browsable = policy(client.get("/api/v1/vms/", HTTP_ACCEPT="text/html"))
    assert browsable["style-src"] == ["'self'", "'unsafe-inline'"] and browsable["script-src"] == ["'self'"]
    assert policy(client.get("/api/v1/vms/")) == POLICY  # the same data as JSON: the policy of every page


def test_over_https_the_socket_may_only_use_wss_of_the_same_host():
    response = Client().get("/login/", secure=True)
    assert policy(response)["connect-src"] == ["'self'", "wss://testserver"]


def test_the_inline_checks_see_what_they_look_for():
    # Negative control: each pattern finds the thing it names.
    samples = {
        "inline script": "<script>alert(1)</script>",
        "style element": "<style>p{}</style>",
        "style attribute": '<span style="width: 3%">',
        "event handler attribute": '<button onclick="go()">',
        "hx-on attribute": '<div hx-on:click="go()">',
        "javascript: URL": '<a href="javascript:go()">',
    }
    assert {what for what, html in samples.items() if INLINE[what].search(html)} == set(INLINE)
    assert not INLINE["inline script"].search('<script src="/static/js/eac.js" defer></script>')


def test_session_and_csrf_cookies_stay_on_same_site_requests_and_the_session_is_not_for_scripts():
    role_user("vic-viewer", viewer=True)
    client = Client()
    csrf = client.get("/login/").cookies["csrftoken"]
    assert csrf["samesite"] == "Lax"
    session = client.post("/login/", {"username": "vic-viewer", "password": "pw-vic-viewer"}).cookies["sessionid"]
    assert session["httponly"] and session["samesite"] == "Lax"
