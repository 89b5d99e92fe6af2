"""The XAPI client: the only module of the console that imports XenAPI.

``connect`` logs in to a pool (following HOST_IS_SLAVE to the master, trying
fallback addresses when the first is unreachable) and returns an
``XapiClient``; ``pool_client`` does the same for a registered ``Pool``.
Every failure becomes an ``XapiError`` whose ``describe()`` is a sentence an
administrator understands.  Nothing here ever logs or formats a password.
"""
from __future__ import annotations

import contextlib
import functools
import http.client
import json
import logging
import socket
import ssl
import threading
import xmlrpc.client  # noqa: S411 - XAPI speaks XML-RPC; responses come from the pool we chose to trust
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit
from xml.parsers.expat import ExpatError

import msgspec
import XenAPI
from django.conf import settings

from .xapi_errors import TRANSIENT_CODES, sentence

if TYPE_CHECKING:
    from .models import Pool

log = logging.getLogger(__name__)

API_VERSION = "2.0"
ORIGINATOR = "eac"
DEFAULT_TIMEOUT = 60.0
LOGOUT_TIMEOUT = 2.0
# HOST_IS_SLAVE redirections followed before giving up (a pool mid-election can bounce once or twice).
MAX_MASTER_HOPS = 3


# -- errors --------------------------------------------------------------------------------------


class XapiError(Exception):
    """A failure reported by XAPI (``code`` and ``params`` as in its ErrorDescription) or on the way to it."""

    code: str
    params: list[str]

    def __init__(self, code: str, params: Sequence[Any] = (), message: str | None = None) -> None:
        self.code = code
        self.params = [str(p) for p in params]
        self._message = message
        super().__init__(code, *self.params)

    def describe(self) -> str:
        """A sentence an administrator understands (never a password)."""
        return self._message or sentence(self.code, self.params)

    @property
    def transient(self) -> bool:
        """Would the same call likely succeed a little later (a step retries it with backoff)?"""
        return self.code in TRANSIENT_CODES

    def __str__(self) -> str:
        return self.describe()


class XapiUnreachable(XapiError):
    """The pool cannot be reached, or what answers is not a XAPI (network, timeout, TLS, HTTP)."""

    transient = True


class XapiAuthError(XapiError):
    """The pool refused the credentials."""

    transient = False


_AUTH_CODES = {"SESSION_AUTHENTICATION_FAILED", "SESSION_AUTHORIZATION_FAILED"}


def error_from_failure(details: Sequence[Any]) -> XapiError:
    """The XapiError for a XAPI ErrorDescription ``[code, *params]``."""
    code = str(details[0]) if details else "UNKNOWN_ERROR"
    params = list(details[1:])
    if code in _AUTH_CODES:
        # Only the code: some servers echo the user name, none must echo more.
        return XapiAuthError(code)
    return XapiError(code, params)


def safe_url(url: str) -> str:
    """The URL without any user:password@ part, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _unreachable(url: str, exc: BaseException, timeout: float | None = None) -> XapiUnreachable:
    """Turn a transport-level exception into a sentence that says what went wrong where."""
    where = safe_url(url)
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or "certificate verify failed"
        msg = (
            f"The TLS certificate of {where} cannot be verified ({reason}). "
            "If the pool uses a self-signed certificate, turn off TLS verification for it."
        )
    elif isinstance(exc, ssl.SSLError):
        msg = f"The TLS handshake with {where} failed ({exc.reason or exc}). Is it an https:// address?"
    elif isinstance(exc, ConnectionRefusedError):
        msg = f"Nothing answers at {where} (connection refused)."
    elif isinstance(exc, TimeoutError):
        limit = f" within {timeout:g} s" if timeout else ""
        msg = f"{where} did not answer{limit} (timed out)."
    elif isinstance(exc, socket.gaierror):
        msg = f"The host name of {where} cannot be resolved."
    elif isinstance(exc, xmlrpc.client.ProtocolError):
        msg = f"{where} answered HTTP {exc.errcode} {exc.errmsg}: is it the address of a XenServer / XCP-ng host?"
    elif isinstance(exc, (ExpatError, http.client.HTTPException, xmlrpc.client.ResponseError, ValueError)):
        msg = f"{where} does not answer like a XenServer / XCP-ng host."
    elif isinstance(exc, ConnectionError):
        msg = f"The connection to {where} was lost ({exc.strerror or type(exc).__name__})."
    elif isinstance(exc, OSError):
        msg = f"{where} cannot be reached ({exc.strerror or exc})."
    else:
        msg = f"{where} cannot be reached ({type(exc).__name__})."
    return XapiUnreachable("UNREACHABLE", [where], message=msg)


# Exceptions that mean "no usable XAPI at the other end" rather than a XAPI failure.
_TRANSPORT_ERRORS = (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError, ExpatError,
                     xmlrpc.client.ResponseError)


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


class _Transport(_TimeoutMixin, xmlrpc.client.Transport):
    def __init__(self, timeout: float | None) -> None:
        super().__init__()
        self._setup(timeout)

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        self._check()
        return self._adopt(super().make_connection(host))


class _SafeTransport(_TimeoutMixin, xmlrpc.client.SafeTransport):
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


def _transport(url: str, verify_tls: bool, timeout: float | None) -> _Transport | _SafeTransport:
    if urlsplit(url).scheme == "https":
        return _SafeTransport(timeout, _tls_context(verify_tls))
    return _Transport(timeout)


# -- the client ----------------------------------------------------------------------------------


class XapiClient:
    """A logged-in XAPI session on the pool master.  Not thread-safe: one per thread.

    ``call("VM.get_record", ref)`` injects the session; a XAPI failure raises
    ``XapiError(code, params)``, a network failure ``XapiUnreachable``.  An expired
    session is renewed transparently by XenAPI; ``renewals`` counts those, so
    that a watcher knows its view may have missed something.
    """

    url: str

    def __init__(self, session: XenAPI.Session, transport: _Transport | _SafeTransport, url: str,
                 *, verify_tls: bool = True, timeout: float | None = None) -> None:
        self._session = session
        self._transport = transport
        self._verify_tls = verify_tls
        self._timeout = timeout
        self._json: _JsonRpc | None = None
        self._json_ok = True
        self.url = url
        self.renewals = 0

    def __repr__(self) -> str:
        return f"<XapiClient {safe_url(self.url)}>"

    def __enter__(self) -> XapiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.logout()

    @property
    def session_ref(self) -> str:
        return self._session._session or ""

    def call(self, method: str, *args: Any) -> Any:
        """Call ``method`` (e.g. ``"VM.get_record"``) with the session injected as first argument."""
        handle = self._session._session
        try:
            result = self._session.xenapi_request(method, args)
        except XenAPI.Failure as exc:
            raise error_from_failure(exc.details) from None
        except xmlrpc.client.Fault as exc:
            # XenAPI raises Faults of its own: SESSION_INVALID even after logging in again, or a timeout.
            if exc.faultCode == 504:
                raise XapiUnreachable("UNREACHABLE", [safe_url(self.url)],
                                      message=f"{safe_url(self.url)} did not answer (timed out).") from None
            if "session" in str(exc.faultString).lower():
                raise XapiError("SESSION_INVALID", [str(exc.faultString)]) from None
            raise XapiError("XMLRPC_FAULT", [str(exc.faultString)]) from None
        except _TRANSPORT_ERRORS as exc:
            raise _unreachable(self.url, exc, self._transport.timeout) from None
        if self._session._session != handle and handle is not None:
            self.renewals += 1
            log.info("xapi: session on %s expired and was renewed", safe_url(self.url))
        return result

    def event_from(self, classes: Sequence[str], token: str, timeout: float,
                   fields: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
        """``event.from``: blocks up to ``timeout`` seconds, so the socket waits that long plus the usual.

        ``fields`` ({event class: field names}): only those fields of the snapshots
        of those classes are decoded (see ``get_all_records``).  Unlike other calls,
        an expired session raises ``XapiError("SESSION_INVALID")`` instead of
        logging in again: the token may be worth nothing on the other side any
        more (a restarted master), so the caller should resync."""
        self._transport.set_timeout(timeout + (self._timeout or DEFAULT_TIMEOUT))
        decode = _event_decoder(_frozen_fields(fields)) if fields else None
        try:
            return self.bulk("event.from", list(classes), token, float(timeout), relogin=False, decode=decode)
        finally:
            self._transport.set_timeout(self._timeout)

    def get_all_records(self, xapi_class: str, fields: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """``<xapi_class>.get_all_records`` as {ref: record}.

        With ``fields``, only those fields are decoded (a missing one is None): a
        VM record has over a hundred fields, and skipping the unused ones makes
        reading a 10,000-VM pool several times faster.  Over XML-RPC (a server
        without JSON-RPC) the records come whole."""
        decode = _records_decoder(tuple(fields)) if fields else None
        return self.bulk(f"{xapi_class}.get_all_records", decode=decode) or {}

    def bulk(self, method: str, *args: Any, relogin: bool = True, decode: Callable[[bytes], Any] | None = None) -> Any:
        """``call`` for answers that can be large (get_all_records, event.from).

        These go over XAPI's JSON-RPC endpoint when the server has one: parsing
        tens of megabytes of XML-RPC in Python takes seconds, JSON a fraction of
        that.  The values differ only in that ints arrive as numbers instead of
        strings.  A server without /jsonrpc falls back to XML-RPC for good.
        ``decode`` turns the raw JSON of the result into values (default: all of it).
        """
        if self._json_ok:
            if self._json is None:
                self._json = _JsonRpc(self.url, self._verify_tls, self._transport.timeout)
            self._json.timeout = self._transport.timeout
            try:
                return self._json_call(method, args, relogin, decode)
            except _NoJsonRpc:
                log.info("xapi: %s has no JSON-RPC endpoint, using XML-RPC", safe_url(self.url))
                self._json_ok = False
        if relogin:
            return self.call(method, *args)
        return self._call_once(method, args)

    def _call_once(self, method: str, args: tuple[Any, ...]) -> Any:
        """An XML-RPC call without XenAPI's automatic new login on SESSION_INVALID."""
        try:
            answer = getattr(self._session, method)(self._session._session, *args)
        except _TRANSPORT_ERRORS as exc:
            raise _unreachable(self.url, exc, self._transport.timeout) from None
        if not isinstance(answer, dict) or "Status" not in answer:
            raise _unreachable(self.url, ValueError("no Status in the answer"))
        if answer["Status"] == "Success":
            return answer.get("Value")
        raise error_from_failure(answer.get("ErrorDescription") or ["UNKNOWN_ERROR"])

    def _json_call(self, method: str, args: tuple[Any, ...], relogin: bool,
                   decode: Callable[[bytes], Any] | None) -> Any:
        for attempt in range(2):
            handle = self._session._session
            try:
                return self._json.call(method, [handle, *args], decode)  # type: ignore[union-attr]
            except XapiError as exc:
                if exc.code != "SESSION_INVALID" or attempt or not relogin:
                    raise
            # Log in again as XenAPI does for XML-RPC calls (it kept the credentials, we never see them).
            try:
                self._session._login(self._session.last_login_method, self._session.last_login_params)
            except XenAPI.Failure as exc:
                raise error_from_failure(exc.details) from None
            except _TRANSPORT_ERRORS as exc:
                raise _unreachable(self.url, exc, self._transport.timeout) from None
            self.renewals += 1
            log.info("xapi: session on %s expired and was renewed", safe_url(self.url))
        raise AssertionError("unreachable")  # pragma: no cover

    def abort(self) -> None:
        """Break a call blocked in another thread (it raises XapiUnreachable); the client is then unusable."""
        self._transport.abort()
        if self._json is not None:
            self._json.abort()

    def logout(self) -> None:
        """End the session; errors are ignored (the pool may be gone already)."""
        handle = self._session._session
        try:
            if handle is None:
                return
            if self._transport._aborted:
                # The connection was broken off on purpose (a watcher stopping): end the session on a fresh
                # one, or it would linger on the pool, which caps sessions per user.
                transport = _transport(self.url, self._verify_tls, LOGOUT_TIMEOUT)
                try:
                    xmlrpc.client.ServerProxy(self.url, transport=transport, allow_none=True).session.logout(handle)
                finally:
                    transport.close()
            else:
                self._session.xenapi.session.logout()
        except (XenAPI.Failure, xmlrpc.client.Fault, *_TRANSPORT_ERRORS):
            pass
        finally:
            self._session._session = None
            self._transport.close()
            if self._json is not None:
                self._json.close()


class _NoJsonRpc(Exception):
    pass


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


def _frozen_fields(fields: Mapping[str, Sequence[str]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple(sorted((cls.lower(), tuple(names)) for cls, names in fields.items()))


@functools.cache
def _record_type(fields: tuple[str, ...]) -> type[msgspec.Struct]:
    return msgspec.defstruct("Record", [(name, Any, None) for name in fields])


@functools.cache
def _records_decoder(fields: tuple[str, ...]) -> Callable[[bytes], dict[str, dict[str, Any]]]:
    decoder = msgspec.json.Decoder(dict[str, _record_type(fields)])
    asdict = msgspec.structs.asdict

    def decode(raw: bytes) -> dict[str, dict[str, Any]]:
        return {ref: asdict(record) for ref, record in decoder.decode(raw).items()}

    return decode


@functools.cache
def _event_decoder(fields: tuple[tuple[str, tuple[str, ...]], ...]) -> Callable[[bytes], dict[str, Any]]:
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


class _JsonRpc:
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
                    raise _unreachable(self.url, exc, self.timeout) from None
                continue
            except _TRANSPORT_ERRORS as exc:
                self.close()
                raise _unreachable(self.url, exc, self.timeout) from None
            break
        if response.status in (404, 405, 501):
            raise _NoJsonRpc()
        if response.status != 200:
            raise _unreachable(self.url, xmlrpc.client.ProtocolError(self.url, response.status, response.reason, {}))
        try:
            answer = _ENVELOPE.decode(data)
        except msgspec.DecodeError as exc:
            raise _unreachable(self.url, ValueError(str(exc))) from None
        error = answer.error
        if error:
            if isinstance(error, dict):  # JSON-RPC 2.0: {"message": code, "data": params}
                raise error_from_failure([error.get("message", "UNKNOWN_ERROR"), *(error.get("data") or [])])
            raise error_from_failure(error if isinstance(error, list) else [str(error)])
        try:
            return (decode or _ANY.decode)(answer.result)
        except msgspec.DecodeError as exc:
            raise _unreachable(self.url, ValueError(str(exc))) from None

    def abort(self) -> None:
        self._aborted = True
        _shutdown(self._conn.sock if self._conn is not None else None)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# -- connecting ----------------------------------------------------------------------------------


def url_with_host(url: str, address: str) -> str:
    """``url`` pointed at another host, keeping its scheme and port (how HOST_IS_SLAVE is followed)."""
    parts = urlsplit(url)
    host = address.strip()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _login(url: str, username: str, password: str, verify_tls: bool, timeout: float | None) -> XapiClient:
    """Log in at ``url``, following HOST_IS_SLAVE to the master."""
    current = url
    visited: list[str] = []
    for _ in range(MAX_MASTER_HOPS + 1):
        transport = _transport(current, verify_tls, timeout)
        session = XenAPI.Session(current, transport=transport)
        try:
            session.login_with_password(username, password, API_VERSION, ORIGINATOR)
        except XenAPI.Failure as exc:
            transport.close()
            details = list(exc.details)
            if details and details[0] == "HOST_IS_SLAVE" and len(details) > 1:
                visited.append(current)
                current = url_with_host(current, str(details[1]))
                log.info("xapi: %s is not the pool master, following it to %s", safe_url(visited[-1]),
                         safe_url(current))
                continue
            raise error_from_failure(details) from None
        except xmlrpc.client.Fault as exc:
            transport.close()
            if exc.faultCode == 504:
                raise _unreachable(current, TimeoutError(), timeout) from None
            raise XapiError("XMLRPC_FAULT", [str(exc.faultString)]) from None
        except _TRANSPORT_ERRORS as exc:
            transport.close()
            error = _unreachable(current, exc, timeout)
            if visited:
                error = XapiUnreachable(
                    "UNREACHABLE", error.params,
                    message=f"{safe_url(visited[-1])} says the pool master is {safe_url(current)}, "
                            f"but: {error.describe()}",
                )
            raise error from None
        return XapiClient(session, transport, current, verify_tls=verify_tls, timeout=timeout)
    raise XapiError("HOST_IS_SLAVE", [], message="The pool master cannot be found: the hosts keep pointing "
                    f"elsewhere ({' -> '.join(safe_url(u) for u in [*visited, current])}).")


def connect(url: str, username: str, password: str, *, verify_tls: bool = True, timeout: float | None = None,
            fallback_urls: Sequence[str] = ()) -> XapiClient:
    """Log in to the pool whose master is (or was) at ``url``.

    Follows HOST_IS_SLAVE to the master, keeping scheme and port.  If ``url``
    cannot be reached, tries each of ``fallback_urls`` (the other hosts of the
    pool) in turn.  Wrong credentials or another XAPI failure stop at once.
    Raises ``XapiUnreachable``, ``XapiAuthError`` or ``XapiError``.
    """
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    candidates: list[str] = []
    for candidate in (url, *fallback_urls):
        if candidate and candidate not in candidates:
            candidates.append(candidate)
    failures: list[XapiUnreachable] = []
    for candidate in candidates:
        try:
            client = _login(candidate, username, password, verify_tls, timeout)
        except XapiUnreachable as exc:
            failures.append(exc)
            continue
        if failures:
            log.info("xapi: %s unreachable, connected to the pool through %s", safe_url(url), safe_url(client.url))
        return client
    if not failures:
        raise XapiUnreachable("UNREACHABLE", [], message="No address to connect to.")
    if len(failures) == 1:
        raise failures[0]
    raise XapiUnreachable(
        "UNREACHABLE", [safe_url(c) for c in candidates],
        message=f"None of the pool's {len(candidates)} addresses answered. {failures[0].describe()}",
    )


def _host_addresses(pool: Pool) -> list[str]:
    """Management addresses of the pool's known hosts, the best master candidates first
    (the current master, then live hosts): where to look when the master is unreachable."""
    rows = pool.hosts.exclude(address="").order_by("-is_master", "-live", "name_label")
    return list(dict.fromkeys(rows.values_list("address", flat=True)))


def pool_client(pool: Pool, *, timeout: float | None = None) -> XapiClient:
    """A session on ``pool``'s master: tries where the master was last found, the configured URL, then
    every known host of the pool (same scheme and port); records where the master is now."""
    base = pool.master_url or pool.url
    fallbacks = [pool.url, *(url_with_host(pool.url, address) for address in _host_addresses(pool))]
    client = connect(base, pool.username, pool.password, verify_tls=pool.verify_tls,
                     timeout=settings.EAC_XAPI_TIMEOUT if timeout is None else timeout, fallback_urls=fallbacks)
    if client.url != pool.master_url:
        if pool.master_url:
            log.info("xapi: pool %s: master moved from %s to %s", pool.name, safe_url(pool.master_url),
                     safe_url(client.url))
        type(pool).objects.filter(pk=pool.pk).update(master_url=client.url)
        pool.master_url = client.url
    return client


__all__ = [
    "XapiError", "XapiUnreachable", "XapiAuthError", "XapiClient", "connect", "pool_client", "url_with_host",
    "safe_url", "error_from_failure",
]
