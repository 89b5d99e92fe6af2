"""Helpers of tests/inventory/test_watcher_sharing.py: several ``manage.py watch_pools`` processes, and what the
database says of who watches which pool."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from inventory.watch_lock import NAMESPACE, PREFIX, SCOPED, process_ident
from tests.restart_support import together
from tests.support import Proc, dump_logs, xapi_login


class Watchers:
    """``manage.py watch_pools`` processes on the test database, each with its log in ``logdir``."""

    def __init__(self, env: dict[str, str], logdir: Path, poll: float) -> None:
        self.env = env
        self.logdir = logdir
        self.poll = poll
        self.procs: list[Proc] = []

    def start(self, count: int) -> list[Proc]:
        """``count`` more watcher processes, started at once; returns them once each has started."""
        first = len(self.procs)
        new = [Proc(f"watcher-{first + i}", [sys.executable, "manage.py", "watch_pools", "--poll", str(self.poll)],
                    env=self.env, log=self.logdir / f"watcher-{first + i}.log", ready="watcher: started")
               for i in range(count)]  # fmt: skip
        self.procs += new
        together(*(proc.start for proc in new))
        return new

    @property
    def live(self) -> list[Proc]:
        return [proc for proc in self.procs if proc.proc is not None and proc.proc.poll() is None]

    def pause(self, *procs: Proc) -> None:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGSTOP)

    def resume(self, *procs: Proc) -> None:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGCONT)

    def stop_all(self) -> None:
        procs = self.live
        self.resume(*procs)  # a paused process would not hear SIGTERM
        together(*(proc.stop for proc in procs), lambda: None)

    def logs(self) -> str:
        return dump_logs(*self.procs)


def ident(proc: Proc) -> str:
    """How the watcher process names itself: in its lock session (after ``eac-watcher ``) and in Pool.watcher."""
    return process_ident(pid=proc.pid)


def lock_holders() -> dict[int, list[str]]:
    """{pool id: the processes holding its watcher lock}, by ident (a ``--pool`` process's too): one at most, or
    PostgreSQL is broken."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT l.objid, a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                       " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objsubid = 2"
                       " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                       [NAMESPACE])  # fmt: skip
        holders: dict[int, list[str]] = {}
        for key, name in cursor.fetchall():
            holders.setdefault(int(key), []).append(name.removeprefix(PREFIX).removesuffix(SCOPED))
        return holders


def watched_by(pool_ids) -> dict[int, str | None]:
    """{pool id: the ident of the one process holding its lock and named by its Pool.watcher}; None for a pool
    held by nobody, by several, or whose Pool.watcher names another than its holder."""
    from inventory.models import Pool

    holders = lock_holders()
    recorded = dict(Pool.objects.filter(pk__in=pool_ids).values_list("pk", "watcher"))
    result: dict[int, str | None] = {}
    for pk in pool_ids:
        held = holders.get(pk, [])
        result[pk] = held[0] if len(held) == 1 and recorded.get(pk) == held[0] else None
    return result


def watched_once(pool_ids, procs: list[Proc]) -> dict[int, str] | None:
    """{pool id: ident} if every pool is watched by exactly one of ``procs`` (its lock and its Pool.watcher),
    else None."""
    owners = watched_by(pool_ids)
    idents = {ident(proc) for proc in procs}
    if all(owner in idents for owner in owners.values()):
        return owners  # type: ignore[return-value]
    return None


def loads(owners: dict[int, str], procs: list[Proc]) -> list[int]:
    """How many pools each of ``procs`` watches, in their order."""
    return [sum(1 for owner in owners.values() if owner == ident(proc)) for proc in procs]


def duplicate_vm_rows(pool_ids) -> list[tuple]:
    """(pool, uuid, count) of every VM uuid with more than one row in a pool: none, ever."""
    from django.db.models import Count

    from inventory.models import VM

    return list(VM.objects.filter(pool_id__in=pool_ids).values("pool_id", "uuid").annotate(n=Count("id"))
                .filter(n__gt=1).values_list("pool_id", "uuid", "n"))  # fmt: skip


def vm_call(sim, method: str, uuid: str, *args) -> None:
    """Call ``VM.<method>`` on the simulated pool as any XAPI client would."""
    session = xapi_login(sim.url, sim.user, sim.password)
    try:
        getattr(session.xenapi.VM, method)(session.xenapi.VM.get_by_uuid(uuid), *args)
    finally:
        session.xenapi.session.logout()
