"""Fixtures shared by the test packages: a simulated pool, the console's users in their roles, the console's
own processes (Celery worker and beat, the watcher) on a queue of the test's own, an SMTP server on loopback,
and, for the browser tests, daphne and Chromium. Their helpers are in tests/support.py."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid

import pytest

from tests.browser_support import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, Server
from tests.support import ROOT, Mailbox, Proc, free_port, make_user, start_sim, subprocess_env, wait_for

# -- the simulated pool ---------------------------------------------------------------------------------


@pytest.fixture
def xapisim():
    """The demo pool served from this process (a lost host is declared dead after 1 s), stopped after the test."""
    sim = start_sim()
    yield sim
    sim.stop()


# -- users ----------------------------------------------------------------------------------------------


@pytest.fixture
def admin_user(django_user_model):
    """A member of Administrators (instead of pytest-django's superuser: the console's roles are groups)."""
    return make_user("alice-admin", "Administrators")


@pytest.fixture
def operator_user(django_user_model):
    return make_user("oscar-operator", "Operators")


@pytest.fixture
def viewer(django_user_model):
    """May see the inventory, in neither console group."""
    user = django_user_model.objects.create_user("viewer", password="pw-viewer-1")
    from django.contrib.auth.models import Permission

    user.user_permissions.add(Permission.objects.get(codename="view_pool", content_type__app_label="inventory"))
    return user


@pytest.fixture
def admin_api(admin_user):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(admin_user)
    return client


@pytest.fixture
def operator_api(operator_user):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(operator_user)
    return client


# -- the console's processes --------------------------------------------------------------------------------


@pytest.fixture
def smtp_server():
    """An SMTP server on loopback; what it received is in the Mailbox it gives."""
    from aiosmtpd.controller import Controller

    box = Mailbox(port=free_port())
    controller = Controller(box, hostname="127.0.0.1", port=box.port)
    controller.start()
    yield box
    controller.stop()


def _use_queue(name: str) -> None:
    """Send this process's tasks to ``name`` (Celery caches the routing; drop the cache)."""
    from eac.celery import app

    app.conf.task_default_queue = name
    for attr in ("queues", "default_queue", "router"):
        app.amqp.__dict__.pop(attr, None)
    app.amqp._rtable = None


@pytest.fixture
def celery_queue(transactional_db):
    """A queue of this test's own: the test process, its worker, beat and watcher all use it."""
    from eac.celery import app

    old = app.conf.task_default_queue
    name = f"eactest-{uuid.uuid4().hex[:12]}"
    _use_queue(name)
    yield name
    _use_queue(old)


@pytest.fixture
def console_env(celery_queue, smtp_server):
    """Environment of the console subprocesses: the test database, this test's queue and SMTP server."""
    return subprocess_env(
        CELERY_TASK_DEFAULT_QUEUE=celery_queue,
        EMAIL_URL=smtp_server.url,
        EAC_WORKFLOW_LEASE="3",
        EAC_WORKFLOW_RETRY_DELAY="0.2",
        EAC_MAIL_RETRY_DELAY="0.5",
        EAC_SWEEP_INTERVAL="1",
        EAC_EVENT_TIMEOUT="5",
        LOG_LEVEL="INFO",
    )


@pytest.fixture
def start_proc(tmp_path):
    """``start_proc(kind, env, *extra)``: a console process (worker, beat or watcher), started and ready; each
    is stopped at the end of the test. Logs are in the test's tmp_path unless ``log`` says where."""
    procs: list[Proc] = []

    def start(kind: str, env: dict[str, str], *extra: str, log=None) -> Proc:
        n = len(procs)
        if kind == "worker":
            queue = env["CELERY_TASK_DEFAULT_QUEUE"]
            args = [sys.executable, "-m", "celery", "-A", "eac", "worker", "-Q", queue, "--pool=solo",
                    "-n", f"{queue}-{n}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat",
                    "-l", "INFO", *extra]
            ready = "ready."
        elif kind == "beat":
            args = [sys.executable, "-m", "celery", "-A", "eac", "beat", "-l", "INFO",
                    "-s", str(tmp_path / f"beat-{n}.schedule"), "--scheduler", "celery.beat:PersistentScheduler",
                    *extra]
            ready = "beat: Starting"
        elif kind == "watcher":
            args = [sys.executable, "manage.py", "watch_pools", "--poll", "1", *extra]
            ready = None
        else:
            raise ValueError(kind)
        proc = Proc(kind, args, env=env, ready=ready, log=log or tmp_path / f"{kind}-{n}.log").start()
        procs.append(proc)
        return proc

    yield start
    for proc in reversed(procs):
        proc.stop()


# -- the browser tests: daphne, the watcher, Chromium --------------------------------------------------------


@pytest.fixture(scope="session")
def static_root(tmp_path_factory, django_db_setup):
    root = tmp_path_factory.mktemp("static")
    subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"],
        cwd=ROOT, env=subprocess_env(STATIC_ROOT=str(root)), check=True,
    )  # fmt: skip
    return root


@pytest.fixture(scope="module")
def server(static_root):
    """The console served by daphne on the test database, for a module's browser tests."""
    srv = Server(static_root, subprocess_env()).start()
    yield srv
    srv.stop()


@pytest.fixture
def queued_server(static_root, console_env):
    """daphne as ``server``, but sending its tasks to this test's own Celery queue."""
    srv = Server(static_root, console_env).start()
    yield srv
    srv.stop()


@pytest.fixture
def watched_pool(xapisim, start_proc):
    """The demo pool registered and followed by ``manage.py watch_pools`` until the test ends."""
    from inventory.choices import ConnectionState
    from inventory.models import VM, Pool

    # Registered with the CLI, in its own process: this thread runs Playwright's event loop.
    subprocess.run(
        [sys.executable, "manage.py", "pool_add", "Demo pool", "--url", xapisim.url, "--user", "root"],
        cwd=ROOT, env=subprocess_env(EAC_POOL_PASSWORD=xapisim.password), check=True, capture_output=True,
    )  # fmt: skip
    pool = Pool.objects.get(name="Demo pool")
    start_proc("watcher", subprocess_env(EAC_EVENT_TIMEOUT="5", LOG_LEVEL="INFO"), log=ARTIFACTS / "watcher.log")
    wait_for(
        lambda: Pool.objects.filter(pk=pool.pk, connection_state=ConnectionState.CONNECTED).exists()
        and VM.objects.filter(pool=pool).count() > 10,
        timeout=30,
        message="the watcher's first sync",
    )
    pool.refresh_from_db()
    return pool


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop in this thread, so Django takes the tests' plain
    # ORM calls for async code. Allowed here only: subprocess_env switches it off for the servers.
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
    log = ARTIFACTS / f"{request.node.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("\n".join(trace))
