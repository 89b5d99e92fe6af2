"""Level 2 in Chromium, on the live bed (``python -m xapisim --preset demo --live``) with the console's real
watcher, Celery worker and beat (test_level2_faults's ``stack``) and daphne: an administrator protects ``vpn-gw``
through the wizard (Level 2, the suggested secondary, the footprint and its warning, the preflight in words, the
comparison of the levels), watches the workflow's steps live, then sees the VM's components with their icons on
the VM's page and in the tree; a cut availability link turns its icon degraded on the open page, with what to
repair, and back; unprotect from the page removes them. Bad input in the wizard is refused with a sentence.

One bed for the module (its own, not test_level2_faults's); conditions are waited on, never slept on. Root only.
"""
from __future__ import annotations

import pytest

from inventory.models import VM
from protection.choices import RunKind
from protection.models import Protection, WorkflowRun
from protection.workflows import steps_for
from tests.browser_support import Server, login, screenshot
from tests.browser_waits import wait_until
from tests.protection.test_level2_faults import HEALTH, VM_NAME, api, stack  # noqa: F401 - fixtures
from tests.protection.test_level2_live import pytestmark as live_only
from tests.support import subprocess_env

pytestmark = [live_only, pytest.mark.browser]
MIB = 2**20

# Every pushed fragment's run steps, as the page showed them: the progress seen live, not only its end.
STEP_TRACE = """
window.__steps = [];
document.addEventListener('htmx:wsAfterMessage', function () {
  var steps = [...document.querySelectorAll('section.run li.step')].map(function (li) { return li.dataset.state; });
  if (steps.length) window.__steps.push(steps.join(','));
});
"""


@pytest.fixture(scope="module")
def web(static_root, stack):  # noqa: F811 - the fixture imported above
    """daphne on the module's database, sending its tasks to the stack's worker."""
    from django.conf import settings

    from eac.celery import app

    env = subprocess_env(CELERY_TASK_DEFAULT_QUEUE=app.conf.task_default_queue, EAC_AM_TOKEN_FILE=str(
        settings.EAC_AM_TOKEN_FILE or stack["live"].bed["hosts"][0]["am"]["token_file"]), **HEALTH)
    server = Server(static_root, env, log=stack["tmp"] / "daphne.log").start()
    yield server
    server.stop()


@pytest.fixture
def vm(stack, api):  # noqa: F811 - the fixture imported above
    """VM_NAME, unprotected, its two hosts (neither the pool's master)."""
    vm = VM.objects.select_related("resident_on").get(pool=stack["pool"], name_label=VM_NAME)
    assert not Protection.objects.filter(vm=vm).exists()
    secondary = stack["pool"].hosts.get(uuid=vm.resident_on.am_peer)
    return {"vm": vm, "primary": vm.resident_on, "secondary": secondary}


def _admin(page, web) -> None:
    login(page, web, username="alice-admin", password="pw-alice-admin")


def _row(vm_uuid: str, component: str) -> str:
    return f"#vm-protection-{vm_uuid} tr.comp[data-component='{component}']"


def _tree(vm_uuid: str, component: str) -> str:
    return f"#tree-vm-{vm_uuid} .tree-comp[data-component='{component}']"


def test_the_wizard_refuses_a_secondary_equal_to_the_primary_and_a_footprint_below_the_minimum(page, web, vm):
    target, primary = vm["vm"], vm["primary"]
    _admin(page, web)
    page.goto(f"{web.url}/protection/protect/?vm={target.uuid}&level=2")
    card = f"#preflight-{target.uuid}"
    page.wait_for_selector(f"{card}[data-can-proceed=true]")

    # The page offers only the other hosts with an AM: a crafted choice of the VM's own host.
    page.evaluate(f"""() => {{ const s = document.getElementById('id_secondary_host');
        s.add(new Option('{primary.name_label}', '{primary.uuid}')); }}""")
    page.select_option("#id_secondary_host", primary.uuid)
    page.wait_for_selector(f"{card}[data-can-proceed=false]")
    assert "must be another host" in page.locator(f"{card} .check-secondary").inner_text()
    page.click("#protect-confirm")
    page.wait_for_selector(".error-text[role=alert]")
    refused = page.locator(".error-text[role=alert]").inner_text()
    assert "Not started" in refused and f"another host than the one the VM runs on ({primary.name_label})" in refused

    # A footprint below the VM's dynamic minimum.
    page.goto(f"{web.url}/protection/protect/?vm={target.uuid}&level=2")
    page.wait_for_selector(f"{card}[data-can-proceed=true]")
    low = target.memory_dynamic_min // MIB - 1
    page.fill("#id_secondary_memory_mib", str(low))
    page.locator("#id_secondary_memory_mib").dispatch_event("change")
    page.wait_for_selector(f"{card}[data-can-proceed=false]")
    assert "below the VM's dynamic minimum" in page.locator(f"{card} .check-footprint").inner_text()
    page.click("#protect-confirm")
    page.wait_for_selector(".error-text[role=alert]")
    refused = page.locator(".error-text[role=alert]").inner_text()
    assert f"{low} MiB is below the VM's dynamic minimum ({target.memory_dynamic_min // MIB} MiB)" in refused
    screenshot(page, "level2-wizard-refused")
    # Nothing was created, nothing queued.
    assert not Protection.objects.filter(vm=target).exists()
    assert not WorkflowRun.objects.filter(vm=target).exists()


def test_level2_through_the_wizard_its_components_live_in_the_page_and_the_tree_through_a_link_cut(
        page, web, vm, stack):  # noqa: F811 - the fixture imported above
    target, primary, secondary = vm["vm"], vm["primary"], vm["secondary"]
    uuid = target.uuid
    _admin(page, web)
    # The VM's page stays open in a tab of its own: everything below reaches it without a reload.
    watch = page.context.new_page()
    watch.goto(f"{web.url}/vms/{uuid}/")
    watch.wait_for_selector("#live-status[data-state=live]")
    watch.evaluate("window.__notReloaded = true")
    assert watch.locator(f"#tree-vm-{uuid} .lv-badge").count() == 0

    # The wizard, from the VM's page.
    page.goto(f"{web.url}/vms/{uuid}/")
    page.click(f"#vm-{uuid} a.act-protect")
    page.wait_for_selector(f"#preflight-{uuid}")
    comparison = page.locator("table.comparison")
    for words in ("Level 1", "Level 2", "Level 3", "Host failure", "Disk / NIC failure", "Storage"):
        assert words in comparison.inner_text(), words
    assert page.locator("input[name=level][value='3']").is_enabled()
    page.check("input[name=level][value='2']")
    card = f"#preflight-{uuid}"
    page.wait_for_selector(f"{card} li.check-secondary")
    page.wait_for_selector(f"{card}[data-can-proceed=true]")
    # The suggested secondary: the AM peer of the VM's host, first in the list and named so.
    assert page.locator("#id_secondary_host option").nth(1).inner_text() == f"{secondary.name_label} (AM peer)"
    suggestion = page.locator(f"{card} .check-secondary").inner_text()
    assert f"{secondary.name_label}, the AM peer of {primary.name_label}" in suggestion and "(suggested)" in suggestion
    # The footprint, its warning and its bounds.
    assert page.locator("#id_secondary_memory_mib").is_visible()
    assert "after a failover the VM restarts with that much memory only" in page.locator(
        "#secondary-memory-warning").inner_text()
    assert "dynamic minimum" in page.locator(f"{card} .level2-footprint").inner_text()
    # Every check in words.
    for name in ("level", "power", "disks", "am", "secondary", "footprint", "memory", "storage", "links"):
        message = page.locator(f"{card} li.check-{name} .check-message").inner_text()
        assert len(message.split()) >= 3, (name, message)
    assert "disk(s) to mirror" in page.locator(f"{card} li.check-disks").inner_text()
    labels = [step.label for step in steps_for(RunKind.PROTECT, 2)]
    assert page.locator("#wizard-steps li").all_inner_texts() == labels
    screenshot(page, "level2-wizard")

    page.add_init_script(STEP_TRACE)
    page.click("#protect-confirm")
    page.wait_for_url("**/protection/runs/?ids=*")
    run = page.locator("section.run")
    assert run.get_attribute("data-state") in ("pending", "running")
    assert run.locator("li.step b").all_inner_texts() == labels
    run.locator("li.step[data-state=done]").first.wait_for(timeout=60_000)
    page.wait_for_selector("section.run[data-state=succeeded]", timeout=240_000)
    assert run.locator("li.step[data-state=done]").count() == len(labels)
    seen = page.evaluate("window.__steps")
    # Pushed as the worker went: states in between were shown (a step done while others were still pending).
    assert any("done" in s and ("pending" in s or "running" in s) for s in seen), seen
    screenshot(page, "level2-run")

    # The VM's page and the tree: every component with its icon, all OK once the AMs are read.
    components = {f"am@{primary.uuid}", f"am@{secondary.uuid}", "peer", "link:a", "link:b",
                  f"witness@{primary.uuid}", f"witness@{secondary.uuid}", f"disk:0@{primary.uuid}",
                  f"disk:0@{secondary.uuid}", "secondary-vm"}
    for component in components:
        watch.wait_for_selector(f"{_row(uuid, component)}[data-health=good]", timeout=60_000)
    rows = watch.locator(f"#vm-protection-{uuid} tr.comp")
    shown = set(watch.eval_on_selector_all(f"#vm-protection-{uuid} tr.comp", "rs => rs.map(r => r.dataset.component)"))
    assert components <= shown, shown
    nics = {c for c in shown if c.startswith("nic:")}
    assert {n.rpartition("@")[2] for n in nics} == {primary.uuid, secondary.uuid}, shown  # a NIC per host
    wait_until(watch, f"[...document.querySelectorAll('#vm-protection-{uuid} tr.comp')]"
                      ".every(r => r.dataset.health === 'good')", timeout=60_000)
    assert rows.locator("svg.icon use[href='#i-check']").count() == rows.count() == len(shown)
    watch.wait_for_selector(f"#vm-{uuid} .prot-level .lv-badge.lv-2.st-good")
    for component in shown:
        watch.wait_for_selector(f"{_tree(uuid, component)}[data-health=good] use[href='#i-check']")
    assert watch.locator(f"#tree-vm-{uuid} .tree-comp").count() == len(shown)
    badge = watch.locator(f"#tree-vm-{uuid} .lv-badge")
    assert badge.inner_text().startswith("L2") and "lv-2" in badge.get_attribute("class")
    # The Level 2 icon is not Level 1's or Level 3's (the legend's, styled by the same rules).
    styles = watch.evaluate("""(uuid) => ['lv-1', 'lv-2', 'lv-3'].map(lv => {
        const el = document.querySelector(lv === 'lv-2' ? `#tree-vm-${uuid} .lv-badge` : '.legend .lv-badge.' + lv);
        const s = getComputedStyle(el); return [el.textContent.trim().slice(0, 2), s.borderTopStyle, s.borderRadius];
    })""", uuid)
    assert [s[0] for s in styles] == ["L1", "L2", "L3"] and len({tuple(s[1:]) for s in styles}) == 3, styles
    screenshot(watch, "level2-vm-protected")

    # A cut availability link: its icon turns degraded on the open page, the drill-down says what and what to do.
    cmd = stack["cmd"]
    cmd.control("POST", f"/sim/hosts/{primary.name_label}/links/a", {"up": False})
    try:
        watch.wait_for_selector(f"{_row(uuid, 'link:a')}[data-health=degraded] use[href='#i-warn']", timeout=30_000)
        watch.wait_for_selector(f"{_tree(uuid, 'link:a')}[data-health=degraded] use[href='#i-warn']")
        watch.wait_for_selector(f"#tree-vm-{uuid} .lv-badge.lv-2.st-degraded")
        link = watch.locator(_row(uuid, "link:a")).inner_text()
        assert f"Availability link A between {primary.name_label} and {secondary.name_label} is down" in link, link
        assert watch.locator(f"{_row(uuid, 'link:a')} .comp-repair").inner_text().startswith(
            "Check link A's cable, NICs and switch ports"), link
        assert watch.locator(f"{_row(uuid, 'link:b')}[data-health=good]").count() == 1
        assert "one availability link only" in watch.locator(_row(uuid, "peer")).inner_text()
        assert "Repair the availability link" in watch.locator(f"{_row(uuid, 'peer')} .comp-repair").inner_text()
        screenshot(watch, "level2-link-a-cut")
    finally:
        cmd.control("POST", f"/sim/hosts/{primary.name_label}/links/a", {"up": True})
    watch.wait_for_selector(f"{_row(uuid, 'link:a')}[data-health=good] use[href='#i-check']", timeout=60_000)
    watch.wait_for_selector(f"{_tree(uuid, 'link:a')}[data-health=good]")
    watch.wait_for_selector(f"#tree-vm-{uuid} .lv-badge.lv-2.st-good", timeout=30_000)
    assert watch.evaluate("window.__notReloaded") is True

    # Unprotect from the VM's page: the components go, on the other tab too.
    page.goto(f"{web.url}/vms/{uuid}/")
    page.wait_for_selector("#live-status[data-state=live]")
    page.once("dialog", lambda dialog: dialog.accept())
    # The panel is pushed again at each reading of the AMs (its "AMs read" time): Playwright's click waits for
    # an element that stays put for two frames, which a swap may keep from happening; a user's click is at once.
    page.wait_for_selector(f"#vm-protection-{uuid} button.act-unprotect")
    page.evaluate(f"document.querySelector('#vm-protection-{uuid} button.act-unprotect').click()")
    page.wait_for_url("**/protection/runs/?ids=*")
    page.wait_for_selector("section.run[data-state=succeeded]", timeout=120_000)
    watch.wait_for_selector(f"#vm-{uuid} a.act-protect", timeout=30_000)
    assert watch.locator(f"#vm-protection-{uuid} tr.comp").count() == 0
    wait_until(watch, f"document.querySelector('#tree-vm-{uuid}') && "
                      f"!document.querySelector('#tree-vm-{uuid} .tree-comp, #tree-vm-{uuid} .lv-badge')")
    assert watch.evaluate("window.__notReloaded") is True
    assert not Protection.objects.filter(vm=target).exists()
