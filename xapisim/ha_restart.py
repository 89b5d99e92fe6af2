"""HA's restart pass: what happens once a host has failed, a protected VM crashed or a host came back.

``hosts`` and ``faults`` start it; it asks ``ha_plan`` where the protected VMs
that are down go, then starts them through ``ops_vm.start_vm`` as xapi's HA
monitor does, without the failover-plan check (``ha_check=False``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .engine import Ctx
from .errors import XapiError
from .ha_plan import restart_plan
from .ha_status import update_pool_status
from .ops_vm import start_vm

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("xapisim.ha")


def restart_vms(engine: Engine, best_effort: list[str]) -> None:
    """HA's restart pass: protected VMs that are down, then ``best_effort`` ones.

    Protected VMs go where the planner puts them, an ``order`` group at a time
    (in parallel within a group), waiting the group's longest ``start_delay``
    before the next; one that cannot go there is tried anywhere, and if that
    fails too gets HA_PROTECTED_VM_RESTART_FAILED.  Best-effort VMs start
    where capacity allows.  Each start produces xapi's VM_STARTED message.
    """
    with engine.ha_restart_lock:
        with engine.lock:
            s = engine.store
            if not engine.pool_record()["ha_enabled"]:
                return
            plan = restart_plan(engine)

        def restart(vm_ref: str, host: str | None) -> None:
            ok = _try_start(engine, vm_ref, host) or (host is not None and _try_start(engine, vm_ref, None))
            if not ok:
                with engine.lock:
                    vm = engine.store.get(vm_ref)
                    if vm is not None and vm["power_state"] == "Halted":
                        engine.message("HA_PROTECTED_VM_RESTART_FAILED", "VM", vm["uuid"], "")

        for i, group in enumerate(plan.groups):
            if engine.stopped.is_set():
                return
            threads = [engine.spawn(restart, v, plan.hosts.get(v), name="ha-restart") for v in group]
            for t in threads:
                t.join()
            if i + 1 < len(plan.groups):
                with engine.lock:
                    delay = max(
                        (int(s.tables["VM"][v]["start_delay"]) for v in group if v in s.tables["VM"]), default=0
                    )
                if delay > 0:
                    engine.stopped.wait(delay)
        for vm_ref in best_effort:
            with engine.lock:
                vm = s.get(vm_ref)
                if vm is None or vm["power_state"] != "Halted" or vm["ha_restart_priority"] != "best-effort":
                    continue
            _try_start(engine, vm_ref, None, ha_check=True)
        update_pool_status(engine)


def _try_start(engine: Engine, vm_ref: str, host: str | None, *, ha_check: bool = False) -> bool:
    task = engine.new_task("VM.start")
    try:
        start_vm(Ctx(engine, None, engine.master(), task), vm_ref, host, False, "start", ha_check=ha_check)
        return True
    except XapiError as e:
        log.info("HA could not start %s on %s: %s", vm_ref, host, e)
        return False
    finally:
        with engine.lock:
            engine.cancel_events.pop(task, None)
            engine.store.destroy(task)
