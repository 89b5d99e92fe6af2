"""One watcher per pool, whatever the number of ``watch_pools`` processes: a PostgreSQL advisory lock per pool.

Two watcher processes on one database (a second replica started by mistake, an old process not yet gone when
its replacement starts) would both write every row of the same pool. So the ``Supervisor`` takes a pool's lock
before it starts the pool's watcher, with ``pg_try_advisory_lock`` on a connection of its own, and holds it for
as long as it watches the pool. The lock belongs to that database session, so it goes with the process: a
watcher killed, or whose session was cut (PostgreSQL restarted), holds nothing any more, and the other
process, which tries again at every reconcile, takes the pool over within a poll interval.

The connection is the Supervisor's alone (its thread), apart from the connections Django gives each thread,
which the watcher threads close on any database error: closing those must not let go of a lock.

On SQLite (the embedded demo) there is no lock: the demo runs one watcher process, and SQLite has no session
locks to hold.
"""
from __future__ import annotations

import contextlib
import os
import socket

from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections

# The first key of the two-key form ("eAC" and 1), so that the pools' locks collide with no other advisory lock
# taken on the database; the second key is the pool's id.
NAMESPACE = 0x65414301


class PoolLocks:
    """The advisory locks of the pools this process watches, on one dedicated connection."""

    def __init__(self, alias: str = DEFAULT_DB_ALIAS) -> None:
        self.alias = alias
        self.needed = connections[alias].vendor == "postgresql"
        self.held: set[int] = set()
        self._conn = None
        # Shown as the holder (pg_stat_activity.application_name) to the processes waiting for a pool.
        self.name = f"eac-watcher {socket.gethostname()}:{os.getpid()}"

    def _cursor(self):
        if self._conn is None:
            self._conn = connections.create_connection(self.alias)
            with self._conn.cursor() as cursor:
                cursor.execute("SELECT set_config('application_name', %s, false)", [self.name])
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

    def still_held(self) -> bool:
        """False if the session holding the locks is gone (they were released with it): the caller must stop
        writing those pools. True when nothing is held."""
        if not self.held:
            return True
        try:
            with self._cursor() as cursor:
                cursor.execute("SELECT 1")
            return True
        except DatabaseError:
            self._lost()
            return False

    def holder(self, pool_id: int) -> str:
        """Who holds the pool's lock, for the log: the other process's name, or its backend's pid."""
        try:
            with self._cursor() as cursor:
                cursor.execute(
                    "SELECT a.application_name, l.pid FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
                    " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s"
                    " AND l.objsubid = 2 AND l.database = (SELECT oid FROM pg_database"
                    " WHERE datname = current_database())", [NAMESPACE, _key(pool_id)])  # fmt: skip
                row = cursor.fetchone()
        except DatabaseError:
            self._lost()
            return "unknown"
        if row is None:
            return "nobody any more"
        return row[0] or f"backend {row[1]}"

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


def _key(pool_id: int) -> int:
    # The two-key form takes int4s; a pool's id fits one in any real console.
    return pool_id % 2**31
