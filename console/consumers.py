"""Live updates of the console: one WebSocket per open page, at ``/ws/live/``.

The consumer refuses anonymous users and users who may see no pool, and joins the
channel-layer group of each pool the user may see (``pools_visible_to``). The watcher
emits ``inventory.change`` (one object added, modified or deleted) and ``inventory.resync``
(a pool was read again from scratch) to those groups after commit, protection emits
``protection.change`` (a VM's protection changed) and alerts ``alerts.change``; the consumer renders
the fragments the page shows (tree rows and items, table rows, the detail panel) with the
templates the views use, and sends them for htmx to swap in by id.

The page tells the consumer what it shows with small JSON messages:
``{"view": "vms" | "vm:<uuid>" | "host:<uuid>" | "pool:<pk>" | "home", "open": [tree keys],
"rows": [VM uuids in the table], "rendered_at": <epoch seconds of the page's render>}``.

Events that arrive while a batch renders are coalesced into the next batch; each batch
costs a fixed handful of queries whatever its size. The reads are shared by all the
sockets of the process (``SharedReads``): with twenty open pages one change is read and
rendered once, not twenty times.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import time
import weakref
from collections.abc import Callable, Hashable, Iterable

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from eac.permissions import pools_visible_to, user_can_change_protection, user_can_view, user_can_view_inventory
from eac.realtime import ALERTS_GROUP, client_message, pool_group
from inventory.models import VM, Host, Pool
from protection.selectors import vm_status_counts

from . import details
from . import nodes as sel
from . import tree as ui
from .context_processors import open_alerts_count

log = logging.getLogger(__name__)

# Close code for a socket whose user may not see the inventory (the page does not retry).
CLOSE_FORBIDDEN = 4403
MAX_MESSAGE = 64 * 1024
MAX_ITEMS = 1000
VIEW_RE = re.compile(r"^(home|vms|vm:[0-9a-f-]{36}|host:[0-9a-f-]{36}|pool:\d{1,18})$")
UUID_RE = re.compile(r"^[0-9a-f-]{36}$")
# Changes of these classes can alter what a VM's or a host's page shows.
DETAIL_CLASSES = {"vm", "host", "pif", "pbd", "sr", "vbd", "vif", "vdi", "network", "pool", "protection"}
# Classes whose uuid is a VM's: a protection change re-renders its VM (tree items, row, page).
VM_CLASSES = ("vm", "protection")
MISSING = object()
# How long the first event of a batch waits for the rest of a burst (part of the 250 ms budget).
COALESCE_SECONDS = 0.005


class SharedReads:
    """Database reads shared by the consumers of one event loop.

    A read serves a consumer if it starts after the consumer received the event that asked
    for it: the watcher emits after commit, so such a read sees the change. A new read is
    scheduled ``GATHER`` seconds ahead; consumers that ask for the same kind of read before
    it starts add their keys to it, so the sockets of a process that got the same change a
    few milliseconds apart cause one query. A consumer that goes away cancels nothing.
    """

    GATHER = 0.008
    TTL = 10.0

    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[float, asyncio.Future]] = {}
        self._gathering: dict[Callable, tuple[float, set, asyncio.Future]] = {}
        self._pruned = time.monotonic()

    async def get_many(self, keys: Iterable[Hashable], since: float, fetch: Callable[[list], dict]) -> dict:
        self._prune()
        waits: list[tuple[Hashable, asyncio.Future]] = []
        missing: list[Hashable] = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None and entry[0] >= since:
                waits.append((key, entry[1]))
            else:
                missing.append(key)
        if missing:
            gathering = self._gathering.get(fetch)
            if gathering is None or gathering[2].done():
                start_at = max(time.monotonic(), since) + self.GATHER
                gathering = (start_at, set(), asyncio.ensure_future(self._read_at(start_at, fetch)))
                self._gathering[fetch] = gathering
            start_at, gathered, future = gathering
            gathered.update(missing)
            for key in missing:
                self._entries[key] = (start_at, future)
            waits += [(key, future) for key in missing]
        results = {}
        for key, future in waits:
            data = await asyncio.shield(future)
            results[key] = data.get(key, MISSING)
        return results

    async def _read_at(self, start_at: float, fetch: Callable[[list], dict]) -> dict:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        keys = self._gathering[fetch][1]
        del self._gathering[fetch]  # from now on a new read is needed: this one may have started
        return await database_sync_to_async(fetch)(list(keys))

    async def get(self, key: Hashable, since: float, fetch: Callable[[], object]) -> object:
        result = await self.get_many([key], since, _single(key, fetch))
        return result[key]

    def _prune(self) -> None:
        now = time.monotonic()
        if now - self._pruned < 1.0:
            return
        self._pruned = now
        stale = [k for k, (started, fut) in self._entries.items() if now - started > self.TTL and fut.done()]
        for key in stale:
            fut = self._entries.pop(key)[1]
            if not fut.cancelled():
                fut.exception()  # retrieved: no "exception never retrieved" warning


def _single(key: Hashable, fetch: Callable[[], object]) -> Callable[[list], dict]:
    return lambda keys: {key: fetch()}


_shared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared_reads() -> SharedReads:
    loop = asyncio.get_running_loop()
    reads = _shared.get(loop)
    if reads is None:
        reads = _shared[loop] = SharedReads()
    return reads


def _visible_pools(user) -> dict[str, int] | None:
    """{pool uuid: pool id} of the pools the user may see; None if the user may see none."""
    if not user_can_view_inventory(user):
        return None
    return dict(pools_visible_to(user).exclude(uuid="").values_list("uuid", "pk"))


def _roles(user) -> tuple[bool, bool]:
    """(may see protection and alerts, may change protection): what the pushed fragments offer."""
    return user_can_view(user), user_can_change_protection(user)


def _overviews(keys: list) -> dict:
    return {("ov", pk): ov for pk, ov in sel.pool_overviews([k[1] for k in keys]).items()}


async def _nothing() -> dict:
    return {}


def _status_counts(keys: list) -> dict:
    return {("status", pk): counts for pk, counts in vm_status_counts([k[1] for k in keys]).items()}


def _vm_nodes(keys: list) -> dict:
    by_pool: dict[int, list[str]] = {}
    for _, pool_pk, uuid in keys:
        by_pool.setdefault(pool_pk, []).append(uuid)
    found = {}
    for pool_pk, uuids in by_pool.items():
        for uuid, node in sel.vm_nodes_by_uuid(pool_id=pool_pk, uuids=uuids).items():
            found[("vm", pool_pk, uuid)] = node
    return found


def _gone_panel(dom_id: str, what: str) -> str:
    return (
        f'<section id="{dom_id}" class="detail"><div class="card empty-state">'
        f"<h2>This {what} no longer exists</h2><p>It was removed from the pool.</p></div></section>"
    )


class LiveConsumer(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close()  # before accept: the handshake is refused
            return
        pools = await database_sync_to_async(_visible_pools)(user)
        if pools is None:
            await self.close()
            return
        self.user = user
        self.pools: dict[str, int] = pools
        self.can_view_protection, self.can_change = await database_sync_to_async(_roles)(user)
        self.joined = [pool_group(uuid) for uuid in pools] + [ALERTS_GROUP]
        for group in self.joined:
            await self.channel_layer.group_add(group, self.channel_name)
        self.view = ""
        self.view_pool: int | None = None  # the pool of the object the page shows
        self.rows: set[str] = set()
        self.open: set[str] = set()
        self.sent: dict[str, object] = {}  # DOM id -> the data of the fragment last sent
        self.status_counts: dict[int, dict[str, int]] = {}  # pool id -> the summary's counts
        self.pending: dict[str, dict[str, dict[str, str]]] = {}
        self.pending_at = 0.0
        self.flusher: asyncio.Future | None = None
        await self.accept()

    async def disconnect(self, code: int) -> None:
        flusher = getattr(self, "flusher", None)
        if flusher is not None:
            flusher.cancel()
        for group in getattr(self, "joined", []):
            await self.channel_layer.group_discard(group, self.channel_name)

    # -- what the page tells us ----------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        message = client_message(text_data, max_size=MAX_MESSAGE)
        if message is None:
            return
        view = message.get("view")
        if isinstance(view, str) and view != self.view:
            self.view = view if VIEW_RE.match(view) else ""
            self.view_pool = await database_sync_to_async(self._pool_of_view)()
        if isinstance(message.get("open"), list):
            self.open = {k for k in message["open"][:MAX_ITEMS] if isinstance(k, str) and ui.KEY_RE.match(k)}
        if isinstance(message.get("rows"), list):
            self.rows = {r for r in message["rows"][:MAX_ITEMS] if isinstance(r, str) and UUID_RE.match(r)}
        rendered_at = message.get("rendered_at")
        if isinstance(rendered_at, int | float) and not self.sent:
            if await database_sync_to_async(self._changed_since)(rendered_at):
                await self.send(text_data=ui.control("resync"))
            else:
                await self._baseline(rendered_at)

    def _pool_of_view(self) -> int | None:
        kind, _, ident = self.view.partition(":")
        pools = self.pools.values()
        if kind == "vm":
            return VM.objects.filter(uuid=ident, pool_id__in=pools).values_list("pool_id", flat=True).first()
        if kind == "host":
            return Host.objects.filter(uuid=ident, pool_id__in=pools).values_list("pool_id", flat=True).first()
        if kind == "pool":
            return int(ident) if int(ident) in pools else None
        return None

    def _changed_since(self, rendered_at: float) -> bool:
        """Did a visible pool change between the page's render and this socket's opening?"""
        try:
            since = dt.datetime.fromtimestamp(rendered_at, tz=dt.UTC)
        except (OverflowError, OSError, ValueError):
            return True
        return Pool.objects.filter(pk__in=self.pools.values(), last_event_at__gt=since).exists()

    # -- what the channel layer brings -----------------------------------------------------------

    async def inventory_change(self, event: dict) -> None:
        pool_uuid = event.get("pool")
        if pool_uuid not in self.pools:
            return  # not a pool this user may see
        classes = self.pending.setdefault(pool_uuid, {})
        classes.setdefault(str(event.get("cls", "")), {})[str(event.get("uuid", ""))] = str(event.get("op", "mod"))
        self.pending_at = time.monotonic()
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.ensure_future(self._flush())

    async def protection_change(self, event: dict) -> None:
        """A VM's protection changed: re-render it as a change of class "protection" (which may also
        move it between the summary's groups)."""
        await self.inventory_change({"pool": event.get("pool"), "cls": "protection", "uuid": event.get("vm"),
                                     "op": "mod"})

    async def inventory_resync(self, event: dict) -> None:
        if event.get("pool") in self.pools:
            self.sent.clear()  # anything may have changed: the next batch sends every label
            self.status_counts.pop(self.pools[event["pool"]], None)
            await self.send(text_data=ui.control("resync"))

    async def alerts_change(self, event: dict) -> None:
        count = await database_sync_to_async(open_alerts_count)(self.user)
        await self.send(text_data=ui.alerts_counter(count, self.can_view_protection))

    # -- rendering ---------------------------------------------------------------------------------

    async def _flush(self) -> None:
        while self.pending:
            # A host crash is hundreds of events in a row: gather them into one batch.
            await asyncio.sleep(COALESCE_SECONDS)
            batch, since = self.pending, self.pending_at
            self.pending = {}
            try:
                messages = await self._render(batch, since)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("live: could not render a batch of changes; asking the page to resync")
                messages = [ui.control("resync")]
            for text in messages:
                if text:
                    await self.send(text_data=text)

    def _labels(self, overviews: dict[int, sel.PoolOverview]) -> list[tuple[str, object, Callable[[object], str]]]:
        """(DOM id, data, renderer) of every label the page may show: pools (header, tree, home
        card), hosts, halted groups and the summary's groups."""
        labels: list[tuple[str, object, Callable[[object], str]]] = []
        for ov in overviews.values():
            labels.append((f"hdr-{ov.pool.key}", ov.pool, ui.header_pool))
            labels.append((f"tree-{ov.pool.key}", ov.pool, ui.tree_pool_label))
            if self.view == "home":
                labels.append((f"card-{ov.pool.key}", ov.pool, ui.pool_card))
            labels += [(f"tree-{host.key}", host, ui.tree_host_label) for host in ov.hosts]
            labels.append((f"tree-{ov.halted.key}", ov.halted, ui.tree_group_label))
        groups = sel.summary_groups(self.status_counts.values())
        labels += [(f"tree-{group.key}", group, ui.tree_group_label) for group in groups]
        if self.view == "home":
            labels.append(("home-summary", tuple(groups), ui.summary_card))
        return labels

    async def _read_labels(self, since: float, counts_for: Iterable[int]) -> dict[int, sel.PoolOverview]:
        reads = shared_reads()
        all_pools = sorted(self.pools.values())
        overviews = await reads.get_many([("ov", pk) for pk in all_pools], since, _overviews)
        # The summary's counts are dearer (disks of every VM): read only when they may have moved.
        wanted = {pk for pk in counts_for} | {pk for pk in all_pools if pk not in self.status_counts}
        if wanted:
            counts = await reads.get_many([("status", pk) for pk in sorted(wanted)], since, _status_counts)
            self.status_counts.update({key[1]: c for key, c in counts.items() if c is not MISSING})
        return {key[1]: ov for key, ov in overviews.items() if ov is not MISSING}

    async def _baseline(self, rendered_at: float) -> None:
        """What a page rendered at ``rendered_at`` shows: labels are then sent only when they change."""
        since = time.monotonic() - max(0.0, time.time() - rendered_at)
        overviews = await self._read_labels(since, ())
        self.sent.update({dom_id: data for dom_id, data, _ in self._labels(overviews)})

    async def _render(self, batch: dict, since: float) -> list[str]:
        reads = shared_reads()
        parts: list[str] = []
        rows: list[str] = []

        # Labels: only those whose data differ from what this page was last sent.
        moved = [self.pools[pool_uuid] for pool_uuid, classes in batch.items() if sel.batch_moves_status(classes)]
        vm_keys = sorted({
            ("vm", self.pools[pool_uuid], uuid)
            for pool_uuid, classes in batch.items()
            for cls in VM_CLASSES
            for uuid in classes.get(cls, {})
            if UUID_RE.match(uuid)
        })
        overviews, nodes = await asyncio.gather(
            self._read_labels(since, moved), reads.get_many(vm_keys, since, _vm_nodes) if vm_keys else _nothing()
        )
        if any(self.pools[pool_uuid] not in overviews for pool_uuid in batch):
            return [ui.control("resync")]  # a pool was removed: the page is rebuilt without it
        host_pool = {host.key: pk for pk, ov in overviews.items() for host in ov.hosts}
        for dom_id, data, render in self._labels(overviews):
            if self.sent.get(dom_id) != data:
                self.sent[dom_id] = data
                parts.append(render(data))

        # VMs: tree items (where the page has open nodes of that pool), table rows, the VM's page.
        open_pools = {host_pool.get(k) for k in self.open if k.startswith("host-")}
        open_pools |= {ov_pk for ov_pk, ov in overviews.items() if ov.halted.key in self.open}
        summary_open = "pvs" in self.open and any(k.startswith("pvs-") for k in self.open)
        for (_, pool_pk, uuid), node in nodes.items():
            if node is MISSING:
                parts += [ui.deleted(f"tree-vm-{uuid}", "li"), ui.deleted(f"tree-pvsvm-{uuid}", "li")]
                rows.append(ui.deleted(f"row-vm-{uuid}", "tr"))
                continue
            if pool_pk in open_pools:
                parts.append(ui.tree_vm(node))
            if summary_open:
                parts.append(ui.tree_vm(node, True))
            if self.view == "vms" and uuid in self.rows:
                rows.append(ui.vm_row(node, self.can_change))

        detail = await self._detail(batch, since, reads)
        if detail:
            parts.append(detail)
        if rows:
            parts.append(ui.table_rows("".join(rows)))
        return ["".join(parts)]

    async def _detail(self, batch: dict, since: float, reads: SharedReads) -> str:
        """The panel of the object the page shows, when this batch may have changed it."""
        kind, _, ident = self.view.partition(":")
        if kind not in ("vm", "host", "pool") or self.view_pool is None:
            return ""
        changes = next((c for uuid, c in batch.items() if self.pools.get(uuid) == self.view_pool), None)
        if not changes:
            return ""
        if kind == "vm":
            relevant = any(ident in changes.get(c, {}) for c in VM_CLASSES) or any(
                c in DETAIL_CLASSES - set(VM_CLASSES) for c in changes
            )
        else:
            relevant = any(c in DETAIL_CLASSES for c in changes)
        if not relevant:
            return ""
        user = self.user

        def render() -> str:
            if kind == "vm":
                detail = details.vm_detail(user=user, uuid=ident)
                return ui.vm_detail_panel(detail) if detail else _gone_panel(f"vm-{ident}", "VM")
            if kind == "host":
                detail = details.host_detail(user=user, uuid=ident)
                return ui.host_detail_panel(detail) if detail else _gone_panel(f"host-{ident}", "host")
            detail = details.pool_detail(user=user, pk=int(ident))
            return ui.pool_detail_panel(detail) if detail else ""

        # Shared by the sockets showing the same page, as long as their users may do the same things.
        return await reads.get(("detail", self.view, self.can_view_protection, self.can_change), since, render)
