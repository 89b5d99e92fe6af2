"""Helpers of tests/test_restarts.py: a Redis and a PostgreSQL of the test's own that it may stop and start
(the machine's shared ones are never touched), a WebSocket client of the live page's socket on a daphne
subprocess, and the mirror counted against xapisim."""
from __future__ import annotations

import concurrent.futures
import json
import os
import pwd
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from tests.support import ROOT, Proc, free_port, wait_for

PG_BIN = Path("/usr/lib/postgresql/15/bin")


# -- servers a test may restart -------------------------------------------------------------------------


class RedisServer:
    """``redis-server`` on a port of its own, without persistence: a restart loses every key, as a
    Redis restarted from an empty disk (or failed over to an empty replica) does."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = Proc("redis", ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--daemonize", "no"],
                         log=log, ready="Ready to accept connections")  # fmt: skip

    def start(self) -> RedisServer:
        self.proc.start(timeout=30)
        return self

    def stop(self) -> None:
        self.proc.stop()


class PostgresCluster:
    """A PostgreSQL 15 cluster of its own (initdb in a temporary directory, run as the ``postgres`` user, on
    its own port), stopped the way a restart does (fast shutdown: sessions are cut, nothing is lost)."""

    def __init__(self, log: Path, name: str = "eac") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="eac-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.name = name
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/{name}"
        self.log = log
        self.proc: Proc | None = None
        user = pwd.getpwnam("postgres")
        os.chown(self.dir, user.pw_uid, user.pw_gid)
        # Exec'd as postgres (setpriv, not runuser, which would stay the parent): signals reach the postmaster.
        self._as_postgres = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]

    def init(self) -> PostgresCluster:
        subprocess.run([*self._as_postgres, PG_BIN / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--no-sync"], cwd=self.dir, check=True, capture_output=True)  # fmt: skip
        self.start()
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {self.name}")
        return self

    @contextmanager
    def admin(self):
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:  # fmt: skip
            yield conn

    def start(self) -> None:
        # A throwaway cluster: durability off, it only has to survive a clean restart.
        self.proc = Proc("postgres", [*self._as_postgres, PG_BIN / "postgres", "-D", self.data, "-p", str(self.port),
                                      "-k", self.dir, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                                      "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                         log=self.log, ready="database system is ready to accept connections")  # fmt: skip
        self.proc.start(timeout=60)

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster): every session is disconnected, as in a restart."""
        if self.proc is not None and self.proc.proc is not None and self.proc.proc.poll() is None:
            self.proc.proc.send_signal(signal.SIGINT)
            try:
                self.proc.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# What migrations write besides the schema (``copy_schema`` copies these rows too).
MIGRATION_DATA = ("django_migrations", "django_content_type", "auth_permission", "auth_group",
                  "auth_group_permissions")


def copy_schema(cluster: PostgresCluster) -> None:
    """Give the cluster's database the schema of the test database, which pytest-django migrated at the start
    of the session: what ``manage.py migrate`` would make, in a second rather than the half minute the
    migrations take on a loaded machine."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    source = ["-h", db["HOST"] or "127.0.0.1", "-p", str(db["PORT"] or 5432), "-U", db["USER"] or "postgres",
              "-d", db["NAME"], "--no-owner", "--no-privileges"]  # fmt: skip
    schema = subprocess.run([PG_BIN / "pg_dump", *source, "--schema-only"], capture_output=True, check=True).stdout
    data = subprocess.run([PG_BIN / "pg_dump", *source, "--data-only", *(f"--table={t}" for t in MIGRATION_DATA)],
                          capture_output=True, check=True).stdout  # fmt: skip
    subprocess.run([PG_BIN / "psql", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", "-d",
                    cluster.name, "-q", "-v", "ON_ERROR_STOP=1"], input=schema + data, capture_output=True,
                   check=True)  # fmt: skip


def manage_shell(env: dict[str, str], code: str) -> str:
    """Run ``code`` in ``manage.py shell`` against ``env``'s database (writes in a database the test process
    does not use as its own); returns what it printed."""
    done = subprocess.run([sys.executable, "manage.py", "shell", "--no-imports", "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


class PrivateDatabase:
    """Reads of the test process in the private cluster's database (what the console's subprocesses wrote
    there): ``read(fn)`` runs ``fn`` with the ORM's default connection swapped for one to that database.
    (An alias of its own would do, but Django's test case refuses connections to aliases it was not
    declared with, and it cannot be declared before the fixture made the cluster.)"""

    def __init__(self, cluster: PostgresCluster) -> None:
        from django.db import connections
        from django.db.utils import load_backend

        settings = {**connections.settings["default"], "NAME": cluster.name, "HOST": "127.0.0.1",
                    "PORT": str(cluster.port), "USER": "postgres", "PASSWORD": ""}  # fmt: skip
        self._connection = load_backend(settings["ENGINE"]).DatabaseWrapper(settings, "default")

    def read(self, fn, *args):
        """``fn(*args)`` on the private database, or None if it does not answer (yet): for ``wait_for``."""
        from django.db import DatabaseError, connections

        saved = connections["default"]
        connections._connections.default = self._connection
        try:
            return fn(*args)
        except DatabaseError:
            self._connection.close()  # cut by a restart: the next read connects again
            return None
        finally:
            connections._connections.default = saved

    def close(self) -> None:
        self._connection.close()


def together(*starts):
    """Call each of ``starts`` at once and return what they returned: the console's processes each take seconds
    to import Django and be ready, and need not wait for one another."""
    with concurrent.futures.ThreadPoolExecutor(len(starts)) as pool:
        return [future.result() for future in [pool.submit(start) for start in starts]]


def writing_backends() -> list[int]:
    """Backends of other sessions on the database with a write transaction open (a transaction id assigned)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                       " AND pid <> pg_backend_pid() AND backend_xid IS NOT NULL")  # fmt: skip
        return [row[0] for row in cursor.fetchall()]


@contextmanager
def table_held(model):
    """``model``'s table locked against every write (EXCLUSIVE: reads go on) by a transaction of another
    connection, for the ``with`` block: a writer that touches it waits, mid-transaction, until the block ends."""
    import psycopg
    from django.db import connection

    db = connection.settings_dict
    with psycopg.connect(dbname=db["NAME"], user=db["USER"], password=db["PASSWORD"] or None,
                         host=db["HOST"] or None, port=db["PORT"] or None) as conn:
        conn.execute(f'LOCK TABLE "{model._meta.db_table}" IN EXCLUSIVE MODE')
        try:
            yield
        finally:
            conn.rollback()


def lock_waiters() -> list[int]:
    """Backends of the database waiting for a lock (one that ``table_held`` holds, say)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                       " AND wait_event_type = 'Lock'")  # fmt: skip
        return [row[0] for row in cursor.fetchall()]


def pool_lock_holders(pool_id: int) -> list[str]:
    """The sessions holding the watcher's advisory lock of the pool, by application name."""
    from django.db import connection

    from inventory.watch_lock import NAMESPACE

    with connection.cursor() as cursor:
        cursor.execute("SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                       " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s"
                       " AND l.objsubid = 2 AND l.database = (SELECT oid FROM pg_database"
                       " WHERE datname = current_database())", [NAMESPACE, pool_id])  # fmt: skip
        return [row[0] for row in cursor.fetchall()]


# -- the live page's socket, as its script opens it -------------------------------------------------------


def _reactor():
    """Twisted's reactor, running in a thread of its own for the rest of the session (it cannot be restarted).
    Django's setup already chose it (the daphne app installs the asyncio reactor), so autobahn's Twisted client
    is the one this process can use."""
    from twisted.internet import reactor

    global _reactor_thread
    if _reactor_thread is None:
        _reactor_thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                                           name="twisted-reactor", daemon=True)  # fmt: skip
        _reactor_thread.start()
    return reactor


_reactor_thread: threading.Thread | None = None


class LiveSocket:
    """A WebSocket to ``/ws/live/`` of a daphne subprocess, with a session cookie and the page's origin, as the
    page's script opens it (autobahn's client). Messages queue up in ``messages``."""

    def __init__(self, base_url: str, cookie: str) -> None:
        self.base_url = base_url
        self.cookie = cookie
        self.messages: queue.Queue[str] = queue.Queue()
        self.closed: concurrent.futures.Future = concurrent.futures.Future()
        self._open: concurrent.futures.Future = concurrent.futures.Future()
        self._protocol = None

    def connect(self, timeout: float = 10.0) -> bool:
        """True once the handshake is accepted, False if it was refused or the connection failed."""
        from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS

        socket = self

        class Protocol(WebSocketClientProtocol):
            def onOpen(self):  # noqa: N802 - autobahn's names
                socket._protocol = self
                socket._open.set_result(True)

            def onMessage(self, payload, isBinary):  # noqa: N802, N803
                socket.messages.put(payload.decode(errors="replace"))

            def onClose(self, wasClean, code, reason):  # noqa: N802, N803
                if not socket.closed.done():
                    socket.closed.set_result((code, reason))

        factory = WebSocketClientFactory(self.base_url.replace("http://", "ws://") + "/ws/live/",
                                         origin=self.base_url, headers={"Cookie": self.cookie})  # fmt: skip
        factory.protocol = Protocol
        factory.clientConnectionFailed = lambda connector, reason: self._closed_early(reason)
        _reactor().callFromThread(connectWS, factory, timeout=timeout)
        concurrent.futures.wait([self._open, self.closed], timeout, return_when=concurrent.futures.FIRST_COMPLETED)
        return self._open.done()

    def _closed_early(self, reason) -> None:
        if not self.closed.done():
            self.closed.set_result((None, str(reason.value)))

    def send(self, message: dict) -> None:
        assert self._protocol is not None
        _reactor().callFromThread(self._protocol.sendMessage, json.dumps(message).encode(), False)

    def receive_until(self, predicate, timeout: float = 30.0) -> str:
        """Messages until one satisfies ``predicate``; returns it. Fails on timeout or once the socket closed."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while time.monotonic() < deadline:
            try:
                text = self.messages.get(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                if self.closed.done():
                    break
                continue
            seen.append(text)
            if predicate(text):
                return text
        state = f"closed {self.closed.result()}" if self.closed.done() else "open"
        raise AssertionError(f"no matching message (socket {state}); got {[t[:200] for t in seen]!r}")

    def close(self) -> None:
        if self._protocol is not None and not self.closed.done():
            _reactor().callFromThread(self._protocol.sendClose)
            concurrent.futures.wait([self.closed], 5)


def live_socket(base_url: str, cookie: str, timeout: float = 30.0) -> LiveSocket:
    """A socket the server accepted, trying again every half second as the page's script does."""

    def attempt() -> LiveSocket | None:
        socket = LiveSocket(base_url, cookie)
        return socket if socket.connect(timeout=5) else None

    return wait_for(attempt, timeout=timeout, interval=0.5, message=f"a socket accepted by {base_url}")


def api_post(base_url: str, path: str, token: str, body: dict) -> tuple[int, dict]:
    """POST JSON to the console's REST API with a token, as automation does."""
    request = urllib.request.Request(base_url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Token {token}"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read() or b"{}")


# -- the mirror against the pool -----------------------------------------------------------------------


def sim_uuids(sim) -> dict[str, set[str]]:
    """{mirrored class: uuids} as xapisim holds them now (``get_all_records`` of each class)."""
    from inventory.sync import XAPI_CLASSES
    from inventory.xapi import connect

    with connect(sim.url, sim.user, sim.password) as client:
        return {cls: {r["uuid"] for r in client.call(f"{XAPI_CLASSES[cls]}.get_all_records").values()}
                for cls in _models()}  # fmt: skip


def mirror_uuids(pool_id: int) -> dict[str, list[str]]:
    """{mirrored class: uuids of its rows}, as a list: a duplicated row would show twice."""
    return {cls: list(model.objects.filter(pool_id=pool_id).values_list("uuid", flat=True))
            for cls, model in _models().items()}  # fmt: skip


def mirror_matches(sim, pool_id: int) -> bool:
    """Each mirrored class has one row per object of xapisim's ``get_all_records``: none missing, none stale,
    none twice."""
    rows = mirror_uuids(pool_id)
    return all(sorted(rows[cls]) == sorted(uuids) for cls, uuids in sim_uuids(sim).items())


def _models() -> dict:
    """The mirrored XAPI classes and their models."""
    from inventory.models import PBD, PIF, SR, VBD, VDI, VIF, VM, Host, Network

    return {"host": Host, "sr": SR, "pbd": PBD, "network": Network, "pif": PIF, "vm": VM, "vdi": VDI, "vbd": VBD,
            "vif": VIF}
