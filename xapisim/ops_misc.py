"""session, event, task, message and system calls."""

from __future__ import annotations

import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any

from .datamodel import CLASS_BY_LOWER, now
from .errors import XapiError, handle_invalid
from .store import Subscription
from .wire import Records

if TYPE_CHECKING:
    from .api import Registry
    from .engine import Ctx


def _token(gen: int) -> str:
    return f"{gen:020d},{0:020d}"


def _parse_token(token: str) -> int:
    if token == "":
        return 0
    parts = token.split(",")
    try:
        if len(parts) != 2:
            raise ValueError(token)
        return int(parts[0])
    except ValueError:
        raise XapiError("EVENT_FROM_TOKEN_PARSE_FAILURE", token) from None


# -- session -----------------------------------------------------------------


def login_with_password(ctx: Ctx, uname: str, pwd: str, version: str = "", originator: str = "") -> str:
    cfg = ctx.engine.config
    # Compare in constant time: the simulator may be exposed to a demo network.
    if not (
        secrets.compare_digest(uname.encode(), cfg.user.encode())
        and secrets.compare_digest(pwd.encode(), cfg.password.encode())
    ):
        raise XapiError("SESSION_AUTHENTICATION_FAILED", uname, "Authentication failure")
    # Session refs are random even in a seeded pool: a restarted simulator
    # must not accept a session of the previous run.
    ref = f"OpaqueRef:{uuid.uuid4()}"
    ctx.engine.sessions[ref] = {
        "uuid": str(uuid.uuid4()),
        "this_user": uname,
        "originator": originator,
        "version": version,
        "last_active": now(),
    }
    return ref


def logout(ctx: Ctx) -> None:
    ctx.engine.sessions.pop(ctx.session or "", None)


def _session_rec(ctx: Ctx, ref: str) -> dict[str, Any]:
    s = ctx.engine.sessions.get(ref)
    if s is None:
        raise handle_invalid("session", ref)
    return s


def session_get_this_host(ctx: Ctx, ref: str) -> str:
    _session_rec(ctx, ref)
    return ctx.engine.master()


def session_get_uuid(ctx: Ctx, ref: str) -> str:
    return _session_rec(ctx, ref)["uuid"]


def session_get_record(ctx: Ctx, ref: str) -> dict[str, Any]:
    s = _session_rec(ctx, ref)
    return {
        "uuid": s["uuid"],
        "this_host": ctx.engine.master(),
        "this_user": "OpaqueRef:NULL",
        "last_active": s["last_active"],
        "pool": False,
        "other_config": {},
        "is_local_superuser": True,
        "subject": "OpaqueRef:NULL",
        "validation_time": s["last_active"],
        "auth_user_sid": "",
        "auth_user_name": s["this_user"],
        "rbac_permissions": [],
        "tasks": [],
        "parent": "OpaqueRef:NULL",
        "originator": s["originator"],
        "client_certificate": False,
    }


# -- event -------------------------------------------------------------------


def event_from(ctx: Ctx, classes: list[str], token: str, timeout: float) -> dict[str, Any]:
    """xapi's event.from: block until a subscribed object changed after ``token``.

    Returns at once if there are events; otherwise waits up to ``timeout``
    seconds and then returns no events and a new token.
    """
    since = _parse_token(token)
    sub = Subscription(classes)
    store = ctx.store
    deadline = time.monotonic() + max(0.0, timeout)
    with store.cond:
        while True:
            events, last = store.collect(sub, since)
            remaining = deadline - time.monotonic()
            if events or remaining <= 0 or ctx.engine.stopped.is_set():
                break
            # Changes that matched nothing need not be looked at again.
            since = last
            store.cond.wait(remaining)
        counts = {c.lower(): len(t) for c, t in store.tables.items()}
    counts["session"] = len(ctx.engine.sessions)
    return {"events": events, "valid_ref_counts": counts, "token": _token(last)}


def event_inject(ctx: Ctx, cls: str, ref: str) -> str:
    name = CLASS_BY_LOWER.get(cls.lower(), cls)
    with ctx.store.lock:
        if not ctx.store.exists(name, ref):
            raise handle_invalid(cls, ref)
        return _token(ctx.store.touch(ref))


def event_get_current_id(ctx: Ctx) -> int:
    return ctx.store.generation


# -- task --------------------------------------------------------------------


def task_cancel(ctx: Ctx, task: str) -> None:
    with ctx.store.lock:
        rec = ctx.store.rec("task", task)
        ev = ctx.engine.cancel_events.get(task)
        if rec["status"] != "pending" or ev is None:
            raise XapiError("OPERATION_NOT_ALLOWED", "Task is not pending")
        ev.set()


def task_destroy(ctx: Ctx, task: str) -> None:
    with ctx.store.lock:
        ctx.store.rec("task", task)
        ctx.engine.cancel_events.pop(task, None)
        ctx.store.destroy(task)


def task_create(ctx: Ctx, label: str, description: str) -> str:
    ref = ctx.engine.new_task(label, description)
    # A client-created task is the client's to complete: nothing cancels it here.
    ctx.engine.cancel_events.pop(ref, None)
    return ref


# -- message -----------------------------------------------------------------


def message_create(ctx: Ctx, name: str, priority: int, cls: str, obj_uuid: str, body: str) -> str:
    with ctx.store.lock:
        return ctx.engine.message(name, cls, obj_uuid, body, priority=priority)


def message_destroy(ctx: Ctx, ref: str) -> None:
    with ctx.store.lock:
        ctx.store.rec("message", ref)
        ctx.store.destroy(ref)


def message_get_since(ctx: Ctx, since: str) -> Records:
    with ctx.store.lock:
        return Records({r: m for r, m in ctx.store.tables["message"].items() if m["timestamp"] > since})


def message_get(ctx: Ctx, cls: str, obj_uuid: str, since: str) -> Records:
    with ctx.store.lock:
        return Records(
            {
                r: m
                for r, m in ctx.store.tables["message"].items()
                if m["cls"] == cls and m["obj_uuid"] == obj_uuid and m["timestamp"] > since
            }
        )


def list_methods(ctx: Ctx) -> list[str]:
    return ctx.engine.registry.names()


def register(reg: Registry) -> None:
    ro = {"async_ok": False}
    reg.add(
        "session.login_with_password",
        [("uname", "string"), ("pwd", "string"), ("version", "string"), ("originator", "string")],
        login_with_password,
        session=False,
        optional=2,
        **ro,
    )
    reg.add("session.logout", [], logout, **ro)
    reg.add("session.get_this_host", [("self", "string")], session_get_this_host, **ro)
    reg.add("session.get_uuid", [("self", "string")], session_get_uuid, **ro)
    reg.add("session.get_record", [("self", "string")], session_get_record, **ro)
    reg.add("event.from", [("classes", "set"), ("token", "string"), ("timeout", "float")], event_from, **ro)
    reg.add("event.inject", [("class", "string"), ("ref", "string")], event_inject, **ro)
    reg.add("event.get_current_id", [], event_get_current_id, **ro)
    reg.add("task.cancel", [("task", "ref:task")], task_cancel)
    reg.add("task.destroy", [("self", "ref:task")], task_destroy)
    reg.add("task.create", [("label", "string"), ("description", "string")], task_create)
    reg.add(
        "message.create",
        [("name", "string"), ("priority", "int"), ("cls", "string"), ("obj_uuid", "string"), ("body", "string")],
        message_create,
    )
    reg.add("message.destroy", [("self", "ref:message")], message_destroy)
    reg.add("message.get_since", [("since", "datetime")], message_get_since, **ro)
    reg.add("message.get", [("cls", "string"), ("obj_uuid", "string"), ("since", "datetime")], message_get, **ro)
    reg.add("system.listMethods", [], list_methods, session=False, **ro)
