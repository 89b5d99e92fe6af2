"""Which ``watch_pools`` process watches which pool: a PostgreSQL advisory lock per pool, and shares.

**One writer per pool.** Two watcher processes writing every row of the same pool would fight; so the
``Supervisor`` takes a pool's lock before it starts the pool's watcher, with ``pg_try_advisory_lock`` on a
connection of its own, and holds it for as long as it watches the pool. The lock belongs to that database
session, so it goes with the process: a watcher killed, or whose session was cut (PostgreSQL restarted), holds
nothing any more, and another process takes the pool over at its next reconcile. Whatever the shares below
say, the lock is what keeps a pool to one process.

**Shares.** Several ``watch_pools`` processes (on one machine or several, on the same database) share the
pools. The live ones are the database sessions named ``eac-watcher <host>:<pid>`` (this connection's
``application_name``), so PostgreSQL, which ends a dead client's session, is the only membership list there
is: no heartbeat table, no cluster manager. At every reconcile each process reads that list and the locks held
(``survey``), and computes the same ``shares`` from them: every live process gets ``pools // processes`` pools
or one more; a process keeps the pools it holds up to its quota (a change of membership moves as few pools as
it can), and a pool nobody holds goes to the process that ranks it highest by rendezvous hashing among those
under quota. A process over its quota (a newcomer arrived) stops the watchers of its excess pools and lets go
of their locks; the process they are assigned to takes them at its next reconcile.

A process started with ``--pool NAME`` does not share: it is named ``eac-watcher <host>:<pid> --pool`` and
takes its pools whenever nobody holds them, as before shares existed; the sharing processes leave the pools
it holds out of their shares and count it out of the members (they cannot know which pools it would take).

The connection is the Supervisor's alone (its thread), apart from the connections Django gives each thread,
which the watcher threads close on any database error: closing those must not let go of a lock. Its session
sends TCP keepalives, so that the session of a watcher whose machine vanished from the network (no FIN) ends,
and its pools are taken over, within a quarter of a minute rather than the kernel's two hours.

On SQLite (the embedded demo) there is no lock and no share: the demo runs one watcher process.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections

# The first key of the two-key form ("eAC" and 1), so that the pools' locks collide with no other advisory lock
# taken on the database; the second key is the pool's id.
NAMESPACE = 0x65414301
# application_name of a watcher's lock session: PREFIX + "<host>:<pid>" (+ SCOPED for a --pool watcher).
PREFIX = "eac-watcher "
SCOPED = " --pool"
# PostgreSQL keeps the first NAMEDATALEN - 1 bytes of an application_name.
NAME_MAX = 63
# Server-side TCP keepalive of the lock session: a silent peer is declared gone after about 5 + 3 * 3 s.
KEEPALIVES = {"tcp_keepalives_idle": "5", "tcp_keepalives_interval": "3", "tcp_keepalives_count": "3"}


def process_ident(shares: bool = True, pid: int | None = None) -> str:
    """``<host>:<pid>`` of this process (or of ``pid`` on this host), the host cut short so that the whole
    application_name fits PostgreSQL's limit."""
    suffix = f":{os.getpid() if pid is None else pid}"
    room = NAME_MAX - len(PREFIX) - len(suffix) - (0 if shares else len(SCOPED))
    return socket.gethostname().encode("ascii", "replace").decode()[:room] + suffix


@dataclass(frozen=True)
class Survey:
    """What the database says at one instant: the live watcher processes and who holds which pool's lock."""

    members: frozenset[str]  # idents of the live processes that share the pools
    scoped: frozenset[str]  # idents of the live --pool processes
    holders: Mapping[int, str]  # lock key -> ident of the holding process (or "backend <pid>")

    def holder(self, pool_id: int) -> str | None:
        return self.holders.get(_key(pool_id))

    def alive(self, ident: str) -> bool:
        return ident in self.members or ident in self.scoped


class PoolLocks:
    """The advisory locks of the pools this process watches, on one dedicated connection."""

    def __init__(self, alias: str = DEFAULT_DB_ALIAS, *, shares: bool = True) -> None:
        self.alias = alias
        self.needed = connections[alias].vendor == "postgresql"
        self.held: set[int] = set()
        self._conn = None
        # What Pool.watcher records, and what the other processes see of this one (its session's name).
        self.ident = process_ident(shares)
        self.name = PREFIX + self.ident + ("" if shares else SCOPED)

    def _cursor(self):
        if self._conn is None:
            conn = connections.create_connection(self.alias)
            with conn.cursor() as cursor:
                cursor.execute("SELECT set_config('application_name', %s, false)", [self.name])
                for setting, value in KEEPALIVES.items():  # ignored on a Unix socket
                    cursor.execute("SELECT set_config(%s, %s, false)", [setting, value])
            self._conn = conn
        return self._conn.cursor()

    def acquire(self, pool_id: int) -> bool:
        """Take the pool's lock if nobody holds it (never waits). Raises DatabaseError."""
        if not self.needed or pool_id in self.held:
            return True
        try:
            with self._cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", [NAMESPACE, _key(pool_id)])
                taken = cursor.fetchone()[0]
        except DatabaseError:
            self._lost()
            raise
        if taken:
            self.held.add(pool_id)
        return taken

    def release(self, pool_id: int) -> None:
        if pool_id not in self.held:
            return
        self.held.discard(pool_id)
        try:
            with self._cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s, %s)", [NAMESPACE, _key(pool_id)])
        except DatabaseError:
            self._lost()  # the session is gone, and the lock with it

    def survey(self) -> Survey | None:
        """The live watcher processes (this one included: the query runs in its session) and the holders of the
        pools' locks, in this database; None without locks (SQLite). Raises DatabaseError, the locks then lost."""
        if not self.needed:
            return None
        try:
            with self._cursor() as cursor:
                cursor.execute("SELECT application_name FROM pg_stat_activity WHERE datname = current_database()"
                               " AND starts_with(application_name, %s)", [PREFIX])  # fmt: skip
                names = [row[0] for row in cursor.fetchall()]
                cursor.execute(
                    "SELECT l.objid, a.application_name, l.pid FROM pg_locks l"
                    " LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
                    " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objsubid = 2"
                    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                    [NAMESPACE])  # fmt: skip
                locks = cursor.fetchall()
        except DatabaseError:
            self._lost()
            raise
        members = frozenset(_ident(n) for n in names if not n.endswith(SCOPED))
        scoped = frozenset(_ident(n) for n in names if n.endswith(SCOPED))
        holders = {int(key): _ident(name) if (name or "").startswith(PREFIX) else f"backend {pid}"
                   for key, name, pid in locks}  # fmt: skip
        return Survey(members, scoped, holders)

    def close(self) -> None:
        self.held.clear()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _lost(self) -> None:
        self.held.clear()
        if self._conn is not None:
            with contextlib.suppress(DatabaseError):  # a connection already cut may complain
                self._conn.close()
            self._conn = None


def shares(pools: Iterable[int], members: Collection[str], holders: Mapping[int, str]) -> dict[int, str]:
    """{pool id: the member process that should watch it}, the same in every process that sees the same
    ``members`` (idents of the live sharing processes) and ``holders`` ({pool id: ident of its lock's holder}).

    A pool held by a live process that is not a member (a ``--pool`` watcher) is left out. Each member's quota
    is ``len(pools) // len(members)``, one more for the ``len(pools) % len(members)`` members holding the most
    (ties by name): so a member keeps what it holds up to its quota, the pools it ranks highest first, and only
    the excess moves. A pool left over goes to the member under quota that ranks it highest."""
    members = sorted(set(members))
    if not members:
        return {}
    shared = sorted(pk for pk in set(pools) if pk not in holders or holders[pk] in members)
    held = {m: sorted((pk for pk in shared if holders.get(pk) == m), key=lambda pk: -rank(pk, m)) for m in members}
    base, extra = divmod(len(shared), len(members))
    by_load = sorted(members, key=lambda m: (-len(held[m]), m))
    quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(by_load)}
    assigned: dict[int, str] = {}
    for m in members:
        for pk in held[m][:quota[m]]:
            assigned[pk] = m
    load = {m: min(len(held[m]), quota[m]) for m in members}
    for pk in shared:
        if pk not in assigned:
            m = max((m for m in members if load[m] < quota[m]), key=lambda m: rank(pk, m))
            assigned[pk] = m
            load[m] += 1
    return assigned


def rank(pool_id: int, ident: str) -> int:
    """Rendezvous hashing: how much the process ``ident`` wants the pool (the highest wins)."""
    return int.from_bytes(hashlib.blake2b(f"{pool_id}:{ident}".encode(), digest_size=8).digest(), "big")


def _ident(application_name: str) -> str:
    return application_name.removeprefix(PREFIX).removesuffix(SCOPED)


def _key(pool_id: int) -> int:
    # The two-key form takes int4s; a pool's id fits one in any real console.
    return pool_id % 2**31
