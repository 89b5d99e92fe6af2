"""The simulated pool: store, sessions, tasks, call dispatch and runtime state.

``Engine.call`` is what every XAPI request ends up in, whatever the wire
protocol and whichever simulated host received it.  The engine knows no
behaviour: the handlers live in the ``ops_*``, ``ha_calls`` and ``hosts``
modules, and ``methods.register_all`` (the composition root, called where
the engine is built) puts them in ``Engine.registry``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from .api import Method, Registry, convert
from .datamodel import MESSAGE_PRIORITIES, DateTime, Record, now
from .errors import XapiError
from .store import Store
from .wire import xml_value

log = logging.getLogger("xapisim")


def _void_as_empty(value: Any) -> Any:
    # xapi answers a void call with an empty string, on both wires and in an
    # Async task's result (gen_server.ml marshals it as Rpc.String "").
    return "" if value is None else value


@dataclass
class Config:
    user: str = "root"
    password: str = "demo"  # noqa: S105 - the documented demo password, overridable
    # Simulated duration of a VM operation, seconds.
    op_delay: float = 0.05
    # Host failure detection delay when HA's configuration has no "timeout"
    # (and always when HA is off), seconds.
    ha_timeout: float = 10.0
    # Delay before HA restarts a protected VM that crashed, seconds.
    vm_restart_delay: float = 1.0
    # Time a powered-on host takes to become live again, seconds.
    boot_delay: float = 0.5


class Ctx:
    """One call's context: who called, through which host, under which task."""

    def __init__(self, engine: Engine, session: str | None, host: str, task: str | None = None) -> None:
        self.engine = engine
        self.store = engine.store
        self.session = session
        self.host = host
        self.task = task

    def sleep(self, seconds: float) -> None:
        """Simulated work: wait, but stop with TASK_CANCELLED if the task is cancelled."""
        if self.task is None:
            if seconds > 0:
                time.sleep(seconds)
            return
        ev = self.engine.cancel_events.get(self.task)
        if ev is None:
            if seconds > 0:
                time.sleep(seconds)
            return
        if ev.wait(seconds) if seconds > 0 else ev.is_set():
            raise XapiError("TASK_CANCELLED", self.task)

    def progress(self, value: float) -> None:
        if self.task is not None:
            with self.store.lock:
                if self.store.exists("task", self.task):
                    self.store.update(self.task, {"progress": round(value, 3)})


class Engine:
    def __init__(self, config: Config | None = None, seed: int = 1) -> None:
        self.config = config or Config()
        self.seed = seed
        self.store = Store(seed)
        self.lock = self.store.lock
        self.registry = Registry()
        self.sessions: dict[str, dict[str, Any]] = {}
        self.cancel_events: dict[str, threading.Event] = {}
        # Host refs by index (index i has address i of the scheme).
        self.hosts: list[str] = []
        self.addresses: dict[str, str] = {}
        # Runtime state that is not XAPI state: the simulated hardware.
        self.powered_off: set[str] = set()
        self.slow_ms: dict[str, int] = {}
        self.pif_carrier_down: set[str] = set()
        self.pbd_failed: set[str] = set()
        self.death_timers: dict[str, threading.Timer] = {}
        # When each crashed host was last heard from: what its host_metrics.last_updated keeps.
        self.crashed_at: dict[str, DateTime] = {}
        # VM -> host it is being started/resumed/migrated on: memory reserved
        # there (what xapi shows as VM.scheduled_to_be_resident_on).
        self.reserved: dict[str, str] = {}
        # host -> (records of its resident VMs, what they need): vmstate's memory accounting, remembered.
        self.resident_need: dict[str, tuple[list[Record], int]] = {}
        self.next_domid = 1
        # One HA restart pass at a time, as xapi's single HA monitor thread.
        self.ha_restart_lock = threading.Lock()
        # Set by the server: called with (host_ref, up) when a host's power changes.
        self.power_hook: Any = None
        # Set by the live test bed (xapisim.live): answers the /sim/ routes the core does not know, with
        # ``route(method, parts, raw) -> (status, body) | None``.
        self.sim_extension: Any = None
        # Set by the live test bed: called with ("created", vdi_ref, copy_of_ref | None) once a VDI exists and
        # with ("destroyed", vdi_ref, None) just before it goes (engine lock held), so that the images follow.
        self.storage_hook: Any = None
        # Set by the live test bed: ``migrating(vm, source, old_domid, target, domid)`` when VM.pool_migrate records
        # a move (engine lock held), then ``migrated(vm)`` once the call's lock is released, which returns when the
        # running guest is on the target host (a live migration: the same process, its NIC moved).
        self.migrate_hook: Any = None
        self.stopped = threading.Event()

    # -- pool helpers -----------------------------------------------------

    @property
    def pool_ref(self) -> str:
        return next(iter(self.store.tables["pool"]))

    def pool_record(self) -> Record:
        return self.store.tables["pool"][self.pool_ref]

    def master(self) -> str:
        return self.store.tables["pool"][self.pool_ref]["master"]

    def master_address(self) -> str:
        m = self.master()
        return self.addresses.get(m, "")

    def host_index(self, host: str) -> int:
        return self.hosts.index(host)

    def is_live(self, host: str) -> bool:
        """XAPI's view: host_metrics.live."""
        rec = self.store.get(host)
        if rec is None:
            return False
        metrics = self.store.get(rec["metrics"])
        return bool(metrics and metrics["live"])

    def is_up(self, host: str) -> bool:
        """The simulated hardware's view: powered on (and so listening)."""
        return host not in self.powered_off

    def spawn(self, target: Any, *args: Any, name: str = "xapisim-worker") -> threading.Thread:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        return t

    def later(self, delay: float, fn: Any, *args: Any) -> threading.Timer:
        t = threading.Timer(delay, self.guarded, args=(fn, *args))
        t.daemon = True
        t.start()
        return t

    def guarded(self, fn: Any, *args: Any) -> None:
        """Run a background job: not once the simulator stops, and never letting it raise."""
        if self.stopped.is_set():
            return
        try:
            fn(*args)
        except Exception:  # a background job must never take the simulator down
            log.exception("background job %s failed", getattr(fn, "__name__", fn))

    def message(self, name: str, cls: str, obj_uuid: str, body: str, priority: int | None = None) -> str:
        return self.store.create(
            "message",
            {
                "name": name,
                "priority": MESSAGE_PRIORITIES.get(name, 5) if priority is None else priority,
                "cls": cls,
                "obj_uuid": obj_uuid,
                "timestamp": now(),
                "body": body,
            },
        )

    # -- tasks ------------------------------------------------------------

    def new_task(self, label: str, description: str = "") -> str:
        with self.lock:
            ref = self.store.create(
                "task",
                {
                    "name_label": label,
                    "name_description": description,
                    "allowed_operations": ["cancel"],
                    "created": now(),
                    "status": "pending",
                    "resident_on": self.master(),
                },
            )
            self.cancel_events[ref] = threading.Event()
            return ref

    def finish_task(self, task: str, result: Any = "", error: XapiError | None = None) -> None:
        """End an Async call's task; its ``result`` is the XML-RPC ``<value>`` of the answer, as xapi's."""
        with self.lock:
            self.cancel_events.pop(task, None)
            if not self.store.exists("task", task):
                return
            values: dict[str, Any] = {"finished": now(), "allowed_operations": [], "current_operations": {}}
            if error is None:
                values.update(status="success", progress=1.0, result=xml_value(result))
            elif error.code == "TASK_CANCELLED":
                values.update(status="cancelled", error_info=error.description)
            else:
                values.update(status="failure", progress=1.0, error_info=error.description)
            self.store.update(task, values)

    # -- dispatch ---------------------------------------------------------

    def call(self, host: str, wire_name: str, params: list[Any]) -> Any:
        """Handle one XAPI call received by ``host``; raises XapiError on failure."""
        if host != self.master():
            raise XapiError("HOST_IS_SLAVE", self.master_address())
        delay = self.slow_ms.get(host)
        if delay:
            time.sleep(delay / 1000.0)
        method, is_async = self.registry.resolve(wire_name)
        if method is None:
            raise XapiError("MESSAGE_METHOD_UNKNOWN", wire_name)
        if not (method.arity - method.optional <= len(params) <= method.arity):
            raise XapiError("MESSAGE_PARAMETER_COUNT_MISMATCH", method.name, method.arity, len(params))
        session = None
        if method.session:
            session = str(params[0])
            if session not in self.sessions:
                raise XapiError("SESSION_INVALID", session)
            self.sessions[session]["last_active"] = now()
            params = params[1:]
        if is_async:
            task = self.new_task(f"Async.{method.name}")
            self.spawn(self._run_async, method, session, host, task, params, name=f"task-{method.name}")
            return task
        args = self._convert(method, params)
        if method.op:
            task = self.new_task(method.name)
            try:
                return _void_as_empty(method.fn(Ctx(self, session, host, task), *args))
            finally:
                # A synchronous call's task lives only as long as the call, as in xapi.
                with self.lock:
                    self.cancel_events.pop(task, None)
                    self.store.destroy(task)
        return _void_as_empty(method.fn(Ctx(self, session, host), *args))

    def _convert(self, method: Method, params: list[Any]) -> list[Any]:
        with self.lock:
            return [
                convert(self, name, kind, value) for (name, kind), value in zip(method.params, params, strict=False)
            ]

    def _run_async(self, method: Method, session: str | None, host: str, task: str, params: list[Any]) -> None:
        try:
            args = self._convert(method, params)
            result = method.fn(Ctx(self, session, host, task), *args)
        except XapiError as e:
            self.finish_task(task, error=e)
        except Exception as e:  # an unexpected bug must still end the task
            log.exception("Async.%s failed", method.name)
            self.finish_task(task, error=XapiError("INTERNAL_ERROR", repr(e)))
        else:
            self.finish_task(task, _void_as_empty(result))

    # -- lifecycle ----------------------------------------------------------

    def stop(self) -> None:
        self.stopped.set()
        for t in list(self.death_timers.values()):
            t.cancel()
        with self.lock:
            self.store.cond.notify_all()
