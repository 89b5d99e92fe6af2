"""The one way to name the object an alert is about: ``<kind>:<uuid>`` (``pool:…``, ``host:…``, ``vm:…``).

An alert is raised once and cleared once per (condition, object key): whoever raises and whoever
clears must build the key the same way, so both call ``alert_key``.
"""
from __future__ import annotations

from inventory.models import VM, Host, Pool

_KINDS = {Pool: "pool", Host: "host", VM: "vm"}


def alert_key(obj: Pool | Host | VM) -> str:
    kind = _KINDS[type(obj)]
    # A pool registered but never read has no uuid yet: its key is its id until then.
    ident = obj.uuid or (f"{obj.pk}" if kind == "pool" else "")
    return f"{kind}:{ident}"


def component_key(vm: VM, component: str) -> str:
    """A Level 2 component of a protected VM: ``vm:<uuid>/<component id>`` (``disk:xvda@<host uuid>``,
    ``link:a``, ``peer``…), so that each component's loss of redundancy is raised and cleared on its own."""
    return f"{alert_key(vm)}/{component}"
