"""The live bed's ``/sim/`` routes: faults that act on the machines, in the style of ``xapisim.faults``.

    GET  /sim/live                                   the bed: namespaces, addresses, AMs, guests, faults in force
    POST /sim/hosts/<name|uuid>/nic {"up": false}     the host's NIC: its eth0 PIF's carrier and the real veth
    POST /sim/hosts/<name|uuid>/disk {"failed": true} the host's local disk: every I/O of its exports fails
    POST /sim/hosts/<name|uuid>/links/<a|b> {"up": false}   an availability link, cut silently at this host
    POST /sim/hosts/<name|uuid>/domains/<vm>/unpause  the host's own toolstack unpausing a domain on it (no master
                                                      needed: the AM's on_promote hook)

A request answers once its fault is in force on the machines. ``POST /sim/pifs/<uuid>/carrier`` (of an eth0 PIF)
acts on the veth too, a moment later; ``POST /sim/vms/<vm>/crash`` kills a live guest; a host crash kills its
guests, its AM and its disk server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..faults import SimError, find, parse_body, set_carrier
from ..vmstate import set_paused, vm_message

if TYPE_CHECKING:
    from ..engine import Engine
    from .bed import LiveBed


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if not isinstance(value, bool):
        raise SimError(400, f'expected {{"{key}": true|false}}')
    return value


class LiveRoutes:
    """What ``xapisim.faults.handle`` asks about a route it does not know (``Engine.sim_extension``)."""

    def __init__(self, bed: LiveBed) -> None:
        self.bed = bed

    def route(self, method: str, parts: list[str], raw: bytes) -> tuple[int, dict[str, Any]] | None:
        """The answer to ``/sim/<parts...>``, or None when the route is not the bed's. Raises SimError."""
        bed, engine = self.bed, self.bed.engine
        if parts == ["live"]:
            if method != "GET":
                raise SimError(405, "use GET")
            return 200, bed.state()
        if len(parts) == 5 and parts[0] == "hosts" and parts[2] == "domains" and parts[4] == "unpause":
            if method != "POST":
                raise SimError(405, "use POST")
            return 200, local_unpause(engine, find(engine, "host", parts[1]), find(engine, "VM", parts[3]))
        if len(parts) not in (3, 4) or parts[0] != "hosts" or parts[2] not in ("nic", "disk", "links"):
            return None
        if method != "POST":
            raise SimError(405, "use POST")
        host = find(engine, "host", parts[1])
        name = engine.store.tables["host"][host]["name_label"]
        body = parse_body(raw)
        if parts[2] == "nic" and len(parts) == 3:
            up = _flag(body, "up")
            pifs = [p for p, rec in engine.store.all("PIF").items() if rec["host"] == host and rec["device"] == "eth0"]
            if not pifs:
                raise SimError(404, f"host {name} has no eth0 PIF")
            set_carrier(engine, pifs[0], up)
            bed.poke()
            bed.settle()
            return 200, {"host": name, "nic_up": up}
        if parts[2] == "disk" and len(parts) == 3:
            failed = _flag(body, "failed")
            bed.set_disk(host, failed)
            return 200, {"host": name, "disk_failed": failed}
        if parts[2] == "links" and len(parts) == 4:
            if parts[3] not in ("a", "b"):
                raise SimError(404, f"no link {parts[3]!r} (a or b)")
            up = _flag(body, "up")
            bed.set_link(host, parts[3], up)
            return 200, {"host": name, "link": parts[3], "up": up}
        return None


def local_unpause(engine: Engine, host: str, vm_ref: str) -> dict[str, Any]:
    """``/sim/hosts/<h>/domains/<vm>/unpause``: the host's own toolstack (``xl unpause``, xenopsd) continuing a
    paused domain resident on it. Unlike ``VM.unpause`` it needs no pool master (the AM's on_promote hook uses it
    right after a crash of the master, before HA has elected another); XAPI's records follow at once."""
    s = engine.store
    with engine.lock:
        vm = s.tables["VM"][vm_ref]
        host_name = s.tables["host"][host]["name_label"]
        if not engine.is_up(host):
            raise SimError(409, f"host {host_name} is not running")
        if vm["resident_on"] != host:
            raise SimError(409, f"VM {vm['name_label']} has no domain on {host_name}")
        if vm["power_state"] == "Running":
            return {"vm": vm["uuid"], "host": host_name, "done": "already running"}
        if vm["power_state"] != "Paused":
            raise SimError(409, f"VM {vm['name_label']} is {vm['power_state']}, not Paused")
        set_paused(engine, vm_ref, False)
        vm_message(engine, "VM_UNPAUSED", vm_ref, "unpaused")
    return {"vm": vm["uuid"], "host": host_name, "done": "unpaused"}
