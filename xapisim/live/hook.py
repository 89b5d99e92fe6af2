"""``python -m xapisim.live.hook``: the live bed's AM ``[vm] on_promote`` command — unpause the VM through XAPI.

    EAC_AM_RESOURCE=vdi-… EAC_AM_VM=<VM uuid> python -m xapisim.live.hook --credentials <file>

What a Xen host's own toolstack does (``xl unpause``, or xenopsd): with ``--host <uuid>`` (the host the AM runs
on) it first asks the bed's stand-in for it, ``POST /sim/hosts/<host>/domains/<vm>/unpause``, which needs no pool
master; when that cannot (no such domain there, an older bed) it does ``xe vm-unpause uuid=$EAC_AM_VM`` through
XAPI. The credentials file (JSON ``url``, ``user``, ``password``, readable by root only) is written by the bed;
the URL is the simulator's address on the bed's uplink, reachable from every host's namespace, answering as the
pool's master. A master that just died answers nothing until a new one is elected: the hook tries again until
``--timeout`` (under the AM's own bound).
A VM that runs already is not an error (several disks of one VM each run the hook). Exit status 0 once the VM
runs, 1 otherwise, with one line saying why.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
import urllib.request
import xmlrpc.client
from pathlib import Path


class HookError(Exception):
    pass


class Xapi:
    """Just enough of XAPI's XML-RPC: a session and calls that raise HookError with xapi's error."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self.session = ""

    def _proxy(self) -> xmlrpc.client.ServerProxy:
        return xmlrpc.client.ServerProxy(self.url, allow_none=True)

    def call(self, method: str, *params: object) -> object:
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(self.timeout)
        try:
            target = self._proxy()
            for part in method.split("."):
                target = getattr(target, part)
            answer = target(*params)
        finally:
            socket.setdefaulttimeout(old)
        if not isinstance(answer, dict) or answer.get("Status") != "Success":
            details = answer.get("ErrorDescription", answer) if isinstance(answer, dict) else answer
            raise HookError(f"{method}: {details}")
        return answer.get("Value")

    def login(self, user: str, password: str) -> None:
        self.session = str(self.call("session.login_with_password", user, password, "1.0", "eac-am-hook"))

    def logout(self) -> None:
        if self.session:
            with contextlib.suppress(HookError, OSError, xmlrpc.client.Error):
                self.call("session.logout", self.session)


def unpause(xapi: Xapi, vm_uuid: str) -> str:
    """Unpause the VM; what was done, in a few words."""
    vm = str(xapi.call("VM.get_by_uuid", xapi.session, vm_uuid))
    state = xapi.call("VM.get_power_state", xapi.session, vm)
    if state == "Running":
        return "already running"
    if state != "Paused":
        raise HookError(f"VM {vm_uuid} is {state}, not Paused: nothing to unpause")
    try:
        xapi.call("VM.unpause", xapi.session, vm)
    except HookError:
        if xapi.call("VM.get_power_state", xapi.session, vm) == "Running":
            return "already running"  # another disk's hook unpaused it meanwhile
        raise
    return "unpaused"


def local_unpause(url: str, host: str, vm_uuid: str, timeout: float = 2.0) -> str | None:
    """The host's toolstack unpauses the VM's domain: what was done, or None when it cannot (the reason is not
    this hook's to judge: XAPI is asked next)."""
    request = urllib.request.Request(f"{url}/sim/hosts/{host}/domains/{vm_uuid}/unpause", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 - the bed's own http URL
            return str(json.loads(answer.read()).get("done") or "unpaused") + " by the host's toolstack"
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xapisim.live.hook", description=__doc__.split("\n")[0])
    p.add_argument("--credentials", required=True, help="JSON file: url, user, password")
    p.add_argument("--timeout", type=float, default=8.0, help="give up after this many seconds")
    p.add_argument("--host", default="", help="uuid of this host: unpause through its own toolstack first")
    args = p.parse_args(argv)
    vm, resource = os.environ.get("EAC_AM_VM", ""), os.environ.get("EAC_AM_RESOURCE", "")
    if not vm:
        print("hook: EAC_AM_VM is not set", file=sys.stderr)
        return 1
    try:
        creds = json.loads(Path(args.credentials).read_text())
        url, user, password = creds["url"], creds["user"], creds["password"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"hook: cannot read the credentials: {exc}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.timeout
    last = ""
    done = local_unpause(url, args.host, vm) if args.host else None
    if done:
        print(f"hook: VM {vm} {done} (resource {resource})", flush=True)
        return 0
    while True:
        xapi = Xapi(url, timeout=2.0)
        try:
            xapi.login(user, password)
            done = unpause(xapi, vm)
            print(f"hook: VM {vm} {done} (resource {resource})", flush=True)
            return 0
        except (HookError, OSError, xmlrpc.client.Error) as exc:
            last = str(exc)
        finally:
            xapi.logout()
        if time.monotonic() > deadline:
            print(f"hook: VM {vm} not unpaused after {args.timeout:g} s: {last}", file=sys.stderr, flush=True)
            return 1
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
