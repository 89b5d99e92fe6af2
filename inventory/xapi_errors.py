"""XAPI's error codes told as sentences an administrator understands: the console's one vocabulary.

``XapiError.describe()`` (no inventory at hand: objects are named by their refs) and
``inventory.selectors.xapi_error_describe`` (objects named as the inventory knows them) both
read this table, so a code is worded once.  The exceptions the XAPI client raises live here too,
with ``unreachable``, which words a network failure.  Nothing here touches the database.
"""
from __future__ import annotations

import http.client
import socket
import ssl
import xmlrpc.client  # noqa: S411 - XAPI speaks XML-RPC; responses come from the pool we chose to trust
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from xml.parsers.expat import ExpatError

# Errors that go away by themselves: a workflow step retries them with backoff.
TRANSIENT_CODES = frozenset({
    "OTHER_OPERATION_IN_PROGRESS",
    "TOO_BUSY",
    "HOST_STILL_BOOTING",
    "HA_ENABLE_IN_PROGRESS",
    "HA_DISABLE_IN_PROGRESS",
    "HOST_IS_SLAVE",
    "SESSION_INVALID",
    "EVENTS_LOST",
    "DB_UNIQUENESS_CONSTRAINT_VIOLATION",
})

# name(kind, ref) -> how to call the object in a sentence; kind is "SR", "network", "host" or "VM".
Namer = Callable[[str, Any], str]


def plain_name(kind: str, ref: Any) -> str:
    return str(ref)


class _Params:
    def __init__(self, params: Sequence[Any], name: Namer) -> None:
        self.params = list(params or [])
        self.name = name

    def __getitem__(self, i: int) -> str:
        return str(self.params[i]) if len(self.params) > i else ""

    def get(self, i: int, default: str) -> str:
        return self[i] or default

    def sr(self, i: int) -> str:
        return self.name("SR", self[i])

    def net(self, i: int) -> str:
        return self.name("network", self[i])

    def host(self, i: int) -> str:
        return self.name("host", self[i])

    def vm(self, i: int) -> str:
        return self.name("VM", self[i])


def _gib(p: _Params) -> str:
    return f" (needs {int(p[0]) / 2**30:.1f} GiB)" if p[0].isdigit() else ""


SENTENCES: dict[str, Callable[[_Params], str]] = {
    # sessions and the connection
    "SESSION_AUTHENTICATION_FAILED": lambda p: "The pool refused the user name or password.",
    "SESSION_AUTHORIZATION_FAILED": lambda p: "The pool user is not allowed to log in to the XAPI.",
    "SESSION_INVALID": lambda p: "The session with the pool has expired.",
    "HOST_IS_SLAVE": lambda p: f"This host is not the pool master; the master is {p.get(0, '?')}.",
    "EVENTS_LOST": lambda p: "The pool dropped events (too many changes at once); a full resync is needed.",
    "MESSAGE_METHOD_UNKNOWN": lambda p: f"The pool does not know the call {p.get(0, '?')}.",
    "MESSAGE_PARAMETER_COUNT_MISMATCH": lambda p: f"The call {p.get(0, '?')} was sent with the wrong number of "
    "arguments.",
    "XMLRPC_FAULT": lambda p: f"The pool answered with an XML-RPC fault: {p.get(0, '?')}.",
    "UNREACHABLE": lambda p: "The pool master cannot be reached.",
    "TOO_BUSY": lambda p: "The pool master is too busy right now.",
    "PERMISSION_DENIED": lambda p: "The pool's user the console logs in with is not allowed to do this.",
    "RBAC_PERMISSION_DENIED": lambda p: f"The pool user lacks the permission for {p.get(0, 'this')}.",
    # objects
    "HANDLE_INVALID": lambda p: f"The {p.get(0, 'object')} object {p.get(1, '?')} no longer exists in the pool.",
    "UUID_INVALID": lambda p: f"The pool has no {p.get(0, 'object')} with uuid {p.get(1, '?')}.",
    "OPERATION_NOT_ALLOWED": lambda p: f"The pool does not allow this operation: {p.get(0, 'no reason given')}.",
    "OTHER_OPERATION_IN_PROGRESS": lambda p: f"Another operation is in progress on this {p.get(0, 'object')}; "
    "try again shortly.",
    "INVALID_VALUE": lambda p: f"XAPI refused the value {p[1]} for {p[0]}.",
    # VMs and hosts
    "VM_BAD_POWER_STATE": lambda p: f"The VM is {p.get(2, 'in the wrong power state').lower()}; it must be "
    f"{p.get(1, 'otherwise').lower()} for this.",
    "VM_IS_TEMPLATE": lambda p: "This is a template, not a VM: templates cannot be protected.",
    "VM_REQUIRES_SR": lambda p: f"The VM {p.vm(0)} needs storage repository {p.sr(1)}, which this host cannot "
    "reach.",
    "VM_REQUIRES_NETWORK": lambda p: f"The VM {p.vm(0)} needs network {p.net(1)}, which this host has no PIF on.",
    "VM_IS_NOT_AGILE": lambda p: "The VM is tied to one host (local storage or devices), so HA cannot restart it "
    "elsewhere.",
    "VM_HAS_PCI_ATTACHED": lambda p: "The VM uses a PCI device of its host, so it cannot restart on another host.",
    "VM_HAS_VGPU": lambda p: "The VM uses a virtual GPU of its host, so it cannot restart on another host.",
    "HOST_OFFLINE": lambda p: f"Host {p.host(0)} is offline." if p[0] else "The host is offline.",
    "HOST_NOT_LIVE": lambda p: "The host is not live.",
    "HOST_CANNOT_ATTACH_NETWORK": lambda p: "The host cannot attach the VM's network.",
    "HOST_NOT_ENOUGH_FREE_MEMORY": lambda p: f"No host has enough free memory to start the VM{_gib(p)}.",
    # storage
    "SR_NOT_SHARED": lambda p: f"Storage repository {p.sr(0)} is not shared by every host of the pool: it cannot "
    "hold the VM's disks or the HA heartbeat.",
    "SR_HAS_NO_PBDS": lambda p: f"Storage repository {p.sr(0)} is not attached to any host.",
    # high availability
    "HA_CONSTRAINT_VIOLATION_SR_NOT_SHARED": lambda p: (
        f"The VM has a disk on storage repository {p.sr(0)}, which is not shared by every host, so no other "
        "host could restart it. Move the disk to a shared SR first."
    ),
    "HA_CONSTRAINT_VIOLATION_NETWORK_NOT_SHARED": lambda p: (
        f"The VM is connected to network {p.net(0)}, which not every host can reach, so no other host could "
        "restart it with its network."
    ),
    "HA_NOT_ENABLED": lambda p: "High availability is not enabled on the pool.",
    "HA_IS_ENABLED": lambda p: "High availability is already enabled on the pool; disable it first.",
    "HA_NO_PLAN": lambda p: "The pool has no failover plan: its hosts do not have room to restart the protected "
    "VMs after a failure.",
    "HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN": lambda p: (
        "Refused: this would break the failover plan — after the configured number of host failures the "
        "protected VMs could no longer all be restarted. Free memory, add a host or lower the host failures "
        "to tolerate."
    ),
    "HA_TOO_FEW_HOSTS": lambda p: "The pool has too few hosts for high availability (at least 2 are needed).",
    "HA_HOST_CANNOT_ACCESS_STATEFILE": lambda p: (
        "A host cannot reach the heartbeat storage: pick a shared SR that every host has attached."
    ),
    "HA_HOST_IS_ARMED": lambda p: f"Host {p.host(0)} is still armed for HA.",
    "HA_HEARTBEAT_DAEMON_STARTUP_FAILED": lambda p: "The HA heartbeat daemon could not start on a host.",
    "HA_ENABLE_IN_PROGRESS": lambda p: "High availability is being enabled on the pool right now.",
    "HA_DISABLE_IN_PROGRESS": lambda p: "High availability is being disabled on the pool right now.",
}


def sentence(code: str, params: Sequence[Any] = (), name: Namer = plain_name) -> str:
    """One sentence saying what went wrong and, where it helps, what to do about it."""
    make = SENTENCES.get(code)
    if make is not None:
        return make(_Params(params, name))
    detail = ", ".join(str(p) for p in params or [])
    return f"XAPI refused the operation ({code}{': ' + detail if detail else ''})."


# -- exceptions ----------------------------------------------------------------------------------


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


def unreachable(url: str, exc: BaseException, timeout: float | None = None) -> XapiUnreachable:
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
TRANSPORT_ERRORS = (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError, ExpatError,
                     xmlrpc.client.ResponseError)
