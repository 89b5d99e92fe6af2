"""The console in a real browser: Debian's Chromium against daphne, a live xapisim and the watcher.

Screenshots of the main pages go to artifacts/screenshots/.
"""
import re
import subprocess
import sys

import pytest

from inventory.models import VM, Host, Pool
from tests.browser_support import login, screenshot
from tests.browser_waits import wait_until
from tests.support import ROOT, start_sim, subprocess_env, wait_for, xapi_login

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def tree_vm_ids(page, group_key: str) -> set[str]:
    return set(page.eval_on_selector_all(f"#tg-{group_key} > li.ti-vm", "els => els.map(e => e.id)"))


def test_operator_logs_in_and_watches_a_host_crash_change_the_tree_live(page, server, xapisim, watched_pool, operator):
    pool = watched_pool
    login(page, server, shot="01-login")
    assert page.url == server.url + "/"
    host2 = Host.objects.get(pool=pool, name_label="xcp-host-2")
    running_on_2 = set(VM.objects.filter(resident_on=host2, is_control_domain=False).values_list("uuid", flat=True))
    assert running_on_2, "the demo preset runs VMs on every host"

    # The tree: the pool, its four hosts, the VMs resident on host 2, the Protected VM Summary.
    page.wait_for_selector(f"#tree-pool-{pool.uuid}")
    assert page.locator("#tree .ti-host").count() == 4
    assert tree_vm_ids(page, f"host-{host2.uuid}") == {f"tree-vm-{u}" for u in running_on_2}
    assert page.locator("#tree-pvs-candidate").is_visible()
    assert page.locator(f"#hdr-pool-{pool.uuid}.conn-connected").is_visible()
    screenshot(page, "02-overview")

    page.evaluate("window.__notReloaded = true")
    xapisim.control("POST", "/sim/hosts/xcp-host-2/crash")
    # Declared dead after the simulator's detection delay: the icon turns, the VMs leave the host.
    page.wait_for_selector(f"#tree-host-{host2.uuid} svg.host-dead", timeout=15_000)
    wait_until(page,
        f"document.querySelectorAll('#tg-host-{host2.uuid} > li.ti-vm').length === 0", timeout=10_000
    )
    halted = tree_vm_ids(page, f"halted-{pool.uuid}")
    assert {f"tree-vm-{u}" for u in running_on_2} <= halted
    for uuid in running_on_2:
        assert page.locator(f"#tree-vm-{uuid} svg.pw-halted").count() == 1
    assert page.locator(f"#tree-pool-{pool.uuid} svg.mark.st-failed").count() == 1  # a failed host below
    assert page.evaluate("window.__notReloaded") is True
    screenshot(page, "03-host-crashed")


def test_vm_table_filters_sorts_and_opens_a_vm_that_then_changes_live(page, server, xapisim, watched_pool, operator):
    login(page, server)
    page.click("nav.topnav >> text=Virtual machines")
    page.wait_for_selector("table.vm-table tbody tr.vm-row")
    total = VM.objects.filter(pool=watched_pool, is_a_template=False, is_control_domain=False,
                              is_a_snapshot=False).count()  # fmt: skip
    assert page.locator("tr.vm-row").count() == min(total, 50)
    screenshot(page, "04-vm-table")

    page.fill("#f-name", "db")
    wait_until(page, "[...document.querySelectorAll('tr.vm-row .c-name a')].every(a => /db/i.test(a.innerText))")
    names = page.eval_on_selector_all("tr.vm-row td.c-name a", "els => els.map(e => e.textContent)")
    assert names and all("db" in n.lower() for n in names)
    assert "name=db" in page.url

    page.select_option("#f-power", "Running")
    page.wait_for_url(re.compile(r".*power_state=Running.*"))
    wait_until(page, "[...document.querySelectorAll('.vm-row .c-power')].every(c => /Running/.test(c.innerText))")

    page.click("th.c-name a.sort-link")  # sorted by name already: the header reverses it
    page.wait_for_url(re.compile(r".*sort=-name.*"))
    assert page.get_attribute("th.c-name", "aria-sort") == "descending"
    desc = page.eval_on_selector_all("tr.vm-row td.c-name a", "els => els.map(e => e.textContent)")
    assert desc == sorted(desc, reverse=True)

    target = desc[0]
    vm = VM.objects.get(pool=watched_pool, name_label=target)
    page.click(f"#row-vm-{vm.uuid} td.c-type")  # anywhere on the row
    page.wait_for_selector(f"section#vm-{vm.uuid}")
    assert page.url.endswith(f"/vms/{vm.uuid}/")
    assert page.locator(f"#vm-{vm.uuid} .vm-power").inner_text().strip() == "Running"
    screenshot(page, "05-vm-page")

    page.evaluate("window.__notReloaded = true")
    xapisim.control("POST", f"/sim/vms/{target}/crash")
    wait_until(page,
        f"document.querySelector('#vm-{vm.uuid} .vm-power').innerText.trim() === 'Halted'", timeout=10_000
    )
    assert "Not running on a host" in page.locator(f"#vm-{vm.uuid} .vm-host").inner_text()
    assert page.evaluate("window.__notReloaded") is True


def test_tree_is_usable_with_the_keyboard(page, server, xapisim, watched_pool, operator):
    pool = watched_pool
    login(page, server)
    first_host = Host.objects.filter(pool=pool).order_by("name_label").first()
    page.focus(f"#ti-pool-{pool.uuid}")
    assert page.evaluate("document.activeElement.id") == f"ti-pool-{pool.uuid}"

    page.keyboard.press("ArrowDown")
    assert page.evaluate("document.activeElement.id") == f"ti-host-{first_host.uuid}"
    assert page.get_attribute(f"#ti-host-{first_host.uuid}", "aria-expanded") == "true"
    page.keyboard.press("ArrowLeft")  # collapse
    assert page.get_attribute(f"#ti-host-{first_host.uuid}", "aria-expanded") == "false"
    page.keyboard.press("ArrowLeft")  # to the parent
    assert page.evaluate("document.activeElement.id") == f"ti-pool-{pool.uuid}"
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowRight")  # expand
    assert page.get_attribute(f"#ti-host-{first_host.uuid}", "aria-expanded") == "true"
    page.keyboard.press("ArrowRight")  # to the first child
    vm_id = page.evaluate("document.activeElement.id")
    assert vm_id.startswith("tree-vm-")
    assert page.evaluate("document.activeElement.getAttribute('tabindex')") == "0"
    page.keyboard.press("Enter")
    uuid = vm_id[len("tree-vm-"):]
    page.wait_for_selector(f"section#vm-{uuid}")
    assert page.url.endswith(f"/vms/{uuid}/")
    # The open state of the tree survives a reload (kept in a cookie by the page).
    page.reload()
    page.wait_for_selector("#live-status[data-state=live]")
    assert page.get_attribute(f"#ti-host-{first_host.uuid}", "aria-expanded") == "true"
    screenshot(page, "06-tree-keyboard")


def test_host_and_pool_pages(page, server, xapisim, watched_pool, operator):
    pool = watched_pool
    login(page, server)
    host = Host.objects.get(pool=pool, name_label="xcp-host-1")
    page.click(f"#tree-host-{host.uuid} a.tree-link")
    page.wait_for_selector(f"section#host-{host.uuid}")
    text = page.locator(f"#host-{host.uuid}").inner_text()
    assert "Physical NICs" in text and "eth0" in text and "Attached" in text and "used of" in text
    screenshot(page, "07-host-page")
    page.click(f"#tree-pool-{pool.uuid} a.tree-link")
    page.wait_for_selector(f"section#pool-{pool.uuid}")
    text = page.locator(f"#pool-{pool.uuid}").inner_text()
    assert "Connected" in text and "xcp-host-4" in text and "VMs by level" in text
    screenshot(page, "08-pool-page")


def test_page_shows_it_is_not_live_and_resyncs_after_the_server_comes_back(
    page, server, xapisim, watched_pool, operator
):
    pool = watched_pool
    login(page, server)
    page.click("nav.topnav >> text=Virtual machines")
    page.wait_for_selector("tr.vm-row")
    vm = VM.objects.filter(pool=pool, power_state="Running", is_control_domain=False).order_by("name_label").first()
    page.fill("#f-name", vm.name_label)
    page.wait_for_url(re.compile(rf".*name={vm.name_label}.*"))
    page.wait_for_selector(f"#row-vm-{vm.uuid}")

    server.stop()
    page.wait_for_selector("#live-status[data-state=offline]")
    assert page.locator("#stale-banner").is_visible()
    screenshot(page, "09-not-live")
    # A change while the page cannot hear about it...
    xapisim.control("POST", f"/sim/vms/{vm.name_label}/crash")
    wait_for(lambda: VM.objects.filter(pk=vm.pk, power_state="Halted").exists(), timeout=10, message="the crash")
    server.start()
    # ...is on the page once the socket is back (the page resyncs), without a reload.
    page.wait_for_selector("#live-status[data-state=live]", timeout=20_000)
    wait_until(page,
        f"/Halted/.test(document.querySelector('#row-vm-{vm.uuid} td.c-power').textContent)", timeout=10_000
    )
    assert not page.locator("#stale-banner").is_visible()


def test_a_pool_registered_while_the_overview_is_open_appears_on_it_without_a_reload(
    page, server, xapisim, watched_pool, operator
):
    login(page, server)
    page.evaluate("window.__notReloaded = true")
    second = start_sim(seed=2)  # another pool: other uuids
    try:
        # Registered with the CLI, as watched_pool does: this thread runs Playwright's event loop.
        subprocess.run(
            [sys.executable, "manage.py", "pool_add", "Second pool", "--url", second.url, "--user", "root"],
            cwd=ROOT, env=subprocess_env(EAC_POOL_PASSWORD=second.password), check=True, capture_output=True,
        )  # fmt: skip
        pool = Pool.objects.get(name="Second pool")
        page.wait_for_selector(f"#hdr-pool-{pool.uuid}", timeout=10_000)
        page.wait_for_selector(f"#tree-pool-{pool.uuid}", timeout=10_000)
        # The watcher (polling for new pools) syncs it: its hosts come into the tree too.
        hosts = wait_for(lambda: list(Host.objects.filter(pool=pool).order_by("name_label")), timeout=30,
                         message="the second pool's first sync")  # fmt: skip
        page.wait_for_selector(f"#tree-host-{hosts[0].uuid}", state="attached", timeout=15_000)
        assert page.locator(f"#tree-pool-{watched_pool.uuid}").count() == 1  # the first pool is still there
        assert page.evaluate("window.__notReloaded") is True
        screenshot(page, "10-second-pool-live")
    finally:
        second.stop()


def test_a_vm_that_stops_and_starts_leaves_and_rejoins_the_running_table_live(
    page, server, xapisim, watched_pool, operator
):
    login(page, server)
    page.goto(server.url + "/vms/?power_state=Running")
    page.wait_for_selector("#live-status[data-state=live]")
    vm = VM.objects.filter(pool=watched_pool, power_state="Running", is_control_domain=False, is_a_template=False,
                           is_a_snapshot=False).order_by("name_label").first()  # fmt: skip
    page.wait_for_selector(f"#row-vm-{vm.uuid}")
    total = int(page.get_attribute("#vm-table", "data-total"))
    page.evaluate("window.__notReloaded = true")

    session = xapi_login(xapisim.url, xapisim.user, xapisim.password)
    try:
        ref = session.xenapi.VM.get_by_uuid(vm.uuid)
        session.xenapi.VM.clean_shutdown(ref)
        page.wait_for_selector(f"#row-vm-{vm.uuid}", state="detached", timeout=10_000)
        assert int(page.get_attribute("#vm-table", "data-total")) == total - 1
        assert page.locator("#vm-count").inner_text().startswith(f"{total - 1} VM")
        assert all("Running" in t for t in page.locator("tr.vm-row td.c-power").all_inner_texts())

        session.xenapi.VM.start(ref, False, False)
        page.wait_for_selector(f"#row-vm-{vm.uuid}", timeout=10_000)
        assert int(page.get_attribute("#vm-table", "data-total")) == total
    finally:
        session.xenapi.session.logout()
    assert page.evaluate("window.__notReloaded") is True
    screenshot(page, "11-running-table-live")

