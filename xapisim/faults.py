"""The ``/sim/`` control API: look at the simulated pool and inject failures.

Not part of XAPI.  JSON in and out; served on every listening host so that a
test can still reach it after the master died.  Faults change XAPI state and
events exactly as the real failure would look to a client (see ``hosts``).

    GET  /sim/state
    POST /sim/hosts/<name|uuid>/crash | power-on | slow {"delay_ms": N}
    POST /sim/vms/<name|uuid>/crash
    POST /sim/pifs/<uuid>/carrier {"up": false}
    POST /sim/pbds/<uuid>/fail | repair

The live test bed (``xapisim.live``) adds its routes through ``Engine.sim_extension``.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from . import hosts
from .datamodel import now
from .ha_plan import ha_timeout, is_protected
from .ha_restart import restart_vms
from .ha_status import update_pool_status
from .vmstate import to_halted, vm_message

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("xapisim.faults")


class SimError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def find(engine: Engine, cls: str, key: str, *, by_name: bool = True) -> str:
    s = engine.store
    with engine.lock:
        ref = s.by_uuid[cls].get(key)
        if ref is not None:
            return ref
        if by_name:
            matches = [
                r
                for r, rec in s.tables[cls].items()
                if rec.get("name_label") == key and not rec.get("is_control_domain") and not rec.get("is_a_template")
            ]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise SimError(409, f"{len(matches)} {cls} objects are named {key!r}: use the uuid")
    what = "name or uuid" if by_name else "uuid"
    raise SimError(404, f"no {cls} with {what} {key!r}")


def state(engine: Engine) -> dict[str, Any]:
    s = engine.store
    with engine.lock:
        master = engine.master()
        host_list = []
        for host in engine.hosts:
            h = s.tables["host"][host]
            host_list.append(
                {
                    "name": h["name_label"],
                    "uuid": h["uuid"],
                    "address": h["address"],
                    "live": engine.is_live(host),
                    "powered_on": engine.is_up(host),
                    "master": host == master,
                    "enabled": h["enabled"],
                }
            )
        vms = []
        # Every VM record, as a client's VM table has them; the flags tell
        # guests from templates, snapshots and control domains.
        for vm in s.tables["VM"].values():
            resident = s.tables["host"].get(vm["resident_on"])
            vms.append(
                {
                    "name": vm["name_label"],
                    "uuid": vm["uuid"],
                    "power_state": vm["power_state"],
                    "host": resident["name_label"] if resident else None,
                    "ha_restart_priority": vm["ha_restart_priority"],
                    "is_a_template": vm["is_a_template"],
                    "is_a_snapshot": vm["is_a_snapshot"],
                    "is_control_domain": vm["is_control_domain"],
                }
            )
        pool = s.tables["pool"][engine.pool_ref]

        def name(ref: str) -> str:
            return s.tables["host"][ref]["name_label"]

        faults = {
            "crashed_hosts": sorted(name(h) for h in engine.powered_off),
            "slow_hosts": {name(h): ms for h, ms in engine.slow_ms.items()},
            "pif_carrier_down": sorted(s.tables["PIF"][p]["uuid"] for p in engine.pif_carrier_down),
            "pbd_failed": sorted(s.tables["PBD"][p]["uuid"] for p in engine.pbd_failed),
        }
        return {
            "pool": {
                "name": pool["name_label"],
                "uuid": pool["uuid"],
                "master": name(master),
                "ha_enabled": pool["ha_enabled"],
                "ha_plan_exists_for": pool["ha_plan_exists_for"],
                "ha_overcommitted": pool["ha_overcommitted"],
            },
            "hosts": host_list,
            "vms": vms,
            "faults": faults,
        }


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise SimError(400, f"body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise SimError(400, "body must be a JSON object")
    return body


def _host_action(engine: Engine, key: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
    host = find(engine, "host", key)
    name = engine.store.tables["host"][host]["name_label"]
    if action == "crash":
        if not hosts.crash(engine, host):
            raise SimError(409, f"host {name} is already powered off")
        return {"host": name, "powered_on": False, "declared_dead_in_s": ha_timeout(engine)}
    if action == "power-on":
        if not hosts.power_on(engine, host):
            raise SimError(409, f"host {name} is already powered on")
        return {"host": name, "powered_on": True}
    if action == "slow":
        delay = body.get("delay_ms")
        if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
            raise SimError(400, 'expected {"delay_ms": <non-negative integer>}')
        with engine.lock:
            if delay:
                engine.slow_ms[host] = delay
            else:
                engine.slow_ms.pop(host, None)
        return {"host": name, "delay_ms": delay}
    raise SimError(404, f"unknown host action {action!r}")


def crash_vm(engine: Engine, vm_ref: str) -> None:
    """The guest dies: Halted at once; HA restarts it if it is protected (or best-effort)."""
    s = engine.store
    with engine.lock:
        vm = s.tables["VM"][vm_ref]
        if vm["power_state"] not in ("Running", "Paused"):
            raise SimError(409, f"VM {vm['name_label']} is {vm['power_state']}, not running")
        if not engine.is_up(vm["resident_on"]):
            raise SimError(409, f"VM {vm['name_label']} is on a host that is powered off")
        to_halted(engine, vm_ref)
        vm_message(engine, "VM_CRASHED", vm_ref, "crashed")
        update_pool_status(engine)
        restart = s.tables["pool"][engine.pool_ref]["ha_enabled"] and (
            is_protected(s.tables["VM"][vm_ref]) or vm["ha_restart_priority"] == "best-effort"
        )
    if restart:
        engine.later(engine.config.vm_restart_delay, restart_vms, engine, [vm_ref])


def set_carrier(engine: Engine, pif: str, up: bool) -> None:
    s = engine.store
    with engine.lock:
        s.update(s.tables["PIF"][pif]["metrics"], {"carrier": up, "last_updated": now()})
        if up:
            engine.pif_carrier_down.discard(pif)
        else:
            engine.pif_carrier_down.add(pif)


def _set_pbd(engine: Engine, pbd: str, attached: bool) -> None:
    with engine.lock:
        engine.store.update(pbd, {"currently_attached": attached})
        if attached:
            engine.pbd_failed.discard(pbd)
        else:
            engine.pbd_failed.add(pbd)
        # A shared SR a host cannot reach makes its VMs non-agile: the plan may change.
        update_pool_status(engine)


def handle(engine: Engine, method: str, path: str, raw: bytes) -> tuple[int, dict[str, Any]]:
    """Route one /sim/ request; returns (HTTP status, JSON body)."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p][1:]  # drop "sim"
    try:
        if parts == ["state"]:
            if method != "GET":
                raise SimError(405, "use GET")
            return 200, state(engine)
        if engine.sim_extension is not None:
            answer = engine.sim_extension.route(method, parts, raw)
            if answer is not None:
                return answer
        elif parts == ["live"]:
            raise SimError(404, "the simulator is not in live mode (python -m xapisim --live)")
        if method != "POST":
            raise SimError(405, "use POST")
        body = parse_body(raw)
        if len(parts) == 3 and parts[0] == "hosts":
            return 200, _host_action(engine, parts[1], parts[2], body)
        if len(parts) == 3 and parts[0] == "vms" and parts[2] == "crash":
            vm = find(engine, "VM", parts[1])
            crash_vm(engine, vm)
            return 200, {"vm": engine.store.tables["VM"][vm]["name_label"], "power_state": "Halted"}
        if len(parts) == 3 and parts[0] == "pifs" and parts[2] == "carrier":
            pif = find(engine, "PIF", parts[1], by_name=False)
            up = body.get("up")
            if not isinstance(up, bool):
                raise SimError(400, 'expected {"up": true|false}')
            set_carrier(engine, pif, up)
            return 200, {"pif": parts[1], "carrier": up}
        if len(parts) == 3 and parts[0] == "pbds" and parts[2] in ("fail", "repair"):
            pbd = find(engine, "PBD", parts[1], by_name=False)
            _set_pbd(engine, pbd, parts[2] == "repair")
            return 200, {"pbd": parts[1], "currently_attached": parts[2] == "repair"}
        raise SimError(404, f"no such simulator endpoint: {method} {path}")
    except SimError as e:
        return e.status, {"error": e.message}
    except Exception as e:  # e.g. a powered-on host's address is taken: report, never die
        log.exception("/sim/ request %s %s failed", method, path)
        return 500, {"error": f"{type(e).__name__}: {e}"}
