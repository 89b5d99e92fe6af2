"""Live updates of the console: one WebSocket per open page, at ``/ws/live/``.

The consumer refuses anonymous users and users who may see no pool. Of the pools the user may see
(``pools_visible_to``) it follows in detail those whose VMs the page shows (the *focus*: the pool of the object
shown, the pools of the VM table, the pools of open tree nodes that list VMs) by their groups ``pool.<uuid>``:
the watcher emits ``inventory.change`` (the objects a batch added, modified or deleted) and ``inventory.resync``
(the pool was read again from scratch) there after commit, protection emits ``protection.change`` (a VM's
protection changed). Each message carries its sender's stream and sequence number (``eac.realtime``): a number
that skips means the channel layer dropped one, and the page resyncs rather than show that pool stale. The other
pools are shown only by their labels (header chip, folded tree node, home card, the summary's counts): for them,
``pools.summary`` brings ``inventory.summary``, which pools changed lately, at most twice a second per sender.

So a page that shows one pool of twenty is not sent the changes of the other nineteen, which under load would
overflow its channel (channels_redis drops what exceeds a channel's capacity). It also joins ``pools.all``, where
``pools.change`` says that a pool was registered or removed: the socket then follows or leaves that pool and the
page resyncs; and ``alerts.all`` (``alerts.change``). The consumer renders the fragments the page shows (tree rows
and items, table rows, the detail panel) with the templates the views use, and sends them for htmx to swap in by
id.

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
rendered once, not twenty times. Changes come in two lanes (``Lane``), each with batches of its own: those of the
pools followed in detail, and the summaries of the others, whose labels are rendered at most every
``LABELS_INTERVAL`` (less often when reading them takes long: ``labels_interval``) and read on a thread of their
own; a batch reads the labels of the pools it is about only, the others' as last read, and sends its VMs (rows,
tree items, the object's panel) before its labels. Under load
(nineteen busy pools beside the one shown) a change of the shown pool thus never waits behind the others' labels.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import time
from collections.abc import Callable, Iterable

from channels.consumer import get_handler_name
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
from eac.realtime import (
    ALERTS_GROUP,
    CLOSE_FORBIDDEN,
    POOLS_GROUP,
    SUMMARY_GROUP,
    SUMMARY_INTERVAL,
    client_message,
    pool_group,
    user_group,
)
from inventory.models import VM, Host, Pool
from protection.selectors import vm_status_counts

from . import details
from . import nodes as sel
from . import tree as ui
from .context_processors import open_alerts_count
from .live_table import LiveTable
from .reads import MISSING, SharedReads, in_background, shared_reads

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024
MAX_ITEMS = 1000
VIEW_RE = re.compile(r"^(home|vms|vm:[0-9a-f-]{36}|host:[0-9a-f-]{36}|pool:\d{1,18})$")
UUID_RE = re.compile(r"^[0-9a-f-]{36}$")
# Changes of these classes can alter what a VM's or a host's page shows.
DETAIL_CLASSES = {"vm", "host", "pif", "pbd", "sr", "vbd", "vif", "vdi", "network", "pool", "protection"}
# Events whose handler only files the change for the next batch, with no database access: dispatched without the
# thread hop channels makes before every handler (close_old_connections), which waits behind the process's reads
# and, under load, let a socket's channel fill up (channels_redis then drops what comes).
QUEUED_EVENTS = frozenset({"inventory.change", "inventory.summary", "protection.change"})
# Classes whose uuid is a VM's: a protection change re-renders its VM (tree items, row, page).
VM_CLASSES = ("vm", "protection")
# How long the first event of a batch waits for the rest of a burst (part of the 250 ms budget).
COALESCE_SECONDS = 0.005
# A pool that enters the focus (a tree node opened, another page shown) may have changed between the render of what
# the page now shows of it and the socket joining its group: when it changed this recently, the page resyncs.
FOCUS_CATCHUP_SECONDS = 2.0
# A pool the page no longer shows is followed in detail this much longer: going back to it (the previous page, a
# node folded and opened again) then needs no catch-up.
FOCUS_LINGER_SECONDS = 10.0
# The labels of pools the page shows only by their labels are rendered again at most this often (what the summary
# of each sender already allows, ``eac.realtime.SUMMARY_INTERVAL``; a watcher of every pool sends one): under load the
# summaries of three watchers came six times a second, and each rendering read the labels of nineteen pools.
LABELS_INTERVAL = SUMMARY_INTERVAL
# ... and, when reading them takes long, so that the labels lane keeps at most this share of the time: under load (19
# busy pools of 2,500 VMs, 200 power operations a second on a 2-core machine) one read of their labels took 0.3 s
# (0.05 s alone), and reading them twice a second held back the changes of the pool the page shows. Never rarer
# than LABELS_MAX_INTERVAL.
LABELS_MAX_SHARE = 0.25
LABELS_MAX_INTERVAL = 5.0
# A batch of the pools followed in detail sent later than this after its first change is logged (INFO), with where
# the time went (the architecture's budget, event to DOM, is 250 ms at the 95th percentile).
SLOW_BATCH_SECONDS = 0.25
MAX_STREAMS = 256  # senders remembered per socket (each process that sends to a pool's group is one)


def labels_interval(cost: float) -> float:
    """Seconds from one rendering of the labels lane to the next, after one that took ``cost`` seconds."""
    return min(LABELS_MAX_INTERVAL, max(LABELS_INTERVAL, cost / LABELS_MAX_SHARE))


def _visible_pools(user) -> dict[str, int] | None:
    """{pool uuid: pool id} of the pools the user may see; None if the user may see none."""
    if not user_can_view_inventory(user):
        return None
    return dict(pools_visible_to(user).exclude(uuid="").values_list("uuid", "pk"))


def _changed_after(since: dt.datetime):
    """The pools that changed (in XAPI or in the console: renamed, marked for removal), or were registered or read
    again from scratch, after ``since``."""
    return Pool.objects.filter(
        Q(last_event_at__gt=since) | Q(created_at__gt=since) | Q(last_sync_at__gt=since)
        | Q(updated_at__gt=since) | Q(removing_since__gt=since)
    )


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


class Lane:
    """Changes waiting to be rendered, {pool uuid: {cls: {uuid: op}}} (the last op of an object wins), and the task
    that renders them. The consumer has two: the pools it follows in detail, and the pools it shows only by their
    labels, so that a change of a pool the page shows never waits behind the labels of the others."""

    def __init__(self, *, labels: bool) -> None:
        self.labels = labels
        self.changes: dict[str, dict[str, dict[str, str]]] = {}
        self.first = 0.0  # when the first change of the pending batch came (monotonic)
        self.last = 0.0  # when the last one came: a read that starts later sees them all
        self.done = float("-inf")  # when the last batch was taken
        self.cost = 0.0  # how long the last batch took to render and send (seconds)
        self.task: asyncio.Future | None = None

    def add(self, pool_uuid: str, changes: dict) -> None:
        now = time.monotonic()
        if not self.changes:
            self.first = now
        classes = self.changes.setdefault(pool_uuid, {})
        for cls, objects in changes.items():
            if isinstance(objects, dict):
                classes.setdefault(str(cls), {}).update({str(u): str(op) for u, op in objects.items()})
        self.last = now

    def take(self) -> tuple[dict[str, dict[str, dict[str, str]]], float, float]:
        """(the batch, when its first change came, when its last came); the lane is then empty."""
        batch, self.changes = self.changes, {}
        self.done = time.monotonic()
        return batch, self.first, self.last

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


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
        # user.<pk>: access.change when the user's rights change while the page is open. Until the page says
        # what it shows, every pool is followed in detail: the pools it shows are then never joined late.
        groups = [pool_group(uuid) for uuid in pools] + [SUMMARY_GROUP, ALERTS_GROUP, user_group(user.pk)]
        for group in groups:
            await self.channel_layer.group_add(group, self.channel_name)
        self.joined += groups
        self.focus: set[str] = set(pools)  # uuids of the pools followed in detail (pool.<uuid>); the others by summary
        self.lingering: dict[str, float] = {}  # pools of the focus the page no longer shows -> when to let go
        self.sequences: dict[tuple[str, str], int] = {}  # (pool uuid, sender stream) -> last sequence number
        self.view = ""
        self.view_pool: int | None = None  # the pool of the object the page shows
        self.rows: set[str] = set()
        self.table = LiveTable()  # the VM table's query, rows and count, when the page shows it
        self.open: set[str] = set()
        self.sent: dict[str, object] = {}  # DOM id -> the data of the fragment last sent
        self.status_counts: dict[int, dict[str, int]] = {}  # pool id -> the summary's counts
        # pool id -> its names and removal state as the page shows them (kept across resyncs, which render them anew)
        self.identities: dict[int, tuple] = {}
        self.details = Lane(labels=False)  # changes of the pools followed in detail
        self.labels = Lane(labels=True)  # changes of the others (their summaries)
        # pool id -> (its labels as last read, the time that read saw changes up to): a batch reads only the labels
        # of the pools it is about, the others' are at hand
        self.overviews: dict[int, tuple[sel.PoolOverview, float]] = {}
        await self.accept()

    async def dispatch(self, message: dict) -> None:
        if message.get("type") in QUEUED_EVENTS:
            await getattr(self, get_handler_name(message))(message)
            return
        await super().dispatch(message)

    async def disconnect(self, code: int) -> None:
        for lane in (getattr(self, "details", None), getattr(self, "labels", None)):
            if lane is not None:
                lane.cancel()
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
        first = isinstance(rendered_at, int | float) and not self.sent
        # Before the check of what changed since the render: a change committed meanwhile is then not missed.
        if await self._refocus(catch_up=not first, linger=not first):
            await self.send(text_data=ui.control("resync"))
            return
        if first:
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

    # -- which pools are followed in detail ------------------------------------------------------------------

    def _focus_now(self) -> set[str]:
        """The pools whose VMs the page shows: the object shown, the VM table's pools, open nodes that list VMs
        (a host, a pool's halted VMs: open even inside a folded pool, as the page keeps them), or every pool when
        the Protected VM Summary lists VMs."""
        uuid_of = {pk: uuid for uuid, pk in self.pools.items()}
        if self.view == "vms" and self.table.pool_pk is None:
            return set(self.pools)
        if "pvs" in self.open and any(k.startswith("pvs-") for k in self.open):
            return set(self.pools)
        focus = {uuid_of[pk] for pk in (self.view_pool, self.table.pool_pk) if pk in uuid_of}
        hosts = [k.removeprefix("host-") for k in self.open if k.startswith("host-")]
        if hosts:
            focus |= {uuid_of[pk] for pk in Host.objects.filter(uuid__in=hosts, pool_id__in=self.pools.values())
                      .values_list("pool_id", flat=True).distinct()}
        for key in self.open:
            if key.startswith("halted-"):
                ident = key.removeprefix("halted-")
                if ident in self.pools:
                    focus.add(ident)
                elif ident.startswith("p") and ident[1:].isdigit() and int(ident[1:]) in uuid_of:
                    focus.add(uuid_of[int(ident[1:])])
        return focus

    def _changed_lately(self, pool_uuids: set[str]) -> bool:
        since = dt.datetime.now(tz=dt.UTC) - dt.timedelta(seconds=FOCUS_CATCHUP_SECONDS)
        return _changed_after(since).filter(uuid__in=pool_uuids).exists()

    async def _refocus(self, *, catch_up: bool, linger: bool = True) -> bool:
        """Follow in detail the pools the page shows now, by summary the others (at once, or after
        ``FOCUS_LINGER_SECONDS``). True when a pool entering the focus changed too lately for what the page shows
        of it to be sure (``catch_up``): the page resyncs."""
        wanted = await database_sync_to_async(self._focus_now)()
        now = time.monotonic()
        for uuid in wanted:
            self.lingering.pop(uuid, None)
        for uuid in self.focus - wanted:
            self.lingering.setdefault(uuid, now + FOCUS_LINGER_SECONDS if linger else now)
        for uuid in [u for u, until in self.lingering.items() if until <= now]:
            await self._unfollow(uuid)
        entering = wanted - self.focus
        for uuid in entering:
            await self.channel_layer.group_add(pool_group(uuid), self.channel_name)
            self.joined.append(pool_group(uuid))
        self.focus |= entering
        return bool(catch_up and entering) and await database_sync_to_async(self._changed_lately)(entering)

    async def _unfollow(self, pool_uuid: str) -> None:
        """Follow a pool the page no longer shows by its summary only."""
        self.lingering.pop(pool_uuid, None)
        self.focus.discard(pool_uuid)
        await self.channel_layer.group_discard(pool_group(pool_uuid), self.channel_name)
        self.joined.remove(pool_group(pool_uuid))
        # What came of it and is not shown yet still changes its labels.
        if pending := self.details.changes.pop(pool_uuid, None):
            self._queue(self.labels, pool_uuid, pending)
        for key in [k for k in self.sequences if k[0] == pool_uuid]:
            del self.sequences[key]  # not followed meanwhile: its numbers will skip

    def _in_sequence(self, event: dict) -> bool:
        """False when the channel layer dropped a message of this pool's group before this one."""
        stream, seq = event.get("stream"), event.get("seq")
        if not isinstance(stream, str) or not isinstance(seq, int):
            return True  # not numbered (sent by hand)
        key = (str(event.get("pool")), stream)
        last = self.sequences.get(key)
        if last is not None and seq <= last:
            return True  # an older message overtaken by a newer one of the same sender
        if len(self.sequences) >= MAX_STREAMS and key not in self.sequences:
            self.sequences.clear()
        self.sequences[key] = seq
        return last is None or seq == last + 1

    def _changed_since(self, rendered_at: float) -> bool:
        """Did a visible pool change (in XAPI or in the console: renamed, marked for removal), or get registered or
        synced, between the page's render and this socket's opening?"""
        try:
            since = dt.datetime.fromtimestamp(rendered_at, tz=dt.UTC)
        except (OverflowError, OSError, ValueError):
            return True
        return _changed_after(since).filter(pk__in=self.pools.values()).exists()

    # -- what the channel layer brings -----------------------------------------------------------

    async def inventory_change(self, event: dict) -> None:
        pool_uuid = event.get("pool")
        changes = event.get("changes")
        if pool_uuid not in self.focus or pool_uuid not in self.pools or not isinstance(changes, dict):
            return  # not a pool this page follows in detail (any more), or not a pool this user may see
        if self.lingering.get(pool_uuid, float("inf")) <= time.monotonic():
            await self._unfollow(pool_uuid)
            return
        if not self._in_sequence(event):
            log.info("live: a message of pool %s was lost (a full channel); the page resyncs", pool_uuid)
            await self.inventory_resync({"pool": pool_uuid})
            return
        self._queue(self.details, pool_uuid, changes)

    def _queue(self, lane: Lane, pool_uuid: str, changes: dict) -> None:
        lane.add(pool_uuid, changes)
        if lane.task is None or lane.task.done():
            lane.task = asyncio.ensure_future(self._flush(lane))

    async def protection_change(self, event: dict) -> None:
        """A VM's protection changed: re-render it as a change of class "protection" (which may also
        move it between the summary's groups)."""
        await self.inventory_change({**event, "changes": {"protection": {str(event.get("vm")): "mod"}}})

    async def inventory_summary(self, event: dict) -> None:
        """Pools changed lately: of those the page shows only by their labels, read the labels again (and the
        summary counts when the change may move them). The classes come as pseudo-objects, which match no VM."""
        pools = event.get("pools")
        if not isinstance(pools, dict):
            return
        for pool_uuid, classes in pools.items():
            if pool_uuid in self.focus or pool_uuid not in self.pools or not isinstance(classes, dict):
                continue
            if "resync" in classes:
                # Read again from scratch (its first sync, a reconnect): hosts may have come or gone, which labels
                # cannot show.
                await self.inventory_resync({"pool": pool_uuid})
                return
            self._queue(self.labels, pool_uuid, {cls: {f"summary-{op}": str(op) for op in ops if isinstance(op, str)}
                                                 for cls, ops in classes.items() if isinstance(ops, list)})

    async def inventory_resync(self, event: dict) -> None:
        if event.get("pool") in self.pools:
            self._forget_sent()  # anything may have changed: the next batch sends every label
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
        for uuid in self.pools.keys() - pools.keys():
            if uuid in self.focus:
                await self.channel_layer.group_discard(pool_group(uuid), self.channel_name)
                self.joined.remove(pool_group(uuid))
            self.focus.discard(uuid)
            self.lingering.pop(uuid, None)
            self.details.changes.pop(uuid, None)
            self.labels.changes.pop(uuid, None)
            self.status_counts.pop(self.pools[uuid], None)
            self.identities.pop(self.pools[uuid], None)
        self.pools = pools
        self.view_pool = await database_sync_to_async(self._pool_of_view)()
        await self._refocus(catch_up=False, linger=False)  # the page resyncs anyway
        self._forget_sent()  # the page is rebuilt: the next batch sends every label
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
            self._forget_sent()
            await self.send(text_data=ui.control("resync"))

    # -- rendering ---------------------------------------------------------------------------------

    async def _flush(self, lane: Lane) -> None:
        while lane.changes:
            # A host crash is hundreds of events in a row: gather them into one batch. Labels only: at most every
            # LABELS_INTERVAL.
            wait = lane.done + labels_interval(lane.cost) - time.monotonic() if lane.labels else 0.0
            await asyncio.sleep(max(COALESCE_SECONDS, wait))
            batch, first, since = lane.take()
            started = time.monotonic()
            steps = []
            # The batch's VMs first, then its labels; then whether rows entered or left the table (a query).
            for step in (self._render_objects, self._render_labels, self._table_change):
                try:
                    messages = await step(batch, since, lane.labels)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("live: could not render a batch of changes; asking the page to resync")
                    messages = [ui.control("resync")]
                for text in messages:
                    if text:
                        await self.send(text_data=text)
                steps.append(time.monotonic())
            lane.cost = steps[-1] - started
            if not lane.labels and steps[0] - first > SLOW_BATCH_SECONDS:
                log.info("live: changes of %d pools sent %.0f ms after the first came (waited %.0f ms, objects "
                         "%.0f ms; then labels %.0f ms, the table %.0f ms)", len(batch), (steps[0] - first) * 1000,
                         (started - first) * 1000, (steps[0] - started) * 1000, (steps[1] - steps[0]) * 1000,
                         (steps[2] - steps[1]) * 1000)

    def _forget_sent(self) -> None:
        """The page is rebuilt: the next batch reads and sends every label."""
        self.sent.clear()
        self.overviews.clear()

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

    async def _read_labels(self, since: float, counts_for: Iterable[int], changed: Iterable[int] | None = None,
                           *, background: bool = False) -> dict[int, sel.PoolOverview]:
        """The labels of every pool: read after ``since`` for the pools that ``changed`` (all when None), as last
        read for the others (their own changes bring theirs). ``background``: on the thread of the labels' reads
        (``SharedReads``), for the pools shown only by their labels."""
        reads = shared_reads()
        all_pools = sorted(self.pools.values())
        fresh = set(all_pools if changed is None else changed) | {pk for pk in all_pools if pk not in self.overviews}
        # Reading the others again each batch cost a batch of the shown pool 0.15 s at 50,000 VMs (every 10 s, when
        # the shared reads expired): under load, the labels lane reads them anyway.
        found = await reads.get_many([("ov", pk) for pk in sorted(fresh)], since, _overviews, background=background)
        for (_, pk), ov in found.items():
            if ov is MISSING:
                self.overviews.pop(pk, None)  # removed: the batch makes the page resync
            elif since >= self.overviews.get(pk, (None, float("-inf")))[1]:
                # The other lane may have read it since: a read that saw less does not replace it.
                self.overviews[pk] = (ov, since)
        # The summary's counts are dearer (disks of every VM): read only when they may have moved.
        wanted = {pk for pk in counts_for} | {pk for pk in all_pools if pk not in self.status_counts}
        if wanted:
            counts = await reads.get_many([("status", pk) for pk in sorted(wanted)], since, _status_counts,
                                          background=background)
            self.status_counts.update({key[1]: c for key, c in counts.items() if c is not MISSING})
        return {pk: self.overviews[pk][0] for pk in all_pools if pk in self.overviews}

    async def _baseline(self, rendered_at: float) -> None:
        """What a page rendered at ``rendered_at`` shows: labels are then sent only when they change."""
        since = time.monotonic() - max(0.0, time.time() - rendered_at)
        overviews = await self._read_labels(since, ())
        self.sent.update({dom_id: data for dom_id, data, _ in self._labels(overviews)})
        self.identities.update({pk: ov.pool.identity for pk, ov in overviews.items()})

    async def _render_objects(self, batch: dict, since: float, labels: bool = False) -> list[str]:
        """The batch's VMs (tree items where the page has open nodes of their pool, table rows) and the panel of the
        object the page shows: sent before the labels, which read more (a pool's counts: 30 ms for 2,500 VMs, ten
        times that on a machine under load)."""
        if labels:
            return []  # the pools shown by their labels only: nothing of their VMs is on the page
        reads = shared_reads()
        vm_keys = sorted({
            ("vm", self.pools[pool_uuid], uuid)
            for pool_uuid, classes in batch.items()
            for cls in VM_CLASSES
            for uuid in classes.get(cls, {})
            if UUID_RE.match(uuid)
        })
        nodes, detail = await asyncio.gather(
            reads.get_many(vm_keys, since, _vm_nodes) if vm_keys else _nothing(),
            self._detail(batch, since, reads),
        )
        parts: list[str] = []
        rows: list[str] = []
        # Which pools have open nodes, from the labels as last read (a pool not read yet: its items go anyway).
        known = {pk: ov for pk, (ov, _) in self.overviews.items()}
        host_pool = {host.key: pk for pk, ov in known.items() for host in ov.hosts}
        open_pools = {host_pool.get(k) for k in self.open if k.startswith("host-")}
        open_pools |= {pk for pk, ov in known.items() if ov.halted.key in self.open}
        summary_open = "pvs" in self.open and any(k.startswith("pvs-") for k in self.open)
        for (_, pool_pk, uuid), node in nodes.items():
            if node is MISSING:
                parts += [ui.deleted(f"tree-vm-{uuid}", "li"), ui.deleted(f"tree-pvsvm-{uuid}", "li")]
                rows.append(ui.deleted(f"row-vm-{uuid}", "tr"))
                continue
            if pool_pk in open_pools or pool_pk not in known:
                parts.append(ui.tree_vm(node))
            if summary_open:
                parts.append(ui.tree_vm(node, True))
            if self.view == "vms" and uuid in self.rows:
                rows.append(ui.vm_row(node, self.can_change))
        if detail:
            parts.append(detail)
        if rows:
            parts.append(ui.table_rows("".join(rows)))
        return ["".join(parts)] if parts else []

    async def _render_labels(self, batch: dict, since: float, labels: bool = False) -> list[str]:
        """The labels the batch changed: only those whose data differ from what this page was last sent. For the
        pools shown by their labels only (``labels``), read on the thread of the background reads."""
        moved = [self.pools[pool_uuid] for pool_uuid, classes in batch.items()
                 if "resync" in classes or sel.batch_moves_status(classes)]
        changed = [self.pools[pool_uuid] for pool_uuid in batch if pool_uuid in self.pools]
        overviews = await self._read_labels(since, moved, changed, background=labels)
        if any(self.pools.get(pool_uuid) not in overviews for pool_uuid in batch):
            return [ui.control("resync")]  # a pool was removed: the page is rebuilt without it
        if self._identity_changed(overviews):
            # Renamed (here or in XAPI), or being removed: its name is in crumbs, table cells and filter choices,
            # and a pool being removed loses its tree node's children: the page is rebuilt.
            self._forget_sent()
            return [ui.control("resync")]
        changed = [(dom_id, data, render) for dom_id, data, render in self._labels(overviews)
                   if self.sent.get(dom_id) != data]
        if not changed:
            return []
        for dom_id, data, _ in changed:
            self.sent[dom_id] = data

        def render_all() -> str:
            return "".join(render(data) for _, data, render in changed)

        # The other pools' labels are rendered off the event loop (a hundred fragments under load); the shown pool's
        # few in line, with no thread hop.
        return [await in_background(render_all) if labels else render_all()]

    def _identity_changed(self, overviews: dict[int, sel.PoolOverview]) -> bool:
        """Did a pool's name, XAPI name or removal state change since the page was rendered (or last rebuilt)?
        Remembers them as they are now: the page is then rebuilt with them."""
        changed = False
        for pk, ov in overviews.items():
            before = self.identities.get(pk)
            changed |= before is not None and before != ov.pool.identity
            self.identities[pk] = ov.pool.identity
        return changed

    async def _table_change(self, batch: dict, since: float, labels: bool = False) -> list[str]:
        """``refresh-table`` when the batch changed which rows the page's table shows, in which order, or how many
        match (``console.live_table``). Not for a batch of labels: the table's pools are followed in detail."""
        if labels or self.view != "vms" or not self.table.affected_by(batch, self.pools):
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
