"""Real parts for the protection and alerts tests: users in the two roles, a Celery worker and beat in
their own processes on a queue of their own, the watcher, and an SMTP server on loopback.

Import the fixtures into a conftest with ``from tests.protection.fixtures import *``.
"""
from __future__ import annotations

import email
import email.policy
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path

import pytest

from tests.support import ROOT, subprocess_env, wait_for

# -- users ----------------------------------------------------------------------------------------


def make_user(username: str, group: str | None):
    from django.contrib.auth.models import Group, User

    user = User.objects.create_user(username=username, password="pw-" + username)
    if group:
        user.groups.add(Group.objects.get_or_create(name=group)[0])
    # The inventory shows pools to users with this permission; both roles see everything.
    from django.contrib.auth.models import Permission

    perm = Permission.objects.filter(codename="view_pool", content_type__app_label="inventory").first()
    if perm is not None:
        user.user_permissions.add(perm)
    return user


@pytest.fixture
def admin_user(django_user_model):
    return make_user("alice-admin", "Administrators")


@pytest.fixture
def operator_user(django_user_model):
    return make_user("oscar-operator", "Operators")


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


# -- SMTP -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Mailbox:
    """What the loopback SMTP server received, parsed."""

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


class _Handler:
    def __init__(self, box: Mailbox) -> None:
        self.box = box

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.box.lock:
            self.box.messages.append(message)
        return "250 OK"


@pytest.fixture
def smtp_server():
    from aiosmtpd.controller import Controller

    box = Mailbox(port=free_port())
    controller = Controller(_Handler(box), hostname="127.0.0.1", port=box.port)
    controller.start()
    yield box
    controller.stop()


# -- Celery ---------------------------------------------------------------------------------------


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


class Proc:
    """A console subprocess with its output in a file (read it when a test fails)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], ready: str | None) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.ready = ready
        self.log = Path(tempfile.mkstemp(prefix=f"eac-{name}-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> Proc:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        out.close()
        if self.ready:
            wait_for(lambda: self.ready in self.output() or self.proc.poll() is not None, timeout=timeout,
                     interval=0.2, message=f"{self.name} to start")
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.output()[-4000:]}")
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL the whole process group: a worker dying mid-task, children and all."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


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
def start_proc():
    """Start console subprocesses; each is stopped at the end of the test."""
    procs: list[Proc] = []

    def start(kind: str, env: dict[str, str], *extra: str) -> Proc:
        queue = env["CELERY_TASK_DEFAULT_QUEUE"]
        if kind == "worker":
            args = [sys.executable, "-m", "celery", "-A", "eac", "worker", "-Q", queue, "--pool=solo",
                    "-n", f"{queue}-{len(procs)}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat",
                    "-l", "INFO", *extra]
            ready = "ready."
        elif kind == "beat":
            schedule = Path(tempfile.mkdtemp(prefix="eac-beat-")) / "schedule"
            args = [sys.executable, "-m", "celery", "-A", "eac", "beat", "-l", "INFO", "-s", str(schedule),
                    "--scheduler", "celery.beat:PersistentScheduler", *extra]
            ready = "beat: Starting"
        elif kind == "watcher":
            args = [sys.executable, "manage.py", "watch_pools", "--poll", "1", *extra]
            ready = None
        else:
            raise ValueError(kind)
        proc = Proc(kind, args, env, ready).start()
        procs.append(proc)
        return proc

    yield start
    for proc in reversed(procs):
        proc.stop()


def dump_logs(*procs: Proc) -> str:
    return "\n".join(f"--- {p.name} ---\n{p.output()[-6000:]}" for p in procs)


def wait_run(run_id: int, timeout: float = 60.0, states=("succeeded", "failed")):
    from protection.models import WorkflowRun

    return wait_for(
        lambda: (run := WorkflowRun.objects.filter(pk=run_id, state__in=states).first()) and run,
        timeout=timeout, interval=0.2, message=f"run {run_id} to reach {states}",
    )


def register_pool(sim, name: str = "Demo pool"):
    """The simulated pool registered and synced once (its inventory filled in)."""
    from inventory.services import pool_create
    from inventory.watcher import sync_once

    pool = pool_create(name=name, url=sim.url, username=sim.user, password=sim.password, verify_tls=False)
    sync_once(pool)
    pool.refresh_from_db()
    return pool


__all__ = [
    "admin_user", "operator_user", "admin_api", "operator_api", "smtp_server", "celery_queue", "console_env",
    "start_proc", "make_user", "Mailbox", "Proc", "dump_logs", "wait_run", "register_pool", "free_port",
]
