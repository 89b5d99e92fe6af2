"""The XAPI client: the only module of the console that imports XenAPI.

``connect`` logs in to a pool (following HOST_IS_SLAVE to the master, trying
fallback addresses when the first is unreachable) and returns an
``XapiClient``; ``pool_client`` does the same for a registered ``Pool``.
Every failure becomes an ``XapiError`` whose ``describe()`` is a sentence an
administrator understands.  Nothing here ever logs or formats a password.
The exceptions live in ``inventory.xapi_errors`` (and are re-exported here),
the wire under the client (XML-RPC transports, JSON-RPC) in ``inventory.xapi_transport``.
"""
from __future__ import annotations

import logging
import xmlrpc.client  # noqa: S411 - XAPI speaks XML-RPC; responses come from the pool we chose to trust
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import XenAPI
from django.conf import settings

from .xapi_errors import (
    TRANSPORT_ERRORS,
    XapiAuthError,
    XapiError,
    XapiUnreachable,
    error_from_failure,
    safe_url,
    unreachable,
)
from .xapi_transport import (
    JsonRpc,
    NoJsonRpc,
    XapiTransport,
    event_decoder,
    frozen_fields,
    make_transport,
    records_decoder,
)

if TYPE_CHECKING:
    from .models import Pool

log = logging.getLogger(__name__)

API_VERSION = "2.0"
ORIGINATOR = "eac"
DEFAULT_TIMEOUT = 60.0
LOGOUT_TIMEOUT = 2.0
# HOST_IS_SLAVE redirections followed before giving up (a pool mid-election can bounce once or twice).
MAX_MASTER_HOPS = 3


# -- the client ----------------------------------------------------------------------------------


class XapiClient:
    """A logged-in XAPI session on the pool master.  Not thread-safe: one per thread.

    ``call("VM.get_record", ref)`` injects the session; a XAPI failure raises
    ``XapiError(code, params)``, a network failure ``XapiUnreachable``.  An expired
    session is renewed transparently by XenAPI; ``renewals`` counts those, so
    that a watcher knows its view may have missed something.
    """

    url: str

    def __init__(self, session: XenAPI.Session, transport: XapiTransport, url: str,
                 *, verify_tls: bool = True, timeout: float | None = None) -> None:
        self._session = session
        self._transport = transport
        self._verify_tls = verify_tls
        self._timeout = timeout
        self._json: JsonRpc | None = None
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
        except TRANSPORT_ERRORS as exc:
            raise unreachable(self.url, exc, self._transport.timeout) from None
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
        decode = event_decoder(frozen_fields(fields)) if fields else None
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
        decode = records_decoder(tuple(fields)) if fields else None
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
                self._json = JsonRpc(self.url, self._verify_tls, self._transport.timeout)
            self._json.timeout = self._transport.timeout
            try:
                return self._json_call(method, args, relogin, decode)
            except NoJsonRpc:
                log.info("xapi: %s has no JSON-RPC endpoint, using XML-RPC", safe_url(self.url))
                self._json_ok = False
        if relogin:
            return self.call(method, *args)
        return self._call_once(method, args)

    def _call_once(self, method: str, args: tuple[Any, ...]) -> Any:
        """An XML-RPC call without XenAPI's automatic new login on SESSION_INVALID."""
        try:
            answer = getattr(self._session, method)(self._session._session, *args)
        except TRANSPORT_ERRORS as exc:
            raise unreachable(self.url, exc, self._transport.timeout) from None
        if not isinstance(answer, dict) or "Status" not in answer:
            raise unreachable(self.url, ValueError("no Status in the answer"))
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
            except TRANSPORT_ERRORS as exc:
                raise unreachable(self.url, exc, self._transport.timeout) from None
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
            if self._transport.aborted:
                # The connection was broken off on purpose (a watcher stopping): end the session on a fresh
                # one, or it would linger on the pool, which caps sessions per user.
                transport = make_transport(self.url, self._verify_tls, LOGOUT_TIMEOUT)
                try:
                    xmlrpc.client.ServerProxy(self.url, transport=transport, allow_none=True).session.logout(handle)
                finally:
                    transport.close()
            else:
                self._session.xenapi.session.logout()
        except (XenAPI.Failure, xmlrpc.client.Fault, *TRANSPORT_ERRORS):
            pass
        finally:
            self._session._session = None
            self._transport.close()
            if self._json is not None:
                self._json.close()


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
        transport = make_transport(current, verify_tls, timeout)
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
                raise unreachable(current, TimeoutError(), timeout) from None
            raise XapiError("XMLRPC_FAULT", [str(exc.faultString)]) from None
        except TRANSPORT_ERRORS as exc:
            transport.close()
            error = unreachable(current, exc, timeout)
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
