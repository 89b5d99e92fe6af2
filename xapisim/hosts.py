"""Host lifecycle: crash, failure detection, master election, power-on; host calls.

A crash is hardware: the host stops answering at once (its listener closes).
XAPI only learns of it after the failure-detection timeout (HA's "timeout",
else ``Config.ha_timeout``): then host_metrics.live becomes false, its VMs are
reset to Halted, a new master is elected if it was the master, and with HA on
the protected VMs restart elsewhere (``ha_restart.restart_vms``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .datamodel import now
from .errors import XapiError
from .ha_plan import Change, assert_change_preserves_plan, ha_timeout
from .ha_restart import restart_vms
from .ha_status import update_pool_status
from .vmstate import host_free, refresh_host_memory, to_halted

if TYPE_CHECKING:
    from .api import Registry
    from .engine import Ctx, Engine

log = logging.getLogger("xapisim.hosts")


def crash(engine: Engine, host: str) -> bool:
    """Power a host off abruptly.  Returns False if it was already off."""
    with engine.lock:
        if host in engine.powered_off:
            return False
        engine.powered_off.add(host)
        engine.crashed_at[host] = now()
        timeout = ha_timeout(engine)
        engine.death_timers[host] = engine.later(timeout, declare_dead, engine, host)
    log.info("host %s crashed; declared dead in %.1fs", host, timeout)
    if engine.power_hook:
        engine.power_hook(host, False)
    return True


def declare_dead(engine: Engine, host: str) -> None:
    """What xapi does once it notices a host has gone."""
    best_effort: list[str] = []
    with engine.lock:
        timer = engine.death_timers.pop(host, None)
        if timer is not None:
            timer.cancel()
        if host not in engine.powered_off or not engine.is_live(host):
            return
        s = engine.store
        pool = s.tables["pool"][engine.pool_ref]
        h = s.tables["host"][host]
        ha_on = pool["ha_enabled"]
        if ha_on:
            engine.message("HA_HOST_FAILED", "Host", h["uuid"], f"Server '{h['name_label']}' has failed")
        # As in xapi, last_updated is the last time the host was heard from (it stopped then), not now.
        s.update(h["metrics"], {"live": False, "last_updated": engine.crashed_at.pop(host, None) or now()})
        s.update(host, {"allowed_operations": []})
        reset = [vm for vm in h["resident_VMs"] if not s.tables["VM"][vm]["is_control_domain"]]
        for vm in reset:
            to_halted(engine, vm)
        best_effort = [vm for vm in reset if s.tables["VM"][vm]["ha_restart_priority"] == "best-effort"]
        if engine.master() == host:
            elect_master(engine)
        update_pool_status(engine)
    log.info("host %s declared dead; %d VMs reset", host, len(reset))
    if ha_on:
        engine.spawn(engine.guarded, restart_vms, engine, best_effort, name="ha-restart")


def elect_master(engine: Engine) -> str | None:
    """The lowest-index host that is up and live becomes master."""
    with engine.lock:
        old = engine.master()
        for host in engine.hosts:
            if host != old and engine.is_up(host) and engine.is_live(host):
                engine.store.update(engine.pool_ref, {"master": host})
                # Clients watching hosts see the change of role.
                engine.store.touch(host)
                if engine.store.exists("host", old):
                    engine.store.touch(old)
                log.info("host %s is the new master", host)
                return host
        return None


def power_on(engine: Engine, host: str) -> bool:
    """Power a crashed host back on.  Returns False if it was not off."""
    with engine.lock:
        if host not in engine.powered_off:
            return False
        if host in engine.death_timers:
            # Back before anyone noticed: its VMs died with it all the same.
            declare_dead(engine, host)
        engine.powered_off.discard(host)
    if engine.power_hook:
        engine.power_hook(host, True)
    engine.later(engine.config.boot_delay, _booted, engine, host)
    return True


def _booted(engine: Engine, host: str) -> None:
    with engine.lock:
        if host in engine.powered_off:
            return
        s = engine.store
        h = s.tables["host"][host]
        s.update(h["metrics"], {"live": True, "last_updated": now()})
        s.update(
            host,
            {
                "allowed_operations": [
                    "provision",
                    "evacuate",
                    "reboot",
                    "shutdown",
                    "vm_start",
                    "vm_resume",
                    "vm_migrate",
                ]
            },
        )
        refresh_host_memory(engine, host)
        master = engine.master()
        if not (engine.is_up(master) and engine.is_live(master)):
            elect_master(engine)
        update_pool_status(engine)
        ha_on = s.tables["pool"][engine.pool_ref]["ha_enabled"]
    if ha_on:
        # Capacity came back: protected VMs that could not be restarted may fit now.
        restart_vms(engine, [])


# -- host calls -------------------------------------------------------------------


def host_enable(ctx: Ctx, host: str) -> None:
    with ctx.engine.lock:
        if not ctx.engine.is_live(host):
            raise XapiError("HOST_OFFLINE", host)
        ctx.store.update(host, {"enabled": True})
        update_pool_status(ctx.engine)


def host_disable(ctx: Ctx, host: str) -> None:
    with ctx.engine.lock:
        assert_change_preserves_plan(ctx.engine, Change(hosts_to_disable=[host]))
        ctx.store.update(host, {"enabled": False})
        update_pool_status(ctx.engine)


def host_get_servertime(ctx: Ctx, host: str) -> str:
    if not ctx.engine.is_up(host):
        raise XapiError("HOST_OFFLINE", host)
    return now()


def host_compute_free_memory(ctx: Ctx, host: str) -> int:
    with ctx.engine.lock:
        return max(0, host_free(ctx.engine, host))


def register(reg: Registry) -> None:
    h = [("host", "ref:host")]
    reg.add("host.enable", h, host_enable)
    reg.add("host.disable", h, host_disable)
    reg.add("host.get_servertime", h, host_get_servertime, async_ok=False)
    reg.add("host.get_server_localtime", h, host_get_servertime, async_ok=False)
    reg.add("host.compute_free_memory", h, host_compute_free_memory)
