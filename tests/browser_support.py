"""Helpers of the browser tests (the fixtures are in tests/conftest.py): daphne serving the real ASGI app,
Debian's Chromium, screenshots and logging in."""
from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

from tests.support import ROOT, Proc, free_port

SCREENSHOTS = ROOT / "artifacts" / "screenshots"
ARTIFACTS = ROOT / "artifacts" / "ui"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
PASSWORD = "pw-operator-1"


class Server:
    """``daphne console.asgi:application`` in a subprocess, restartable on the same port."""

    def __init__(self, static_root: Path | None, env: dict[str, str], log: Path = ARTIFACTS / "daphne.log") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if static_root is not None:
            env = dict(env, STATIC_ROOT=str(static_root))
        self.proc = Proc(
            "daphne",
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port), "console.asgi:application"],
            env=env, ready=self._answers, log=log,
        )  # fmt: skip

    def start(self) -> Server:
        self.proc.start(timeout=30)
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/login/", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.stop()


def screenshot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    return path


def login(page, server, username="operator", password=PASSWORD, shot: str | None = None):
    page.goto(server.url + "/")
    page.wait_for_url("**/login/**")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    if shot:
        screenshot(page, shot)
    page.click("button[type=submit]")
    page.wait_for_selector("#live-status[data-state=live]")
