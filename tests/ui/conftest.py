"""A live console for browser tests: daphne serving the real ASGI app on the test database,
a live xapisim, the watcher (``manage.py watch_pools``) and Debian's Chromium through Playwright."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission

from tests.support import ROOT, start_xapisim, subprocess_env, wait_for

SCREENSHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
PASSWORD = "pw-operator-1"


def console_env(**extra: str) -> dict[str, str]:
    """subprocess_env without the test process's async-unsafe allowance (see the browser fixture)."""
    return subprocess_env(DJANGO_ALLOW_ASYNC_UNSAFE="", **extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``daphne console.asgi:application`` in a subprocess, restartable on the same port."""

    def __init__(self, static_root: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.static_root = static_root
        self.proc: subprocess.Popen | None = None
        self.log = ROOT / "artifacts" / "ui" / "daphne.log"

    def start(self) -> Server:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = console_env(STATIC_ROOT=str(self.static_root))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port), "console.asgi:application"],
            cwd=ROOT, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for(self._answers, timeout=30, interval=0.1, message="daphne to answer")
        return self

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"daphne exited: {self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(self.url + "/login/", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def static_root(tmp_path_factory, django_db_setup):
    root = tmp_path_factory.mktemp("static")
    subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"],
        cwd=ROOT, env=console_env(STATIC_ROOT=str(root)), check=True,
    )  # fmt: skip
    return root


@pytest.fixture(scope="module")
def server(static_root):
    srv = Server(static_root).start()
    yield srv
    srv.stop()


@pytest.fixture
def operator(django_user_model):
    user = django_user_model.objects.create_user("operator", password=PASSWORD)
    user.user_permissions.add(Permission.objects.get(codename="view_pool", content_type__app_label="inventory"))
    return user


@pytest.fixture
def sim():
    simulator = start_xapisim("--ha-timeout", "1")
    yield simulator
    simulator.stop()


@pytest.fixture
def watched_pool(sim):
    """The demo pool registered and followed by ``manage.py watch_pools`` until the test ends."""
    from inventory.choices import ConnectionState
    from inventory.models import VM, Pool

    # Registered with the CLI, in its own process: this thread runs Playwright's event loop.
    subprocess.run(
        [sys.executable, "manage.py", "pool_add", "Demo pool", "--url", sim.url, "--user", "root"],
        cwd=ROOT, env=console_env(EAC_POOL_PASSWORD="demo"), check=True, capture_output=True,
    )  # fmt: skip
    pool = Pool.objects.get(name="Demo pool")
    log = (ROOT / "artifacts" / "ui" / "watcher.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "watch_pools", "--poll", "1"],
        cwd=ROOT, env=console_env(EAC_EVENT_TIMEOUT="5", LOG_LEVEL="INFO"), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(
            lambda: Pool.objects.filter(pk=pool.pk, connection_state=ConnectionState.CONNECTED).exists()
            and VM.objects.filter(pool=pool).count() > 10,
            timeout=30,
            message="the watcher's first sync",
        )
        pool.refresh_from_db()
        yield pool
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop in this thread, so Django takes the tests' plain
    # ORM calls for async code. Allowed here only: the servers started below get it switched off.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            yield chromium
            chromium.close()
    finally:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


@pytest.fixture
def page(browser, request):
    """A fresh browser context; its console and WebSocket traffic go to artifacts/ui/<test>.log."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page.set_default_timeout(10_000)
    trace: list[str] = []

    def frame(direction):
        def record(payload):
            text = str(payload)
            ids = re.findall(r'^<\w+ id="([^"]+)"', text, re.M)
            power = re.findall(r'class="vm-power">.*?<span>(\w+)</span>', text, re.S)
            trace.append(f"{time.strftime('%H:%M:%S')} ws {direction} {len(text)}B {ids or text[:300]} {power}")

        return record

    page.add_init_script(
        "for (const name of ['htmx:wsOpen', 'htmx:wsClose', 'htmx:sendError', 'htmx:responseError',"
        " 'htmx:swapError', 'htmx:afterRequest']) {"
        " document.addEventListener(name, e => console.log(name, e.detail && e.detail.pathInfo"
        " ? e.detail.pathInfo.requestPath : (e.detail && e.detail.event ? e.detail.event.code : ''))) }"
    )

    page.on("console", lambda m: trace.append(f"{time.strftime('%H:%M:%S')} console {m.type}: {m.text[:400]}"))
    page.on("websocket", lambda ws: (ws.on("framereceived", frame("<")), ws.on("framesent", frame(">"))))
    page.on("framenavigated", lambda f: trace.append(f"{time.strftime('%H:%M:%S')} navigated {f.url}"))
    yield page
    context.close()
    log = ROOT / "artifacts" / "ui" / f"{request.node.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("\n".join(trace))


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
