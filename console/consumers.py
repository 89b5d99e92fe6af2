"""Live updates of the console: one WebSocket per open page, at ``/ws/live/``.

The consumer refuses anonymous users and users who may see no pool, and joins the
channel-layer group of each pool the user may see (``pools_visible_to``), and ``pools.all``, where
``pools.change`` says that a pool was registered or removed: the socket then joins or leaves that pool's
group and the page resyncs. The watcher
emits ``inventory.change`` (one object added, modified or deleted) and ``inventory.resync``
(a pool was read again from scratch) to those groups after commit, protection emits
``protection.change`` (a VM's protection changed) and alerts ``alerts.change``; the consumer renders
the fragments the page shows (tree rows and items, table rows, the detail panel) with the
templates the views use, and sends them for htmx to swap in by id.

The page tells the consumer what it shows with small JSON messages:
``{"view": "vms" | "vm:<uuid>" | "host:<uuid>" | "pool:<pk>" | "home", "open": [tree keys],
"rows": [VM uuids in the table], "query": the table's query string, "total": how many rows match,
"rendered_at": <epoch seconds of the page's render>}``. After a batch that touches VMs the table shows, the
consumer re-runs its query and, when rows entered, left or moved, sends ``refresh-table`` (``live_table``).
A pool renamed (in the console or in XAPI) or marked for removal makes the page resync: its name is in crumbs,
table cells and filter choices too, and a pool being removed shows nothing below it.

Events that arrive while a batch renders are coalesced into the next batch; each batch
costs a fixed handful of queries whatever its size. The reads are shared by all the
sockets of the process (``console.reads.SharedReads``): with twenty open pages one change is read and
rendered once, not twenty times.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import time
from collections.abc import Callable, Iterable

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.db.models import Q

from eac.permissions import (
    pools_visible_to,
    socket_user_now,
    user_can_change_protection,
    user_can_view,
    user_can_view_inventory,
)
from eac.realtime import ALERTS_GROUP, CLOSE_FORBIDDEN, POOLS_GROUP, client_message, pool_group, user_group
from inventory.models import VM, Host, Pool
from protection.selectors import vm_status_counts

from . import details
from . import nodes as sel
from . import tree as ui
from .context_processors import open_alerts_count
from .live_table import LiveTable
from .reads import MISSING, SharedReads, shared_reads

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024
MAX_ITEMS = 1000
VIEW_RE = re.compile(r"^(home|vms|vm:[0-9a-f-]{36}|host:[0-9a-f-]{36}|pool:\d{1,18})$")
UUID_RE = re.compile(r"^[0-9a-f-]{36}$")
# Changes of these classes can alter what a VM's or a host's page shows.
DETAIL_CLASSES = {"vm", "host", "pif", "pbd", "sr", "vbd", "vif", "vdi", "network", "pool", "protection"}
# Classes whose uuid is a VM's: a protection change re-renders its VM (tree items, row, page).
VM_CLASSES = ("vm", "protection")
# How long the first event of a batch waits for the rest of a burst (part of the 250 ms budget).
COALESCE_SECONDS = 0.005


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
        # pools.all before the pools are read: a pool registered meanwhile is not missed.
        self.joined = [POOLS_GROUP]
        await self.channel_layer.group_add(POOLS_GROUP, self.channel_name)
        pools = await database_sync_to_async(_visible_pools)(user)
        if pools is None:
            await self.close()
            return
        self.user = user
        self.pools: dict[str, int] = pools
        self.can_view_protection, self.can_change = await database_sync_to_async(_roles)(user)
        # user.<pk>: access.change when the user's rights change while the page is open.
        groups = [pool_group(uuid) for uuid in pools] + [ALERTS_GROUP, user_group(user.pk)]
        for group in groups:
            await self.channel_layer.group_add(group, self.channel_name)
        self.joined += groups
        self.view = ""
        self.view_pool: int | None = None  # the pool of the object the page shows
        self.rows: set[str] = set()
        self.table = LiveTable()  # the VM table's query, rows and count, when the page shows it
        self.open: set[str] = set()
        self.sent: dict[str, object] = {}  # DOM id -> the data of the fragment last sent
        self.status_counts: dict[int, dict[str, int]] = {}  # pool id -> the summary's counts
        # pool id -> its names and removal state as the page shows them (kept across resyncs, which render them anew)
        self.identities: dict[int, tuple] = {}
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
        rows = None
        if isinstance(message.get("rows"), list):
            rows = [r for r in message["rows"][:MAX_ITEMS] if isinstance(r, str) and UUID_RE.match(r)]
            self.rows = set(rows)
        if self.view == "vms":
            self.table.read(message, rows)
        else:
            self.table = LiveTable()
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
        """Did a visible pool change, or get registered or synced, between the page's render and this socket's
        opening?"""
        try:
            since = dt.datetime.fromtimestamp(rendered_at, tz=dt.UTC)
        except (OverflowError, OSError, ValueError):
            return True
        return Pool.objects.filter(
            Q(last_event_at__gt=since) | Q(created_at__gt=since) | Q(last_sync_at__gt=since),
            pk__in=self.pools.values(),
        ).exists()

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

    async def pools_change(self, event: dict) -> None:
        """A pool was registered, got its uuid, changed or was removed: join the groups of the pools the user may
        see now and leave the others. When they differ from the page's, the page resyncs: a new pool's header
        chip and tree node come with it, a removed one's go."""
        if not hasattr(self, "user"):
            return  # a socket being refused: it joined pools.all before its user was checked
        pools = await database_sync_to_async(_visible_pools)(self.user) or {}
        if pools == self.pools:
            # The same pools: one of them changed (renamed, being removed). Its sender told the pool's own group too
            # (inventory.change of class "pool"): its labels are read again there, and a new name or removal
            # state rebuilds the page (``_identity_changed``).
            return
        for uuid in pools.keys() - self.pools.keys():
            await self.channel_layer.group_add(pool_group(uuid), self.channel_name)
            self.joined.append(pool_group(uuid))
        for uuid in self.pools.keys() - pools.keys():
            await self.channel_layer.group_discard(pool_group(uuid), self.channel_name)
            self.joined.remove(pool_group(uuid))
            self.pending.pop(uuid, None)
            self.status_counts.pop(self.pools[uuid], None)
            self.identities.pop(self.pools[uuid], None)
        self.pools = pools
        self.view_pool = await database_sync_to_async(self._pool_of_view)()
        self.sent.clear()  # the page is rebuilt: the next batch sends every label
        await self.send(text_data=ui.control("resync"))

    async def alerts_change(self, event: dict) -> None:
        count = await database_sync_to_async(open_alerts_count)(self.user)
        await self.send(text_data=ui.alerts_counter(count, self.can_view_protection))

    async def access_change(self, event: dict) -> None:
        """The user's groups, permissions or account changed: the rule of ``connect`` again, on the user as
        the database has them now. No longer allowed: the socket closes (4403, the page stops retrying).
        Allowed with other rights: the page resyncs, rendered for what the user may do now."""
        user = await socket_user_now(self.scope)
        if await database_sync_to_async(_visible_pools)(user) is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        roles = await database_sync_to_async(_roles)(user)
        self.user = self.scope["user"] = user
        if roles != (self.can_view_protection, self.can_change):
            self.can_view_protection, self.can_change = roles
            self.sent.clear()
            await self.send(text_data=ui.control("resync"))

    # -- rendering ---------------------------------------------------------------------------------

    async def _flush(self) -> None:
        while self.pending:
            # A host crash is hundreds of events in a row: gather them into one batch.
            await asyncio.sleep(COALESCE_SECONDS)
            batch, since = self.pending, self.pending_at
            self.pending = {}
            # The batch's fragments first; then whether rows entered or left the table (a query).
            for step in (self._render, self._table_change):
                try:
                    messages = await step(batch, since)
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
        # The header's count of pools (shown above ui.HEADER_CHIPS pools; dropped by a page without it).
        pool_labels = tuple(ov.pool for ov in overviews.values())
        labels.append(("hdr-pools-summary", ui.pools_summary(pool_labels), ui.header_pools_summary))
        for ov in overviews.values():
            labels.append((f"hdr-{ov.pool.key}", ov.pool, ui.header_pool))
            labels.append((f"tree-{ov.pool.key}", ov.pool, ui.tree_pool_label))
            if self.view == "home":
                labels.append((f"card-{ov.pool.key}", ov.pool, ui.pool_card))
            labels += [(f"tree-{host.key}", host, ui.tree_host_label) for host in ov.hosts]
            labels.append((f"tree-{ov.halted.key}", ov.halted, ui.tree_group_label))
        # Pools being removed are left out of the summary, as their VMs are of the table its groups link to.
        removing = {pk for pk, ov in overviews.items() if ov.pool.removing}
        groups = sel.summary_groups(c for pk, c in self.status_counts.items() if pk not in removing)
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
        self.identities.update({pk: ov.pool.identity for pk, ov in overviews.items()})

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
        if any(self.pools.get(pool_uuid) not in overviews for pool_uuid in batch):
            return [ui.control("resync")]  # a pool was removed: the page is rebuilt without it
        if self._identity_changed(overviews):
            # Renamed (here or in XAPI), or being removed: its name is in crumbs, table cells and filter choices,
            # and a pool being removed loses its tree node's children: the page is rebuilt.
            self.sent.clear()
            return [ui.control("resync")]
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

    def _identity_changed(self, overviews: dict[int, sel.PoolOverview]) -> bool:
        """Did a pool's name, XAPI name or removal state change since the page was rendered (or last rebuilt)?
        Remembers them as they are now: the page is then rebuilt with them."""
        changed = False
        for pk, ov in overviews.items():
            before = self.identities.get(pk)
            changed |= before is not None and before != ov.pool.identity
            self.identities[pk] = ov.pool.identity
        return changed

    async def _table_change(self, batch: dict, since: float) -> list[str]:
        """``refresh-table`` when the batch changed which rows the page's table shows, in which order, or how many
        match (``console.live_table``)."""
        if self.view != "vms" or not self.table.affected_by(batch, self.pools):
            return []
        if not await self.table.changed(user=self.user, pools=self.pools, since=since, reads=shared_reads()):
            return []
        self.rows = set(self.table.rows)
        return [ui.control("refresh-table")]

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
