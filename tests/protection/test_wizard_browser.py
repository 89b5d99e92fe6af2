"""The wizard in Chromium: protect a VM at Level 1, watch the steps live, see its icon change live."""
from __future__ import annotations

import pytest

from inventory.models import VM
from tests.browser_support import login, screenshot
from tests.support import protection_states

pytestmark = [pytest.mark.browser]


def test_wizard_protects_a_vm_at_level1_and_its_icon_changes_live(
    page, queued_server, watched_pool, xapisim, console_env, start_proc, admin_user
):
    start_proc("worker", console_env)
    vms = VM.objects.filter(pool=watched_pool, power_state="Running", is_control_domain=False,
                            is_a_template=False, resident_on__is_master=False).order_by("name_label")
    states = protection_states(vms.values_list("pk", flat=True))
    vm = next(v for v in vms if states[v.pk][1] == "candidate")
    login(page, queued_server, username="alice-admin", password="pw-alice-admin")

    # The VM's page stays open in one tab: its protection badge must change there without a reload.
    vm_page = page.context.new_page()
    vm_page.goto(f"{queued_server.url}/vms/{vm.uuid}/")
    vm_page.wait_for_selector("#live-status[data-state=live]")
    badge = vm_page.locator(f"#vm-{vm.uuid} .status-pill")
    assert "Candidate" in badge.inner_text()

    page.goto(f"{queued_server.url}/protection/protect/?vm={vm.uuid}")
    assert page.locator("input[name=level][value='3']").is_enabled()  # every level is offered
    assert page.locator(".level-why").count() == 0
    page.wait_for_selector(f"#preflight-{vm.uuid}[data-can-proceed=true]")
    page.select_option("#id_heartbeat_sr", label="iSCSI shared storage")
    page.fill("#id_order", "2")
    screenshot(page, "protect-wizard")
    # Each XAPI answer takes a while, so the steps are seen moving rather than already done.
    master = watched_pool.hosts.get(is_master=True)
    xapisim.control("POST", f"/sim/hosts/{master.name_label}/slow", {"delay_ms": 250})
    page.click("#protect-confirm")

    page.wait_for_url("**/protection/runs/?ids=*")
    card = page.locator("section.run")
    assert card.get_attribute("data-state") in ("pending", "running")
    # Pushed over the WebSocket as the worker goes: the page is never reloaded.
    page.wait_for_selector("section.run[data-state=succeeded]", timeout=30_000)
    assert card.locator("li.step[data-state=done]").count() == 5
    assert card.locator("progress.run-progress").get_attribute("value") == "1.000"
    screenshot(page, "protect-progress")

    vm_page.wait_for_selector(f"#vm-{vm.uuid} .status-pill.st-level1", timeout=15_000)
    assert "Level 1" in vm_page.locator(f"#vm-{vm.uuid} .status-pill").inner_text()
    screenshot(vm_page, "protect-vm-protected")
