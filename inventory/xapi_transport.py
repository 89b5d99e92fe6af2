"""The wire under the XAPI client: XML-RPC transports and a JSON-RPC caller, with timeouts and abort.

``make_transport`` gives the xmlrpc transport XenAPI sessions talk through: its socket timeout can
change per call, and ``abort()`` from another thread breaks a call blocked in ``event.from``.
``JsonRpc`` carries the large answers (get_all_records, event.from) over XAPI's /jsonrpc, decoded
by msgspec with only the fields asked for.  Failures become ``inventory.xapi_errors`` exceptions.
"""
from __future__ import annotations

import contextlib
import functools
import http.client
import json
import socket
import ssl
import threading
import xmlrpc.client  # noqa: S411 - XAPI speaks XML-RPC; responses come from the pool we chose to trust
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import msgspec

from .xapi_errors import TRANSPORT_ERRORS, error_from_failure, unreachable

# -- transport -----------------------------------------------------------------------------------


def _shutdown(sock: socket.socket | None) -> None:
    """Wake up a thread blocked reading ``sock`` (closing alone would not, on Linux)."""
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class _TimeoutMixin:
    """An xmlrpc transport whose socket has a timeout, changeable per call, and that can be aborted
    from another thread (to stop a watcher blocked in event.from)."""

    timeout: float | None
    _connection: tuple[Any, http.client.HTTPConnection | None]

    def _setup(self, timeout: float | None) -> None:
        self.timeout = timeout
        self._aborted = False
        self._lock = threading.Lock()

    @property
    def aborted(self) -> bool:
        """Was ``abort()`` called (the connection was broken off on purpose)?"""
        return self._aborted

    def _check(self) -> None:
        if self._aborted:
            raise ConnectionAbortedError(103, "connection closed by the console")

    def _adopt(self, conn: http.client.HTTPConnection) -> http.client.HTTPConnection:
        conn.timeout = self.timeout
        if conn.sock is not None:
            conn.sock.settimeout(self.timeout)
        return conn

    def set_timeout(self, timeout: float | None) -> None:
        self.timeout = timeout
        conn = self._connection[1]
        if conn is not None and conn.sock is not None:
            conn.sock.settimeout(timeout)

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            conn = self._connection[1]
            _shutdown(conn.sock if conn is not None else None)

    def parse_response(self, response: Any) -> Any:
        # The stdlib reads 1 KiB at a time; a get_all_records answer is megabytes.
        parser, unmarshaller = self.getparser()  # type: ignore[attr-defined]
        while True:
            data = response.read(1 << 20)
            if not data:
                break
            parser.feed(data)
        parser.close()
        return unmarshaller.close()


class TimeoutTransport(_TimeoutMixin, xmlrpc.client.Transport):
    def __init__(self, timeout: float | None) -> None:
        super().__init__()
        self._setup(timeout)

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        self._check()
        return self._adopt(super().make_connection(host))


class TimeoutSafeTransport(_TimeoutMixin, xmlrpc.client.SafeTransport):
    def __init__(self, timeout: float | None, context: ssl.SSLContext) -> None:
        super().__init__(context=context)
        self._setup(timeout)

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        self._check()
        return self._adopt(super().make_connection(host))


def _tls_context(verify: bool) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if not verify:
        # The administrator chose to trust this pool's self-signed certificate.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


XapiTransport = TimeoutTransport | TimeoutSafeTransport


def make_transport(url: str, verify_tls: bool, timeout: float | None) -> XapiTransport:
    if urlsplit(url).scheme == "https":
        return TimeoutSafeTransport(timeout, _tls_context(verify_tls))
    return TimeoutTransport(timeout)


# -- JSON decoding (msgspec: in C, and it skips the fields nobody asked for without building them) -----


class _Envelope(msgspec.Struct):
    result: msgspec.Raw = msgspec.Raw(b"null")
    error: Any = None


class _Event(msgspec.Struct, rename={"cls": "class"}):
    cls: str = ""
    operation: str = ""
    ref: str = ""
    id: Any = None
    snapshot: msgspec.Raw = msgspec.Raw(b"null")


class _EventBatch(msgspec.Struct):
    events: list[_Event] = []
    token: str = ""


_NULL = msgspec.Raw(b"null")
_ENVELOPE = msgspec.json.Decoder(_Envelope)
_ANY = msgspec.json.Decoder()


def frozen_fields(fields: Mapping[str, Sequence[str]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple(sorted((cls.lower(), tuple(names)) for cls, names in fields.items()))


@functools.cache
def _record_type(fields: tuple[str, ...]) -> type[msgspec.Struct]:
    return msgspec.defstruct("Record", [(name, Any, None) for name in fields])


@functools.cache
def records_decoder(fields: tuple[str, ...]) -> Callable[[bytes], dict[str, dict[str, Any]]]:
    decoder = msgspec.json.Decoder(dict[str, _record_type(fields)])
    asdict = msgspec.structs.asdict

    def decode(raw: bytes) -> dict[str, dict[str, Any]]:
        return {ref: asdict(record) for ref, record in decoder.decode(raw).items()}

    return decode


@functools.cache
def event_decoder(fields: tuple[tuple[str, tuple[str, ...]], ...]) -> Callable[[bytes], dict[str, Any]]:
    batch_decoder = msgspec.json.Decoder(_EventBatch)
    snapshot_decoders = {cls: msgspec.json.Decoder(_record_type(names)) for cls, names in fields}
    asdict = msgspec.structs.asdict

    def decode(raw: bytes) -> dict[str, Any]:
        batch = batch_decoder.decode(raw)
        events = []
        for e in batch.events:
            event: dict[str, Any] = {"id": e.id, "class": e.cls, "operation": e.operation, "ref": e.ref}
            if e.snapshot != _NULL:
                decoder = snapshot_decoders.get(e.cls.lower())
                event["snapshot"] = asdict(decoder.decode(e.snapshot)) if decoder else _ANY.decode(e.snapshot)
            events.append(event)
        return {"events": events, "token": batch.token}

    return decode


class NoJsonRpc(Exception):
    """The server has no /jsonrpc endpoint: the client falls back to XML-RPC."""


class JsonRpc:
    """A minimal JSON-RPC 2.0 caller for XAPI's /jsonrpc, on a kept-alive connection."""

    def __init__(self, url: str, verify_tls: bool, timeout: float | None) -> None:
        parts = urlsplit(url)
        self.url = url
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port
        self.verify_tls = verify_tls
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self._aborted = False
        self._id = 0

    def _connection(self) -> http.client.HTTPConnection:
        if self._aborted:
            raise ConnectionAbortedError(103, "connection closed by the console")
        if self._conn is None:
            if self.https:
                self._conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                         context=_tls_context(self.verify_tls))
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        self._conn.timeout = self.timeout
        if self._conn.sock is not None:
            self._conn.sock.settimeout(self.timeout)
        return self._conn

    def call(self, method: str, params: list[Any], decode: Callable[[bytes], Any] | None = None) -> Any:
        self._id += 1
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": self._id}).encode()
        for attempt in range(2):
            conn = self._connection()
            try:
                conn.request("POST", "/jsonrpc", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                # A kept-alive connection the server closed meanwhile: retry once on a fresh one.
                self.close()
                if attempt or self._aborted:
                    raise unreachable(self.url, exc, self.timeout) from None
                continue
            except TRANSPORT_ERRORS as exc:
                self.close()
                raise unreachable(self.url, exc, self.timeout) from None
            break
        if response.status in (404, 405, 501):
            raise NoJsonRpc()
        if response.status != 200:
            raise unreachable(self.url, xmlrpc.client.ProtocolError(self.url, response.status, response.reason, {}))
        try:
            answer = _ENVELOPE.decode(data)
        except msgspec.DecodeError as exc:
            raise unreachable(self.url, ValueError(str(exc))) from None
        error = answer.error
        if error:
            if isinstance(error, dict):  # JSON-RPC 2.0: {"message": code, "data": params}
                raise error_from_failure([error.get("message", "UNKNOWN_ERROR"), *(error.get("data") or [])])
            raise error_from_failure(error if isinstance(error, list) else [str(error)])
        try:
            return (decode or _ANY.decode)(answer.result)
        except msgspec.DecodeError as exc:
            raise unreachable(self.url, ValueError(str(exc))) from None

    def abort(self) -> None:
        self._aborted = True
        _shutdown(self._conn.sock if self._conn is not None else None)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
