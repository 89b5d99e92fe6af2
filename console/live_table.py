"""What the live consumer knows of an open Virtual Machine Status table, and when a batch of changes alters it.

The page sends the query it was rendered with (filters, sort, page: the table's ``data-query``), its rows in
order and how many rows match. After a batch that touches VMs of a pool the table shows, the consumer re-runs
that query (``console.table.vm_table_page_rows``, shared by the sockets showing the same table) and, when a VM
started or stopped matching, moved in the sort or the count changed, asks the page to fetch the table again
(``refresh-table``). A row that only changes in place is re-rendered by the batch itself.

The query runs after the batch's fragments have gone, so it adds nothing to their way to the page; it holds
the thread the process's reads share for as long as it takes, some 25 ms at 10,000 VMs. Filtered or sorted on
the protection status (which evaluates every VM's) it takes 0.2 to 0.5 s there: a query that takes longer
than ``TIMEOUT_MS`` is given up, once, and that table is no longer followed until the page shows another one
(its rows still change in place), so that one open table never holds up the other pages' updates.
"""
from __future__ import annotations

import logging

from django.http import QueryDict

from . import nodes as sel
from . import table
from .reads import SharedReads

log = logging.getLogger(__name__)

TIMEOUT_MS = 150


class LiveTable:
    def __init__(self) -> None:
        self.params: QueryDict | None = None  # None: the page shows no table (or sent no query)
        self.rows: tuple[str, ...] = ()  # uuids of its rows, in order
        self.total: int | None = None  # how many rows match; None until known
        self.pool_pk: int | None = None  # the one pool its filter names, if any

    def read(self, message: dict, rows: list[str] | None) -> None:
        """What a page's message says of its table (``query``, ``total``; ``rows`` as the consumer checked them)."""
        query = message.get("query")
        if isinstance(query, str):
            self.params = table.vm_table_params(query)
            pool = self.params.get("pool", "") if self.params is not None else ""
            self.pool_pk = int(pool) if pool.isascii() and pool.isdigit() and len(pool) < 19 else None
        total = message.get("total")
        if isinstance(total, int) and not isinstance(total, bool):
            self.total = total
        if rows is not None:
            self.rows = tuple(rows)

    def affected_by(self, batch: dict[str, dict[str, dict[str, str]]], pools: dict[str, int]) -> bool:
        """May this batch ({pool uuid: {cls: {uuid: op}}}) change the table's rows? Only changes of VMs, of their
        protection or of what makes them candidates (``batch_moves_status``), in a pool the table shows: most
        batches are of other classes, and they cost no query."""
        if self.params is None:
            return False
        for pool_uuid, classes in batch.items():
            pk = pools.get(pool_uuid)
            if pk is None or self.pool_pk not in (None, pk):
                continue
            if classes.get("vm") or classes.get("protection") or sel.batch_moves_status(classes):
                return True
        return False

    async def changed(self, *, user, pools: dict[str, int], since: float, reads: SharedReads) -> bool:
        """Re-run the table's query (read after ``since``); True, with the new rows kept, when they differ."""
        params = self.params
        if params is None:
            return False
        # The rows depend on the user only through the pools they may see.
        key = ("table", tuple(sorted(pools.values())), params.urlencode())
        found = await reads.get(
            key, since, lambda: table.vm_table_page_rows(user=user, params=params, timeout_ms=TIMEOUT_MS)
        )
        if found is None:
            log.info("live: the VM table's query %s took over %d ms; its rows are no longer followed",
                     params.urlencode()[:200], TIMEOUT_MS)
            self.params = None
            return False
        rows, total = found
        if rows == self.rows and self.total in (None, total):
            return False
        self.rows, self.total = rows, total
        return True
