"""XAPI errors met while protecting, told as sentences an administrator understands.

XAPI errors carry a code and opaque refs; the sentence names the objects (SR,
network, host, VM) as the inventory knows them.
"""
from __future__ import annotations

from inventory.models import SR, VM, Host, Network, Pool

# Errors that go away by themselves: the step is retried with backoff.
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


def _name(model, pool: Pool | None, ref) -> str:
    if not isinstance(ref, str) or pool is None:
        return str(ref)
    obj = model.objects.filter(pool=pool, ref=ref).only("name_label", "uuid").first()
    if obj is None:
        return ref if not ref.startswith("OpaqueRef:") else "an object the console does not know"
    return f"“{obj.name_label or obj.uuid}”"


def _p(params, i: int):
    return params[i] if len(params) > i else ""


def explain(code: str, params: list | tuple, pool: Pool | None = None) -> str:
    """One sentence saying what went wrong and, where it helps, what to do about it."""
    params = list(params or [])
    sr = lambda i: _name(SR, pool, _p(params, i))  # noqa: E731
    net = lambda i: _name(Network, pool, _p(params, i))  # noqa: E731
    host = lambda i: _name(Host, pool, _p(params, i))  # noqa: E731
    vm = lambda i: _name(VM, pool, _p(params, i))  # noqa: E731
    sentences = {
        "HA_CONSTRAINT_VIOLATION_SR_NOT_SHARED": lambda: (
            f"The VM has a disk on storage repository {sr(0)}, which is not shared by every host, so no other "
            "host could restart it. Move the disk to a shared SR first."
        ),
        "SR_NOT_SHARED": lambda: (
            f"Storage repository {sr(0)} is not shared by every host of the pool: it cannot hold the VM's disks "
            "or the HA heartbeat."
        ),
        "HA_CONSTRAINT_VIOLATION_NETWORK_NOT_SHARED": lambda: (
            f"The VM is connected to network {net(0)}, which not every host can reach, so no other host could "
            "restart it with its network."
        ),
        "VM_IS_NOT_AGILE": lambda: "The VM is tied to one host (local storage or devices), so HA cannot restart it "
        "elsewhere.",
        "VM_HAS_PCI_ATTACHED": lambda: "The VM uses a PCI device of its host, so it cannot restart on another host.",
        "VM_HAS_VGPU": lambda: "The VM uses a virtual GPU of its host, so it cannot restart on another host.",
        "VM_IS_TEMPLATE": lambda: "This is a template, not a VM: templates cannot be protected.",
        "VM_BAD_POWER_STATE": lambda: (
            f"The VM is {_p(params, 2) or 'in the wrong power state'} but must be {_p(params, 1) or 'otherwise'} "
            "for this."
        ),
        "HA_NOT_ENABLED": lambda: "High availability is not enabled on the pool.",
        "HA_IS_ENABLED": lambda: "High availability is already enabled on the pool.",
        "HA_NO_PLAN": lambda: "The pool has no failover plan: its hosts do not have room to restart the protected "
        "VMs after a failure.",
        "HA_OPERATION_WOULD_BREAK_FAILOVER_PLAN": lambda: (
            "Refused: this would break the failover plan — after the configured number of host failures the "
            "protected VMs could no longer all be restarted. Free memory, add a host or lower the host failures "
            "to tolerate."
        ),
        "HA_TOO_FEW_HOSTS": lambda: "The pool has too few hosts for high availability (at least 2 are needed).",
        "HA_HOST_CANNOT_ACCESS_STATEFILE": lambda: (
            "A host cannot reach the heartbeat storage: pick a shared SR that every host has attached."
        ),
        "HA_HOST_IS_ARMED": lambda: f"Host {host(0)} is still armed for HA.",
        "HA_HEARTBEAT_DAEMON_STARTUP_FAILED": lambda: "The HA heartbeat daemon could not start on a host.",
        "HA_ENABLE_IN_PROGRESS": lambda: "High availability is being enabled on the pool right now.",
        "HA_DISABLE_IN_PROGRESS": lambda: "High availability is being disabled on the pool right now.",
        "HOST_OFFLINE": lambda: f"Host {host(0)} is offline.",
        "HOST_NOT_LIVE": lambda: "The host is not live.",
        "HOST_NOT_ENOUGH_FREE_MEMORY": lambda: (
            "No host has enough free memory to start the VM"
            + (f" (needs {int(_p(params, 0)) / 2**30:.1f} GiB)" if str(_p(params, 0)).isdigit() else "")
            + "."
        ),
        "OTHER_OPERATION_IN_PROGRESS": lambda: "Another operation is running on this object; try again shortly.",
        "TOO_BUSY": lambda: "The pool master is too busy right now.",
        "HANDLE_INVALID": lambda: f"The {str(_p(params, 0)).replace('_', ' ') or 'object'} no longer exists in "
        "the pool.",
        "SESSION_AUTHENTICATION_FAILED": lambda: "The pool refused the console's user name or password.",
        "PERMISSION_DENIED": lambda: "The pool's user the console logs in with is not allowed to do this.",
        "RBAC_PERMISSION_DENIED": lambda: "The pool's user the console logs in with is not allowed to do this.",
        "VM_REQUIRES_SR": lambda: f"The VM {vm(0)} needs storage repository {sr(1)}, which this host cannot reach.",
        "VM_REQUIRES_NETWORK": lambda: f"The VM {vm(0)} needs network {net(1)}, which this host has no PIF on.",
        "SR_HAS_NO_PBDS": lambda: f"Storage repository {sr(0)} is not attached to any host.",
        "INVALID_VALUE": lambda: f"XAPI refused the value {_p(params, 1)!s} for {_p(params, 0)!s}.",
        "MESSAGE_METHOD_UNKNOWN": lambda: f"This pool does not support {_p(params, 0) or 'the call'}.",
        "UNREACHABLE": lambda: "The pool master cannot be reached.",
    }
    make = sentences.get(code)
    if make is not None:
        return make()
    detail = ", ".join(str(p) for p in params)
    return f"XAPI refused the operation ({code}{': ' + detail if detail else ''})."


def describe_exception(exc: Exception, pool: Pool | None = None) -> tuple[str, str]:
    """(code, sentence) for any error raised by the XAPI client wrapper."""
    from inventory import xapi

    if isinstance(exc, xapi.XapiUnreachable):
        return "UNREACHABLE", "The pool master cannot be reached: " + _safe(exc)
    if isinstance(exc, xapi.XapiAuthError):
        return "SESSION_AUTHENTICATION_FAILED", explain("SESSION_AUTHENTICATION_FAILED", [], pool)
    if isinstance(exc, xapi.XapiError):
        return exc.code, explain(exc.code, list(exc.params or []), pool)
    return type(exc).__name__, "An unexpected error happened; the administrator can find it in the worker log."


def is_transient(exc: Exception) -> bool:
    from inventory import xapi

    if isinstance(exc, xapi.XapiUnreachable):
        return True
    if isinstance(exc, xapi.XapiAuthError):
        return False
    return isinstance(exc, xapi.XapiError) and exc.code in TRANSIENT_CODES


def _safe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text[:300]
