"""The pages work under their Content-Security-Policy in a real browser: Chromium reports no violation.

The console's pages, Swagger UI and the admin are loaded from daphne; every ``securitypolicyviolation``
event and every "Refused to …" console message is collected. A console page must also go live: its socket
(``connect-src``) opens.
"""
from __future__ import annotations

import pytest

from tests.browser_support import login
from tests.inventory.factories import make_host, make_pool, make_vm

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

LISTEN = """
window.__csp = [];
document.addEventListener('securitypolicyviolation', function (e) {
  window.__csp.push(e.violatedDirective + ' blocked ' + (e.blockedURI || 'inline') + ' at ' + e.sourceFile
                    + ':' + e.lineNumber);
});
"""


@pytest.fixture
def strict_page(browser):
    """A page of its own, which enforces the CSP whatever the shared ``page`` fixture chooses."""
    context = browser.new_context(viewport={"width": 1440, "height": 900}, bypass_csp=False)
    page = context.new_page()
    page.set_default_timeout(15_000)
    yield page
    context.close()


def test_pages_load_and_go_live_without_a_single_csp_violation(strict_page, server, django_user_model):
    page = strict_page
    pool = make_pool(name="CSP pool")
    host = make_host(pool, is_master=True, memory_total=100, memory_free=40)
    vm = make_vm(pool, host=host, name_label="web-1")
    django_user_model.objects.create_superuser("sue-super", password="pw-sue-super")
    refused: list[str] = []
    page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
    page.add_init_script(LISTEN)
    login(page, server, username="sue-super", password="pw-sue-super")

    console_pages = ["/", "/vms/", f"/vms/{vm.uuid}/", f"/hosts/{host.uuid}/", f"/pools/{pool.pk}/", "/protection/",
                     "/protection/runs/", "/alerts/", "/alerts/recipients/", "/protection/audit/"]  # fmt: skip
    for url in console_pages:
        page.goto(server.url + url)
        page.wait_for_selector('#live-status[data-state="live"]')  # the socket opened: connect-src allows it
        assert page.evaluate("window.__csp") == [], url
    page.goto(server.url + "/api/docs/")
    page.wait_for_selector("#swagger-ui .information-container")  # Swagger UI started: its script ran
    assert page.evaluate("window.__csp") == [], "/api/docs/"
    for url in ["/api/v1/", "/api/v1/vms/"]:  # DRF's browsable API
        page.goto(server.url + url)
        page.wait_for_selector(".response-info")
        assert page.evaluate("window.__csp") == [], url
    for url in ["/admin/", "/admin/inventory/vm/", f"/admin/inventory/pool/{pool.pk}/change/", "/admin/auth/user/add/"]:
        page.goto(server.url + url)
        page.wait_for_selector("#site-name")
        assert page.evaluate("window.__csp") == [], url
    assert refused == []
