"""Waiting in the browser tests without ``page.wait_for_function``: Playwright compiles a string predicate with
``eval`` inside the page, which the console's Content-Security-Policy (``script-src 'self'``) forbids, and the
tests must not weaken the policy they run under. ``page.evaluate`` goes through the DevTools protocol, which the
policy does not govern."""
from __future__ import annotations

import time

from playwright.sync_api import Error


def wait_until(page, expression: str, timeout: float = 10_000, interval: float = 50) -> None:
    """Poll the JavaScript ``expression`` until it is truthy (``timeout`` and ``interval`` in ms, as Playwright's
    waits). An expression that throws, its element not there yet, counts as false."""
    check = f"() => {{ try {{ return !!({expression}); }} catch (e) {{ return false; }} }}"
    deadline = time.monotonic() + timeout / 1000
    while True:
        try:
            if page.evaluate(check):
                return
        except Error:  # a navigation replaced the page's context: look again in the new one
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout / 1000:.0f} s waiting for {expression}")
        page.wait_for_timeout(interval)
