"""XML-RPC and JSON-RPC, written the way xapi writes them.

XML output is compact (no whitespace between tags: Xen Orchestra's parser
breaks otherwise).  Strings and 64-bit ints are bare ``<value>``s, so ints
reach XML-RPC clients as strings, as from xapi; booleans are ``<boolean>``,
floats ``<double>``, ``DateTime`` values ``<dateTime.iso8601>``.  JSON-RPC
writes ints as numbers and datetimes as strings, as xapi does.

The encoder is hand-written (``xmlrpc.client.dumps`` indents and is slow) and
caches a record's encoding on the record itself (safe: records are immutable
once stored).  Decoding uses the standard library.
"""

from __future__ import annotations

import json
import xmlrpc.client
from collections.abc import Callable
from typing import Any

from .datamodel import DateTime, Record

_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})


class Records(dict):
    """A ``{ref: Record}`` answer (get_all_records): encoded with the per-record cache."""


# -- XML ----------------------------------------------------------------------


def _xml_str(v: str, out: list[str]) -> None:
    if "&" in v or "<" in v or ">" in v:
        v = v.translate(_ESCAPES)
    out.append(f"<value>{v}</value>")


def _xml_int(v: int, out: list[str]) -> None:
    out.append(f"<value>{v}</value>")


def _xml_bool(v: bool, out: list[str]) -> None:
    out.append("<value><boolean>1</boolean></value>" if v else "<value><boolean>0</boolean></value>")


def _xml_float(v: float, out: list[str]) -> None:
    out.append(f"<value><double>{v!r}</double></value>")


def _xml_date(v: DateTime, out: list[str]) -> None:
    out.append(f"<value><dateTime.iso8601>{v}</dateTime.iso8601></value>")


def _xml_list(v: list[Any] | tuple[Any, ...], out: list[str]) -> None:
    out.append("<value><array><data>")
    for item in v:
        _ENCODERS.get(type(item), _xml_other)(item, out)
    out.append("</data></array></value>")


def _xml_dict(v: dict[str, Any], out: list[str]) -> None:
    # The hot loop of get_all_records: strings and ints, the commonest field
    # values, are written inline rather than through the dispatch table.
    append = out.append
    append("<value><struct>")
    for k, item in v.items():
        if type(k) is not str:
            k = str(k)
        if "&" in k or "<" in k or ">" in k:
            k = k.translate(_ESCAPES)
        t = type(item)
        if t is str:
            if "&" in item or "<" in item or ">" in item:
                item = item.translate(_ESCAPES)
            append(f"<member><name>{k}</name><value>{item}</value></member>")
        elif t is int:
            append(f"<member><name>{k}</name><value>{item}</value></member>")
        elif t is bool:
            append(f"<member><name>{k}</name><value><boolean>{1 if item else 0}</boolean></value></member>")
        else:
            append(f"<member><name>{k}</name>")
            _ENCODERS.get(t, _xml_other)(item, out)
            append("</member>")
    append("</struct></value>")


# Records of a class all have the same keys in the same order (see
# datamodel.ClassDef.defaults), so the "<member><name>…</name>" openings are
# built once per class and zipped with the values.
_MEMBER_OPENINGS: dict[tuple[str, ...], list[str]] = {}


def _member_openings(keys: tuple[str, ...]) -> list[str]:
    openings = _MEMBER_OPENINGS.get(keys)
    if openings is None:
        openings = [f"<member><name>{k.translate(_ESCAPES)}</name>" for k in keys]
        _MEMBER_OPENINGS[keys] = openings
    return openings


def _encode_record(v: Record) -> str:
    out: list[str] = ["<value><struct>"]
    append = out.append
    for opening, item in zip(_member_openings(tuple(v)), v.values(), strict=True):
        t = type(item)
        if t is str:
            if "&" in item or "<" in item or ">" in item:
                item = item.translate(_ESCAPES)
            append(f"{opening}<value>{item}</value></member>")
        elif t is int:
            append(f"{opening}<value>{item}</value></member>")
        elif t is bool:
            append(f"{opening}<value><boolean>{1 if item else 0}</boolean></value></member>")
        else:
            append(opening)
            _ENCODERS.get(t, _xml_other)(item, out)
            append("</member>")
    append("</struct></value>")
    return "".join(out)


def _xml_record(v: Record, out: list[str]) -> None:
    cached = getattr(v, "xml", None)
    if cached is None:
        cached = v.xml = _encode_record(v)
    out.append(cached)


def warm(records: list[Record]) -> None:
    """Encode records ahead of the first request (large pools answer their first
    get_all_records as fast as the next ones).  Never stale: see ``Record``."""
    for rec in records:
        if getattr(rec, "xml", None) is None:
            rec.xml = _encode_record(rec)
        if getattr(rec, "json", None) is None:
            rec.json = _dumps(rec)


def _xml_records(v: Records, out: list[str]) -> None:
    out.append("<value><struct>")
    for ref, rec in v.items():
        out.append(f"<member><name>{ref}</name>")
        _xml_record(rec, out)
        out.append("</member>")
    out.append("</struct></value>")


def _xml_other(v: Any, out: list[str]) -> None:
    if v is None:
        out.append("<value></value>")
    elif isinstance(v, bool):
        _xml_bool(v, out)
    elif isinstance(v, DateTime):
        _xml_date(v, out)
    elif isinstance(v, str):
        _xml_str(v, out)
    elif isinstance(v, int):
        _xml_int(v, out)
    elif isinstance(v, float):
        _xml_float(v, out)
    elif isinstance(v, Record):
        _xml_record(v, out)
    elif isinstance(v, Records):
        _xml_records(v, out)
    elif isinstance(v, dict):
        _xml_dict(v, out)
    elif isinstance(v, (list, tuple, set, frozenset)):
        _xml_list(list(v), out)
    else:
        _xml_str(str(v), out)


_ENCODERS: dict[type, Callable[[Any, list[str]], None]] = {
    str: _xml_str,
    int: _xml_int,
    bool: _xml_bool,
    float: _xml_float,
    DateTime: _xml_date,
    list: _xml_list,
    tuple: _xml_list,
    dict: _xml_dict,
    Record: _xml_record,
    Records: _xml_records,
}


def xml_value(v: Any) -> str:
    """One ``<value>…</value>`` (also what a task's ``result`` field holds)."""
    out: list[str] = []
    _ENCODERS.get(type(v), _xml_other)(v, out)
    return "".join(out)


_HEAD = '<?xml version="1.0"?><methodResponse><params><param>'
_TAIL = "</param></params></methodResponse>"


def xml_success(value: Any) -> bytes:
    out = [_HEAD, "<value><struct><member><name>Status</name><value>Success</value></member><member><name>Value</name>"]
    _ENCODERS.get(type(value), _xml_other)(value, out)
    out.append("</member></struct></value>")
    out.append(_TAIL)
    return "".join(out).encode()


def xml_failure(description: list[str]) -> bytes:
    out = [
        _HEAD,
        "<value><struct><member><name>Status</name><value>Failure</value></member>"
        "<member><name>ErrorDescription</name>",
    ]
    _xml_list([str(d) for d in description], out)
    out.append("</member></struct></value>")
    out.append(_TAIL)
    return "".join(out).encode()


def xml_bare(value: Any) -> bytes:
    """A response without the Status wrapper (system.listMethods, as xapi)."""
    return (_HEAD + xml_value(value) + _TAIL).encode()


class ParseError(Exception):
    """The request body is not a well-formed call: xapi answers HTTP 500."""


def _from_xmlrpc(v: Any) -> Any:
    if isinstance(v, xmlrpc.client.DateTime):
        return DateTime(v.value)
    if isinstance(v, list):
        return [_from_xmlrpc(x) for x in v]
    if isinstance(v, dict):
        return {k: _from_xmlrpc(x) for k, x in v.items()}
    if isinstance(v, (bytes, bytearray)):
        return v.decode("utf-8", "replace")
    return v


def parse_xml_call(body: bytes) -> tuple[str, list[Any]]:
    try:
        params, method = xmlrpc.client.loads(body, use_builtin_types=False)
    except Exception as e:  # expat errors, ResponseError, ValueError, ...
        raise ParseError(f"Xmlrpc.Parse_error({e})") from e
    if not method:
        raise ParseError("Xmlrpc.Parse_error(no methodName)")
    return method, [_from_xmlrpc(p) for p in params]


# -- JSON ---------------------------------------------------------------------

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def json_value(v: Any) -> str:
    if isinstance(v, Records):
        parts = []
        for ref, rec in v.items():
            cached = getattr(rec, "json", None)
            if cached is None:
                cached = _dumps(rec)
                rec.json = cached
            parts.append(f"{_dumps(ref)}:{cached}")
        return "{" + ",".join(parts) + "}"
    return _dumps(v)


def parse_json_call(body: bytes) -> tuple[str, Any, str, list[Any]]:
    """Returns (version "1.0"|"2.0", id, method, params)."""
    try:
        req = json.loads(body)
    except Exception as e:
        raise ParseError(f"Jsonrpc.Malformed_method_request({e})") from e
    if not isinstance(req, dict) or not isinstance(req.get("method"), str) or "id" not in req:
        raise ParseError("Jsonrpc.Malformed_method_request(" + body[:200].decode("utf-8", "replace") + ")")
    params = req.get("params", [])
    if not isinstance(params, list):
        params = [params]
    version = "2.0" if req.get("jsonrpc") == "2.0" else "1.0"
    return version, req["id"], req["method"], params


def json_success(version: str, rid: Any, value: Any) -> bytes:
    if version == "2.0":
        return f'{{"jsonrpc":"2.0","result":{json_value(value)},"id":{_dumps(rid)}}}'.encode()
    return f'{{"result":{json_value(value)},"error":null,"id":{_dumps(rid)}}}'.encode()


def json_failure(version: str, rid: Any, description: list[str]) -> bytes:
    if version == "2.0":
        error = {"code": 1, "message": description[0], "data": description[1:]}
        return _dumps({"jsonrpc": "2.0", "error": error, "id": rid}).encode()
    return _dumps({"result": None, "error": description, "id": rid}).encode()


INTERNAL_ERROR_HTML = (
    "<html><body><h1>HTTP 500 internal server error</h1>An unexpected error occurred; "
    "please wait a while and try again. If the problem persists, please contact your "
    "support representative.<h1> Additional information </h1>{}</body></html>"
)
