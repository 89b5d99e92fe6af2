"""Protection inside the console, in Chromium: select VMs in the table, protect them with the wizard, watch
the table and the tree follow live, open the pool's failover plan, see a host loss on the alerts page,
and unprotect from a VM's page. Screenshots of each page go to artifacts/screenshots/."""
from __future__ import annotations

import pytest

from inventory.models import VM
from protection.models import Protection
from tests.browser_support import login, screenshot
from tests.browser_waits import wait_until
from tests.support import protection_states, wait_for

pytestmark = [pytest.mark.browser]


def candidates_on_two_members(pool) -> tuple[VM, VM]:
    """Two running candidates on two different non-master hosts (the first one's host will crash)."""
    vms = list(VM.objects.filter(pool=pool, power_state="Running", is_control_domain=False, is_a_template=False,
                                 resident_on__is_master=False).select_related("resident_on").order_by("name_label"))
    states = protection_states(vm.pk for vm in vms)
    candidates = [vm for vm in vms if states[vm.pk][1] == "candidate"]
    first = candidates[0]
    second = next(vm for vm in candidates if vm.resident_on_id != first.resident_on_id)
    return first, second


def test_protect_from_the_table_follow_live_see_the_plan_and_alerts_and_unprotect_from_the_vm_page(
    page, queued_server, watched_pool, xapisim, console_env, start_proc, admin_user
):
    start_proc("worker", console_env)
    pool = watched_pool
    first, second = candidates_on_two_members(pool)
    login(page, queued_server, username="alice-admin", password="pw-alice-admin")

    # A second tab keeps the table open: its rows and the tree must follow without a reload.
    watch = page.context.new_page()
    watch.goto(f"{queued_server.url}/vms/?per_page=100")
    watch.wait_for_selector("#live-status[data-state=live]")
    watch.evaluate("window.__notReloaded = true")
    level1_before = int(watch.locator("#tree-pvs-level1 .count").inner_text())

    page.click("nav.topnav >> text=Virtual machines")
    page.goto(f"{queued_server.url}/vms/?per_page=100")
    assert page.locator("#protect-selected").is_disabled()
    page.check(f"#row-vm-{first.uuid} input.vm-select")
    page.check(f"#row-vm-{second.uuid} input.vm-select")
    assert page.locator("#vm-selection .selection-count").inner_text().startswith("2")
    page.click("#protect-selected")
    page.wait_for_selector(f"#preflight-{first.uuid}[data-can-proceed=true]")
    page.wait_for_selector(f"#preflight-{second.uuid}[data-can-proceed=true]")
    assert page.url.count("vm=") == 2
    page.select_option("#id_heartbeat_sr", label="iSCSI shared storage")
    screenshot(page, "protect-wizard-several")
    page.locator("#protect-confirm").scroll_into_view_if_needed()
    screenshot(page, "protect-wizard-confirm")
    page.click("#protect-confirm")
    page.wait_for_url("**/protection/runs/?ids=*")
    wait_until(page, "document.querySelectorAll('section.run[data-state=succeeded]').length === 2",
               timeout=60_000)

    for vm in (first, second):
        watch.wait_for_selector(f"#row-vm-{vm.uuid} .status-pill.st-level1", timeout=15_000)
        watch.wait_for_selector(f"#tree-vm-{vm.uuid} .lv-badge.st-good")
    wait_until(watch, f"document.querySelector('#tree-pvs-level1 .count').innerText.trim() === "
                      f"'{level1_before + 2}'")
    assert "Protected VM" in watch.locator(f"#row-vm-{first.uuid} td.c-type").inner_text()
    assert watch.evaluate("window.__notReloaded") is True
    screenshot(watch, "vm-table-level1")

    # The pool page shows HA on and leads to the failover plan.
    page.goto(f"{queued_server.url}/pools/{pool.pk}/")
    assert page.locator(f"#pool-{pool.uuid} .state-pill.ha-on").is_visible()
    page.click("#pool-plan-link")
    page.wait_for_selector("#plan-title")
    assert "Plan holds" in page.locator(".detail-badges").inner_text()
    screenshot(page, "pool-plan")
    page.click("nav.topnav >> text=Protection")
    page.wait_for_selector("table#protections")
    assert {first.name_label, second.name_label} <= set(
        page.eval_on_selector_all("table#protections td:first-child a", "els => els.map(e => e.textContent)"))
    screenshot(page, "protected-vms")

    # A host with a protected VM is lost: the counter and the marks change live, the alerts page says so.
    host = first.resident_on
    xapisim.control("POST", f"/sim/hosts/{host.name_label}/crash")
    watch.wait_for_selector(f"#tree-host-{host.uuid} svg.host-dead", timeout=20_000)
    wait_until(watch, "document.querySelector('#alerts-counter .alerts-count').innerText.trim() !== '0'",
               timeout=20_000)
    wait_until(watch,
        f"(r => r && !/{host.name_label}/.test(r.querySelector('.c-hosts').innerText) && "
        f"/Running/.test(r.querySelector('.c-power').innerText))(document.getElementById('row-vm-{first.uuid}'))",
        timeout=40_000,
    )  # restarted by HA on a surviving host
    watch.click("#alerts-counter")
    watch.wait_for_selector("table#alerts")
    assert host.name_label in watch.locator("table#alerts").inner_text()
    screenshot(watch, "alerts")

    # The other VM's page: Level 1 and its components; unprotect from its header.
    page.goto(f"{queued_server.url}/vms/{second.uuid}/")
    page.wait_for_selector("#live-status[data-state=live]")
    assert "Level 1" in page.locator(f"#vm-{second.uuid} .status-pill").inner_text()
    assert "Failover plan" in page.locator(f"#vm-protection-{second.uuid}").inner_text()
    screenshot(page, "vm-page-level1")
    # From here on the page is never reloaded: record every state of its live indicator.
    page.evaluate("""window.__liveStates = [];
      new MutationObserver(() => window.__liveStates.push(document.getElementById('live-status').dataset.state))
        .observe(document.getElementById('live-status'), {attributes: true, attributeFilter: ['data-state']})""")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click(f"#vm-{second.uuid} .detail-actions .act-unprotect")
    page.wait_for_url("**/protection/runs/?ids=*")
    page.wait_for_selector("section.run[data-state=succeeded]", timeout=60_000)
    wait_for(lambda: not Protection.objects.filter(vm=second).exists(), timeout=10, message="the protection gone")
    page.click("nav.topnav >> text=Audit log")
    page.wait_for_selector("table#audit")
    assert "Unprotect requested" in page.locator("table#audit").inner_text()
    # The progress page's own socket came and went; the console's stayed live all along.
    assert page.evaluate("window.__liveStates.every(s => s === 'live')"), page.evaluate("window.__liveStates")
    assert page.get_attribute("#live-status", "data-state") == "live"
    screenshot(page, "audit-log")
    # The other tab, on the alerts page now, sees it in its tree: a candidate again.
    watch.wait_for_selector(f"#tree-vm-{second.uuid} svg.st-candidate", timeout=15_000)
    assert watch.locator(f"#tree-vm-{second.uuid} .lv-badge").count() == 0
