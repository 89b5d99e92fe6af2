"""The console's layout and fragments, rendered by one set of templates for the page and the live push.

Each fragment has one template under ``templates/console/fragments/`` whose root element
carries a stable id built from the object's uuid; a view includes it in the page and the
WebSocket consumer renders it alone and sends it, for htmx to swap in by id. DOM ids:

==========================  =========================================================
``hdr-pool-<uuid>``         the pool's chip in the header (connection state); above ``HEADER_CHIPS`` pools the
                            chips are in a menu whose button is ``hdr-pools-summary`` (how many, how many to see)
``card-pool-<uuid>``        the pool's card on the overview (per-pool counts)
``tree-pool-<uuid>``        the pool's row in the tree (label, state icon, mark)
``tree-host-<uuid>``        a host's row in the tree
``tree-halted-<pool uuid>`` the pool's "Halted VMs" row; ``tree-pvs-<status>`` a summary group
``tree-vm-<uuid>``          a VM's item under its host or its pool's halted VMs
``tree-pvsvm-<uuid>``       the same VM's item in the Protected VM Summary
``row-vm-<uuid>``           its row in the Virtual Machine Status table
``vm-<uuid>``, ``host-<uuid>``, ``pool-<uuid>``: the detail panel of the object's page
``alerts-counter``          the open-alerts counter (a link to the alerts page)
==========================  =========================================================

A tree node with children is ``li#ti-<key>`` holding the row ``#tree-<key>`` and the group
``ul#tg-<key>``; ``<key>`` is ``pool-<uuid>``, ``host-<uuid>``, ``halted-<pool uuid>``,
``pvs`` or ``pvs-<status>``. Which nodes are open is kept by the browser in a cookie, so
a page load (or a resync) renders them open, with their first page of children. Without the cookie
(a first visit), pools start open when there are at most ``OPEN_POOLS`` of them, folded above.
A pool being removed has a node without children.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from django.template.loader import render_to_string

from eac.permissions import pools_visible_to
from protection.selectors import vm_status_counts

from . import details
from . import nodes as sel

OPEN_COOKIE = "eac_tree"
KEY_RE = re.compile(r"^(pool-(p\d+|[0-9a-f-]{36})|host-[0-9a-f-]{36}|halted-(p\d+|[0-9a-f-]{36})|pvs(-[a-z0-9]+)?)$")
MAX_OPEN_WITH_CHILDREN = 30
# Below this many VMs in a pool, a first visit shows its hosts open; above, the tree starts folded.
SMALL_POOL = 100
# A first visit shows the pools open when there are at most this many; above, folded (their hosts still open
# as above, for when the user opens the pool).
OPEN_POOLS = 5
# The header shows a chip per pool up to this many pools; above, a count and a menu of the chips.
HEADER_CHIPS = 4


def parse_open_keys(raw: str | None) -> set[str] | None:
    """The open tree nodes from the cookie (None when there is none); bad entries are ignored."""
    if raw is None:
        return None
    keys = [k for k in raw.split(".")[:500] if KEY_RE.match(k)]
    return set(keys)


def default_open_keys(overviews: list[sel.PoolOverview]) -> set[str]:
    keys = {"pvs"}
    for ov in overviews:
        if len(overviews) <= OPEN_POOLS:
            keys.add(ov.pool.key)
        if ov.pool.vms_total <= SMALL_POOL:
            keys.update(h.key for h in ov.hosts)
            keys.add(ov.halted.key)
    return keys


@dataclass
class Node:
    """A tree node with children: a pool (its hosts and halted VMs), a host, or a group of VMs."""

    kind: str  # pool, host, group, summary
    key: str
    label: object  # PoolLabel, HostLabel or GroupLabel
    open: bool
    nodes: list[Node] = field(default_factory=list)
    children: sel.Children | None = None  # its VMs, when open and loaded with the page

    @property
    def loaded(self) -> bool:
        return bool(self.nodes) or self.children is not None


@dataclass(frozen=True)
class PoolsSummary:
    """The header's button when the pools are too many for a chip each: how many, and how many to look at."""

    total: int
    attention: int  # not connected, or a failed or degraded component below
    removing: int


def pools_summary(labels: tuple[sel.PoolLabel, ...]) -> PoolsSummary:
    return PoolsSummary(total=len(labels), attention=sum(1 for p in labels if p.attention),
                        removing=sum(1 for p in labels if p.removing))


@dataclass
class TreeContext:
    overviews: list[sel.PoolOverview]
    pools: list[Node]
    summary: Node

    @property
    def summary_groups(self) -> list[sel.GroupLabel]:
        """The Protected VM Summary's groups, as the overview page's card shows them."""
        return [node.label for node in self.summary.nodes]

    @property
    def header_menu(self) -> bool:
        """Too many pools for a chip each in the header: a count and a menu instead."""
        return len(self.overviews) > HEADER_CHIPS

    @property
    def pools_summary(self) -> PoolsSummary:
        return pools_summary(tuple(ov.pool for ov in self.overviews))


def build_tree(user, open_keys: set[str] | None) -> TreeContext:
    visible = pools_visible_to(user)
    pool_ids = list(visible.values_list("pk", flat=True))
    overviews = list(sel.pool_overviews(pool_ids).values())
    if open_keys is None:
        open_keys = default_open_keys(overviews)
    budget = [MAX_OPEN_WITH_CHILDREN]

    def leaf(kind: str, key: str, label: object, shown: bool) -> Node:
        node = Node(kind=kind, key=key, label=label, open=key in open_keys)
        # Only nodes the user can see (parents open too) get their VMs with the page, and a bounded number.
        if node.open and shown and budget[0] > 0:
            budget[0] -= 1
            node.children = sel.tree_children(pools=visible, key=key)
        return node

    pools = []
    for ov in overviews:
        pool_open = ov.pool.key in open_keys
        nodes = []
        if not ov.pool.removing:  # its rows are being deleted: nothing to open
            nodes = [leaf("host", h.key, h, pool_open) for h in ov.hosts]
            nodes.append(leaf("group", ov.halted.key, ov.halted, pool_open))
        pools.append(Node(kind="pool", key=ov.pool.key, label=ov.pool, open=pool_open, nodes=nodes))
    summary_open = "pvs" in open_keys
    counts = vm_status_counts([ov.pool.pk for ov in overviews if not ov.pool.removing]).values()
    groups = [leaf("group", g.key, g, summary_open) for g in sel.summary_groups(counts)]
    summary = Node(kind="summary", key="pvs", label=None, open=summary_open, nodes=groups)
    return TreeContext(overviews=overviews, pools=pools, summary=summary)


# -- fragments, one template each ---------------------------------------------------------------------

FRAGMENTS = "console/fragments/"


def render_fragment(name: str, **context) -> str:
    return render_to_string(FRAGMENTS + name, context)


# Labels and VM items are pure functions of frozen dataclasses: the consumer renders each
# distinct one once per process, however many sockets send it.
@lru_cache(maxsize=8192)
def header_pool(label: sel.PoolLabel) -> str:
    return render_fragment("hdr_pool.html", p=label)


@lru_cache(maxsize=256)
def header_pools_summary(summary: PoolsSummary) -> str:
    return render_fragment("hdr_pools_summary.html", s=summary)


@lru_cache(maxsize=8192)
def tree_pool_label(label: sel.PoolLabel) -> str:
    return render_fragment("tree_pool_label.html", p=label)


@lru_cache(maxsize=8192)
def tree_host_label(label: sel.HostLabel) -> str:
    return render_fragment("tree_host_label.html", h=label)


@lru_cache(maxsize=8192)
def tree_group_label(label: sel.GroupLabel) -> str:
    return render_fragment("tree_group_label.html", g=label)


@lru_cache(maxsize=20000)
def tree_vm(node: sel.VMNode, in_summary: bool = False) -> str:
    return render_fragment("tree_vm.html", vm=node, in_summary=in_summary)


@lru_cache(maxsize=20000)
def vm_row(node: sel.VMNode, can_change: bool = False) -> str:
    """A row of the table; with ``can_change``, its selection box and protect / unprotect action."""
    return render_fragment("vm_row.html", vm=node, can_change=can_change)


@lru_cache(maxsize=1024)
def pool_card(label: sel.PoolLabel) -> str:
    return render_fragment("pool_card.html", p=label)


@lru_cache(maxsize=256)
def summary_card(groups: tuple[sel.GroupLabel, ...]) -> str:
    return render_fragment("summary_card.html", groups=groups)


def alerts_counter(count: int, can_view_protection: bool = False) -> str:
    """The header's counter; a link to the alerts page for those who may open it."""
    return render_fragment("alerts_counter.html", alerts_count=count, can_view_protection=can_view_protection)


def vm_detail_panel(detail: details.VMDetail) -> str:
    return render_fragment("vm_detail.html", d=detail)


def host_detail_panel(detail: details.HostDetail) -> str:
    return render_fragment("host_detail.html", d=detail)


def pool_detail_panel(detail: details.PoolDetail) -> str:
    return render_fragment("pool_detail.html", d=detail)


def deleted(dom_id: str, tag: str = "div") -> str:
    """A fragment that removes the element with this id."""
    return f'<{tag} id="{dom_id}" hx-swap-oob="delete"></{tag}>'


def table_rows(rows: str) -> str:
    """Table rows travel in a table of their own: a ``<tr>`` cannot be parsed beside other elements."""
    return f'<table id="live-rows" hidden><tbody>{rows}</tbody></table>'


def control(action: str) -> str:
    """A message for the page's script rather than for a swap (e.g. "resync")."""
    return f'<div id="live-control" data-action="{action}"></div>'
