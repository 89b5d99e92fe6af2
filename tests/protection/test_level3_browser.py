"""Level 3 checkpoint health live on a VM's page, in Chromium: the page, served by daphne, is open while the
console records what the AMs say (readings by hand, as test_level3_health.py: no AM runs here); the checkpointing
components, their figures and the protection's status follow without a reload, through the console's own socket.
"""
from __future__ import annotations

import threading

import pytest
from django.db import connection

from tests.browser_support import login, screenshot
from tests.browser_waits import wait_until
from tests.protection.test_level3_health import cp, level3_records, record

pytestmark = [pytest.mark.browser]


def recorded(setup: dict, primary_cp) -> None:
    """``record`` in a thread of its own: this one runs Playwright's event loop, under which the realtime emit after
    commit (async_to_sync) cannot run. Its database connection is closed with it."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            record(setup, primary_cp)
        except BaseException as exc:  # re-raised in the test's thread
            failed.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive() and not failed, failed


def test_the_vm_page_follows_checkpointing_stalling_and_going_on_again_live(page, server, admin_user,
                                                                           transactional_db):
    setup = level3_records()
    vm, a = setup["vm"], setup["a"]
    recorded(setup, cp("Checkpointing"))
    login(page, server, username="alice-admin", password="pw-alice-admin")
    page.goto(f"{server.url}/vms/{vm.uuid}/")
    page.wait_for_selector("#live-status[data-state=live]")
    row = f'#vm-protection-{vm.uuid} tr[data-component="checkpoint@{a.uuid}"]'
    page.wait_for_selector(f"{row}[data-health=good]")
    figures = page.locator(f"{row} dl.checkpoint-figures").inner_text()
    assert "Last committed epoch" in figures and "1,200" in figures and "31.0 ms" in figures
    assert page.locator(f"#vm-protection-{vm.uuid} .prot-epoch").inner_text().startswith("50 ms")
    page.evaluate("window.__notReloaded = true")

    recorded(setup, cp("Stalled", why="No acknowledgement for 1.1 s."))
    page.wait_for_selector(f"{row}[data-health=failed]", timeout=15_000)
    assert "Checkpointing stalled on hosta" in page.locator(row).inner_text()
    wait_until(page, f"document.querySelector('#vm-protection-{vm.uuid} .prot-status').innerText.includes('Degraded')")
    screenshot(page, "vm-page-level3-stalled")

    recorded(setup, cp("Checkpointing", last_committed=1500))
    page.wait_for_selector(f"{row}[data-health=good]", timeout=15_000)
    assert "1,500" in page.locator(f"{row} dl.checkpoint-figures").inner_text()  # the figures came with the push
    assert page.evaluate("window.__notReloaded") is True
    screenshot(page, "vm-page-level3")
