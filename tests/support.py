"""Helpers the tests share; the fixtures built on them are in the conftest.py files.

A simulated pool in this process (``start_sim``) or through its command line (``XapisimCommand``), a subprocess
with its log (``Proc``), waiting for a condition (``wait_for``), and the console's users, pools and runs.
"""
from __future__ import annotations

import email
import email.policy
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path

import XenAPI

from xapisim.server import Simulator

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.05,
             message: str | Callable[[], str] = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds. ``message`` says what
    was waited for; a callable is called at the failure (processes' logs as they are then, not as they were)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            what = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# Ports the tests serve on come from below the kernel's ephemeral range, and each once per test run: a port the
# kernel hands out for ``bind(0)`` can be handed out again at once, or given to a client connection's end before
# the server that was to listen on it starts (seen in CI: an AM that could not bind its port).
PORTS = range(20000, 32000)
_given: set[int] = set()
_ports_lock = threading.Lock()


def free_port() -> int:
    """A loopback port nothing listens on, never returned before in this run: to serve on, or to find nobody at."""
    with _ports_lock:
        for _ in range(1000):
            port = random.choice(PORTS)
            if port in _given:
                continue
            _given.add(port)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue  # in use, or lingering
                return port
    raise RuntimeError(f"no free loopback port in {PORTS}")


# -- subprocesses ---------------------------------------------------------------------------------------


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a console subprocess (watcher, worker, server) that shares the test database."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="eac.test_settings",
        DATABASE_URL=(
            f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
        ),
        PYTHONUNBUFFERED="1",
        # The browser fixture allows the test process's ORM calls under Playwright's event loop; a server,
        # worker or watcher must keep Django's check.
        DJANGO_ALLOW_ASYNC_UNSAFE="",
    )
    env.update(extra)
    return env


class Proc:
    """A subprocess of the tests with its output (stdout and stderr) in ``log``, stopped with its children.

    ``ready``: the text its output shows once it is up, or a predicate; ``start`` waits for it.
    """

    def __init__(self, name: str, args: list[str], *, log: Path, env: dict[str, str] | None = None,
                 ready: str | Callable[[], object] | None = None) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.ready = ready
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self._started_at = 0  # where this start's output begins in the log (a restart appends)

    def start(self, timeout: float = 60.0) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._started_at = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        if self.ready is not None:
            try:
                wait_for(lambda: self.proc.poll() is not None or self._is_ready(), timeout=timeout, interval=0.1,
                         message=f"{self.name} to start")
            except AssertionError:
                self.stop()  # not left running: no fixture holds it yet
                raise AssertionError(f"{self.name} did not start within {timeout}s:\n{self.output()[-4000:]}") from None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.output()[-4000:]}")
        return self

    def _is_ready(self) -> object:
        if callable(self.ready):
            return self.ready()
        return self.ready in self.log.read_bytes()[self._started_at:].decode(errors="replace")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL the whole process group: a worker dying mid-task, children and all."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        """SIGTERM the process group (SIGKILL after 15 s); returns its exit status."""
        if self.proc is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.kill()
            self.returncode = self.proc.returncode
            self.proc = None
        return self.returncode


def dump_logs(*procs: Proc) -> str:
    return "\n".join(f"--- {p.name} ---\n{p.output()[-6000:]}" for p in procs)


def db_activity() -> str:
    """The other sessions on the test database that are not idle: what each waits for, for how long its transaction
    has run, and its statement (for the message of a wait that timed out)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid, application_name, state, wait_event_type, wait_event, now() - xact_start, left(query, 300) "
            "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() AND state <> 'idle'"
        )
        rows = cursor.fetchall()
    return "--- database sessions not idle ---\n" + "\n".join(" | ".join(map(str, row)) for row in rows)


# -- the simulated pool ----------------------------------------------------------------------------------


class SimControl:
    """A simulated pool's URLs and its /sim/ control API, however it is served."""

    url: str
    port: int
    user = "root"
    password = "demo"

    def host_url(self, address: str) -> str:
        return f"http://{address}:{self.port}"

    def control(self, method: str, path: str, body: dict | None = None, base: str | None = None) -> dict:
        """Call the simulator's /sim/ API (JSON); raises urllib.error.HTTPError on 4xx/5xx."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            (base or self.url) + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")

    def state(self) -> dict:
        return self.control("GET", "/sim/state")


class Sim(Simulator, SimControl):
    """xapisim served from this process (real HTTP, on threads): what a test needs of a pool, without the
    second or so a ``python -m xapisim`` takes to start."""

    def __init__(self, preset: str = "demo", **options) -> None:
        super().__init__(preset, **options)
        self._options = {"preset": preset, **options}
        self.user = options.get("user", "root")
        self.password = options.get("password", "demo")

    def restart(self) -> None:
        """Stop, then serve the preset afresh on the same port: what clients see of a restarted pool."""
        self.stop()
        Simulator.__init__(self, **{**self._options, "port": self.port})
        self.start()


def start_sim(preset: str = "demo", **options) -> Sim:
    """A simulated pool (options as ``xapisim.server.Simulator``'s) on a free port, its VM operations taking
    10 ms and a lost host declared dead after 1 s unless told otherwise; call ``stop()`` when done."""
    sim = Sim(preset, **{"port": 0, "op_delay": 0.01, "ha_timeout": 1.0, **options})
    sim.start()
    return sim


class XapisimCommand(SimControl):
    """``python -m xapisim`` in its own process: for the tests of the command line itself."""

    READY = re.compile(r"xapisim listening on (http://[\d.]+:(\d+))")

    def __init__(self, *args: str, log: Path) -> None:
        self.proc = Proc("xapisim", [sys.executable, "-m", "xapisim", *args], log=log, ready="xapisim listening on")

    def start(self) -> XapisimCommand:
        self.proc.start()
        self.url, port = self.READY.search(self.proc.output()).groups()
        self.port = int(port)
        return self

    def stop(self) -> int | None:
        return self.proc.stop()


def xapi_login(url: str, user: str = "root", password: str = "demo") -> XenAPI.Session:
    """A session of the unmodified XenAPI package; log out with ``session.xenapi.session.logout()``."""
    session = XenAPI.Session(url)
    session.xenapi.login_with_password(user, password, "2.21", "eac-tests")
    return session


# -- mail --------------------------------------------------------------------------------------------------


@dataclass
class Mailbox:
    """What the loopback SMTP server (the ``smtp_server`` fixture) received, parsed."""

    port: int
    messages: list[Message] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def matching(self, **headers: str) -> list[Message]:
        with self.lock:
            return [m for m in self.messages
                    if all(m.get(f"X-eAC-{k.capitalize()}") == v for k, v in headers.items())]

    def wait(self, count: int = 1, timeout: float = 20.0, **headers: str) -> list[Message]:
        return wait_for(lambda: (found := self.matching(**headers)) and len(found) >= count and found,
                        timeout=timeout, message=f"{count} mail(s) with {headers}")

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.lock:
            self.messages.append(message)
        return "250 OK"


# -- the console's rows ------------------------------------------------------------------------------------


def make_user(username: str, group: str | None):
    """A user with the password ``pw-<username>`` in ``group``, who may see the inventory."""
    from django.contrib.auth.models import Group, Permission, User

    user = User.objects.create_user(username=username, password="pw-" + username)
    if group:
        user.groups.add(Group.objects.get_or_create(name=group)[0])
    # The inventory shows pools to users with this permission; both roles see everything.
    perm = Permission.objects.filter(codename="view_pool", content_type__app_label="inventory").first()
    if perm is not None:
        user.user_permissions.add(perm)
    return user


def register_pool(sim: SimControl, name: str = "Demo pool"):
    """The simulated pool registered and synced once (its inventory filled in)."""
    from inventory.services import pool_create
    from inventory.watcher import sync_once

    pool = pool_create(name=name, url=sim.url, username=sim.user, password=sim.password, verify_tls=False)
    sync_once(pool)
    pool.refresh_from_db()
    return pool


def protection_states(vm_ids) -> dict:
    """{VM id: (level, health)} as the console shows them, health "candidate" for a candidate."""
    from inventory.models import VM
    from protection.selectors import vm_protection_states

    vms = VM.objects.filter(pk__in=list(vm_ids))
    return {pk: (s.level, "candidate" if s.status == "candidate" else s.health)
            for pk, s in vm_protection_states(vms).items()}


def agile_running_vm(pool, *, exclude=()):
    """A running VM whose disks are all on shared storage, on a host that is not the master."""
    from inventory.models import VM

    vms = VM.objects.filter(pool=pool, power_state="Running", is_a_template=False, is_control_domain=False,
                            is_a_snapshot=False, resident_on__is_master=False).exclude(pk__in=exclude)
    states = protection_states(vms.values_list("pk", flat=True))
    return next(vm for vm in vms.order_by("name_label") if states[vm.pk][1] == "candidate")


def shared_sr(pool):
    from inventory.models import SR

    return SR.objects.filter(pool=pool, shared=True).exclude(content_type="iso").first()


def wait_run(run_id: int, timeout: float = 60.0, states=("succeeded", "failed")):
    from protection.models import WorkflowRun

    return wait_for(
        lambda: (run := WorkflowRun.objects.filter(pk=run_id, state__in=states).first()) and run,
        timeout=timeout, interval=0.2, message=f"run {run_id} to reach {states}",
    )
