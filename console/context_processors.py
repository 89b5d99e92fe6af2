"""The layout around every page (header, tree, live socket), for every app's views.

Each app's page views render their own template with their own context; base.html reads the
rest from here. Every value is a cached callable, which templates call when they first read it:
a fragment, the admin or the login page that never shows the tree costs nothing. A view may
still set ``current`` (the header's section).
"""
from __future__ import annotations

import time
from functools import cache

from alerts.selectors import alert_open_count
from eac.permissions import user_can_change_protection, user_can_view, user_can_view_inventory

from .tree import OPEN_COOKIE, build_tree, parse_open_keys

# The header's sections, by the start of the path (longest first); eac.js marks them the same way.
SECTIONS = (
    ("/protection/audit/", "audit"),
    ("/protection/", "protection"),
    ("/alerts/recipients/", "recipients"),
    ("/alerts/", "alerts"),
    ("/vms/", "vms"),
)


def section_of(path: str) -> str:
    if path == "/":
        return "home"
    return next((name for prefix, name in SECTIONS if path.startswith(prefix)), "")


def open_alerts_count(user) -> int:
    """Open alerts the user may see (alerts belong to pools: a user who sees no pool sees none)."""
    return alert_open_count() if user_can_view_inventory(user) else 0


def layout(request) -> dict:
    user = getattr(request, "user", None)
    can_view = cache(lambda: user_can_view_inventory(user))
    return {
        "current": section_of(request.path),
        "can_view": can_view,
        # Protection, alerts and the audit log are for Administrators and Operators.
        "can_view_protection": cache(lambda: user_can_view(user)),
        "can_change_protection": cache(lambda: user_can_change_protection(user)),
        # Before the tree is read: a change after this instant makes the page's socket resync.
        "rendered_at": f"{time.time():.3f}",
        "tree": cache(lambda: build_tree(user, parse_open_keys(request.COOKIES.get(OPEN_COOKIE))) if can_view()
                      else None),
        "alerts_count": cache(lambda: open_alerts_count(user)),
    }
