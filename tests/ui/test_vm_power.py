"""The VM page's Start and Shut down buttons in Chromium (Administrators): a worker calls XAPI, the watcher sees
the new power state, the page shows it live."""
from __future__ import annotations

import pytest

from inventory.models import VM
from tests.browser_support import login, screenshot
from tests.support import xapi_login

pytestmark = [pytest.mark.browser]


def power_is(page, vm: VM, state: str, timeout: float = 20_000) -> None:
    # A selector, not wait_for_function: the page's Content-Security-Policy forbids the eval its polling needs.
    page.wait_for_selector(f"#vm-{vm.uuid} .vm-power:has-text('{state}')", timeout=timeout)


def test_administrator_starts_and_shuts_down_a_vm_from_its_page_and_sees_it_live(
    page, queued_server, watched_pool, xapisim, console_env, start_proc, admin_user
):
    # daphne sends its tasks to this test's queue (queued_server), which this worker serves.
    start_proc("worker", console_env)
    vm = VM.objects.filter(pool=watched_pool, power_state="Halted", is_control_domain=False, is_a_template=False,
                           is_a_snapshot=False).order_by("name_label").first()  # fmt: skip
    login(page, queued_server, username="alice-admin", password="pw-alice-admin")
    page.goto(f"{queued_server.url}/vms/{vm.uuid}/")
    page.wait_for_selector("#live-status[data-state=live]")
    panel = f"#vm-{vm.uuid}"
    power_is(page, vm, "Halted", timeout=5_000)
    assert page.locator(f"{panel} button.act-shutdown").count() == 0
    page.evaluate("window.__notReloaded = true")

    page.click(f"{panel} button.act-start")
    power_is(page, vm, "Running")
    page.wait_for_selector(f"{panel} button.act-shutdown")
    assert page.locator(f"{panel} button.act-start").count() == 0
    screenshot(page, "vm-started")

    page.once("dialog", lambda dialog: dialog.accept())  # "Shut down …? Its operating system is asked to stop."
    page.click(f"{panel} button.act-shutdown")
    power_is(page, vm, "Halted")
    page.wait_for_selector(f"{panel} button.act-start")
    assert page.evaluate("window.__notReloaded") is True

    # XAPI agrees: the simulated pool has it halted, as the console does.
    session = xapi_login(xapisim.url, xapisim.user, xapisim.password)
    try:
        assert session.xenapi.VM.get_power_state(session.xenapi.VM.get_by_uuid(vm.uuid)) == "Halted"
    finally:
        session.xenapi.session.logout()
    vm.refresh_from_db()
    assert vm.power_state == "Halted"
