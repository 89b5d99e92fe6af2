"""Call registry, parameter checking and the generic per-class methods.

A ``Method`` names its parameters with a kind (``"ref:VM"``, ``"int"``…);
``Registry.invoke`` checks the count (MESSAGE_PARAMETER_COUNT_MISMATCH), then
the session (SESSION_INVALID), then converts each argument (ints may arrive as
strings, as xapi accepts) and checks references (HANDLE_INVALID), in xapi's
order.  Class methods (get_all, get_record, get_<field>, set_<field>…) are
generated from ``datamodel.CLASSES``; ``methods.register_all`` registers the
specific handlers on top, each replacing a generic method of the same name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .datamodel import CLASS_NAMES_LONGEST_FIRST, CLASSES, NULL_REF, DateTime, Field
from .errors import XapiError, handle_invalid
from .wire import Records

if TYPE_CHECKING:
    from .engine import Ctx, Engine

Handler = Callable[..., Any]


@dataclass
class Method:
    name: str
    params: list[tuple[str, str]]  # (name, kind), the session excluded
    fn: Handler
    session: bool = True
    async_ok: bool = True
    # Operations get a task (for current_operations) even when called synchronously.
    op: bool = False
    # How many trailing parameters may be left out (session.login_with_password).
    optional: int = 0

    @property
    def arity(self) -> int:
        return len(self.params) + (1 if self.session else 0)


class Registry:
    def __init__(self) -> None:
        self.methods: dict[str, Method] = {}

    def add(
        self,
        name: str,
        params: list[tuple[str, str]],
        fn: Handler,
        *,
        session: bool = True,
        async_ok: bool = True,
        op: bool = False,
        optional: int = 0,
    ) -> None:
        self.methods[name] = Method(name, params, fn, session, async_ok, op, optional)

    def resolve(self, wire_name: str) -> tuple[Method | None, bool]:
        """The method for a wire name and whether it was called as ``Async.``.

        Accepts ``Class.method`` and xapi's alternative ``Class_method``.
        """
        name, is_async = wire_name, False
        if name.startswith("Async."):
            name, is_async = name[len("Async.") :], True
        m = self.methods.get(name)
        if m is None and "." not in name:
            for cls in (*CLASS_NAMES_LONGEST_FIRST, "session", "event", "system"):
                if name.startswith(cls + "_"):
                    m = self.methods.get(f"{cls}.{name[len(cls) + 1 :]}")
                    break
        if m is not None and is_async and not m.async_ok:
            return None, True
        return m, is_async

    def names(self) -> list[str]:
        out = sorted(self.methods)
        out += sorted(f"Async.{n}" for n, m in self.methods.items() if m.async_ok)
        return out


# -- argument conversion --------------------------------------------------------


def _type_error(name: str) -> XapiError:
    return XapiError("FIELD_TYPE_ERROR", name)


def convert(engine: Engine, name: str, kind: str, value: Any) -> Any:
    """Convert one argument to the Python value of ``kind``; check references."""
    if kind == "any":
        return value
    if kind in ("string", "enum"):
        if isinstance(value, (dict, list)):
            raise _type_error(name)
        return "" if value is None else str(value)
    if kind == "int":
        if isinstance(value, bool):
            raise _type_error(name)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise _type_error(name) from None
    if kind == "float":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise _type_error(name) from None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, int):
            return bool(value)
        raise _type_error(name)
    if kind == "datetime":
        if isinstance(value, (str, int, float)):
            return DateTime(str(value))
        raise _type_error(name)
    if kind == "map":
        if not isinstance(value, dict):
            raise _type_error(name)
        return {str(k): v for k, v in value.items()}
    if kind == "set":
        if not isinstance(value, list):
            raise _type_error(name)
        return list(value)
    if kind.startswith("set:"):
        if not isinstance(value, list):
            raise _type_error(name)
        return [convert(engine, name, kind[4:], v) for v in value]
    if kind.startswith("ref:") or kind.startswith("ref?:"):
        cls = kind.split(":", 1)[1]
        ref = "" if value is None else str(value)
        if kind.startswith("ref?:") and (ref in ("", NULL_REF)):
            return NULL_REF
        if not engine.store.exists(cls, ref):
            raise handle_invalid(cls, ref)
        return ref
    raise ValueError(f"unknown parameter kind {kind}")


def field_kind(f: Field) -> str:
    """The parameter kind of a field's setter."""
    return {
        "s": "string",
        "e": "string",
        "i": "int",
        "f": "float",
        "b": "bool",
        "d": "datetime",
        "r": f"ref?:{f.ref_class}",
        "m": "map",
        "mf": "map",
        "mr": "map",
        "ss": "set",
        "si": "set",
        "sr": "set",
    }[f.kind]


def _map_value(f: Field, value: Any) -> Any:
    """Map values are strings on the wire for m-type fields."""
    return str(value) if f.kind == "m" else value


# -- generic class methods -------------------------------------------------------


def _register_class(reg: Registry, cls: str) -> None:
    cdef = CLASSES[cls]

    def get_all(ctx: Ctx) -> list[str]:
        with ctx.store.lock:
            return list(ctx.store.tables[cls])

    def get_all_records(ctx: Ctx) -> Records:
        with ctx.store.lock:
            return Records(ctx.store.tables[cls])

    def get_record(ctx: Ctx, ref: str) -> Any:
        return ctx.store.rec(cls, ref)

    def get_by_uuid(ctx: Ctx, uuid: str) -> str:
        with ctx.store.lock:
            return ctx.store.ref_by_uuid(cls, uuid)

    def get_by_name_label(ctx: Ctx, label: str) -> list[str]:
        with ctx.store.lock:
            return [r for r, rec in ctx.store.tables[cls].items() if rec["name_label"] == label]

    ro = {"async_ok": False}
    reg.add(f"{cls}.get_all", [], get_all, **ro)
    reg.add(f"{cls}.get_all_records", [], get_all_records, **ro)
    reg.add(f"{cls}.get_record", [("self", f"ref:{cls}")], get_record, **ro)
    reg.add(f"{cls}.get_by_uuid", [("uuid", "string")], get_by_uuid, **ro)
    if cdef.by_name_label:
        reg.add(f"{cls}.get_by_name_label", [("label", "string")], get_by_name_label, **ro)

    for f in cdef.fields.values():
        _register_field(reg, cls, f)


def _register_field(reg: Registry, cls: str, f: Field) -> None:
    name = f.name
    ro = {"async_ok": False}

    def getter(ctx: Ctx, ref: str) -> Any:
        return ctx.store.rec(cls, ref)[name]

    reg.add(f"{cls}.get_{name}", [("self", f"ref:{cls}")], getter, **ro)
    if not f.writable:
        return

    def setter(ctx: Ctx, ref: str, value: Any) -> None:
        if f.kind == "m":
            value = {k: str(v) for k, v in value.items()}
        with ctx.store.lock:
            ctx.store.rec(cls, ref)
            ctx.store.update(ref, {name: value})

    reg.add(f"{cls}.set_{name}", [("self", f"ref:{cls}"), ("value", field_kind(f))], setter, **ro)

    if f.kind in ("m", "mf", "mr"):

        def add_to(ctx: Ctx, ref: str, key: str, value: Any) -> None:
            with ctx.store.lock:
                rec = ctx.store.rec(cls, ref)
                if key in rec[name]:
                    raise XapiError("MAP_DUPLICATE_KEY", cls, name, ref, key)
                ctx.store.map_put(ref, name, key, _map_value(f, value))

        def remove_from(ctx: Ctx, ref: str, key: str) -> None:
            with ctx.store.lock:
                ctx.store.rec(cls, ref)
                ctx.store.map_del(ref, name, key)

        reg.add(f"{cls}.add_to_{name}", [("self", f"ref:{cls}"), ("key", "string"), ("value", "any")], add_to, **ro)
        reg.add(f"{cls}.remove_from_{name}", [("self", f"ref:{cls}"), ("key", "string")], remove_from, **ro)
    elif f.kind in ("ss", "si", "sr"):

        def add(ctx: Ctx, ref: str, value: Any) -> None:
            with ctx.store.lock:
                ctx.store.rec(cls, ref)
                ctx.store.set_add(ref, name, value)

        def remove(ctx: Ctx, ref: str, value: Any) -> None:
            with ctx.store.lock:
                ctx.store.rec(cls, ref)
                ctx.store.set_remove(ref, name, value)

        reg.add(f"{cls}.add_{name}", [("self", f"ref:{cls}"), ("value", "string")], add, **ro)
        reg.add(f"{cls}.remove_{name}", [("self", f"ref:{cls}"), ("value", "string")], remove, **ro)


def register_generic(reg: Registry) -> None:
    for cls in CLASSES:
        if cls == "message":
            continue  # messages are read-only apart from create/destroy (ops_misc)
        _register_class(reg, cls)
    # message: records and getters, no setters.
    _register_class(reg, "message")
