"""What tests/xapisim/test_live_level2.py and the Level 2 benchmarks share to follow docs/level2.md by hand on the
live bed (``python -m xapisim --preset demo --live``): a host's AM API, a writing client in the client namespace,
the pool's master of the moment, the secondary VM made as the console makes it, and a whole protection by hand.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import XenAPI

from tests.support import wait_for, xapi_login
from tests.xapisim.test_live import Conn, Live

RESOURCE_KEY = "eac_am_resource"


class AM:
    """One host's AM management API, from the simulator's namespace (the bed's uplink)."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Authorization": f"Bearer {self.token}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                text = response.read()
                return response.status, json.loads(text) if text else None
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def peer_state(self) -> str | None:
        with contextlib.suppress(OSError):
            code, body = self.call("GET", "/v1/status")
            return body["peer"]["state"] if code == 200 else None
        return None

    def resource(self, name: str) -> dict | None:
        with contextlib.suppress(OSError):
            code, body = self.call("GET", f"/v1/resources/{name}")
            return body if code == 200 else None
        return None


class Writer(threading.Thread):
    """A client in the client namespace PUTting numbered records to one address, reconnecting whenever its
    connection fails; ``acked`` maps each acknowledged sequence number to its record.

    ``connect_timeout`` and ``read_timeout`` bound how long it waits for a connection and for an answer: the
    latter is how long it takes to notice that the guest it writes to is gone (its host crashed: no answer, no
    reset). With ``identify``, each connection asks the guest its name (``PING``) right after its first
    acknowledgement, so that every acknowledgement can be told apart by who gave it (``acked_by``)."""

    def __init__(self, live: Live, ip: str, *, connect_timeout: float = 0.5, read_timeout: float = 1.0,
                 identify: bool = False) -> None:
        super().__init__(name="level2-writer", daemon=True)
        self.live, self.ip = live, ip
        self.connect_timeout, self.read_timeout, self.identify = connect_timeout, read_timeout, identify
        self.acked: dict[int, str] = {}
        self.acked_at: list[float] = []  # monotonic time of each acknowledgement
        self.acked_on: list[int] = []  # the connection (its number) of each acknowledgement
        self.names: dict[int, str] = {}  # connection number -> the guest's name, with ``identify``
        self.errors: list[str] = []
        self.halt = threading.Event()
        self.n = 0
        self.connections = 0
        self._lock = threading.Lock()

    def run(self) -> None:
        with self.live.ns.in_ns("client"):
            while not self.halt.is_set():
                try:
                    sock = socket.create_connection((self.ip, 7000), timeout=self.connect_timeout)
                except OSError:
                    time.sleep(0.02)
                    continue
                self.connections += 1
                try:
                    self._write(sock, self.connections)
                except OSError:
                    pass
                finally:
                    sock.close()

    def _write(self, sock: socket.socket, number: int) -> None:
        sock.settimeout(self.read_timeout)  # an answer slower than that: the connection is dead (its host crashed)
        buffer = b""

        def line() -> str:
            nonlocal buffer
            while b"\n" not in buffer:
                data = sock.recv(4096)
                if not data:
                    raise ConnectionError("closed")
                buffer += data
            text, _, buffer = buffer.partition(b"\n")
            return text.decode()

        while not self.halt.is_set():
            self.n += 1
            record = f"record-{self.n}"
            sock.sendall(f"PUT {record}\n".encode())
            answer = line()
            words = answer.split()
            if words[:1] == ["OK"]:
                now = time.monotonic()
                with self._lock:
                    self.acked[int(words[1])] = record
                    self.acked_at.append(now)
                    self.acked_on.append(number)
                if self.identify and number not in self.names:
                    sock.sendall(b"PING\n")
                    pong = line()
                    self.names[number] = pong.removeprefix("PONG ")
            else:
                self.errors.append(answer)
            time.sleep(0.005)

    def count(self) -> int:
        return len(self.acked)

    def acked_by(self, name: str, after: float = 0.0) -> list[float]:
        """The times of the acknowledgements given by guest ``name`` (``identify``) after monotonic ``after``."""
        with self._lock:
            acks = list(zip(self.acked_at, self.acked_on, strict=True))
        return [t for t, number in acks if t > after and self.names.get(number) == name]

    def stop(self) -> None:
        self.halt.set()
        self.join(10)


def master_session(live: Live, hosts: int = 4):
    """(a XenAPI session, its URL) with the pool's master of now (host 1, the first master, may have crashed);
    None while no master answers (one is elected after the HA timeout)."""
    base, port = live.cmd.url.rsplit(":", 1)
    prefix = base.rsplit(".", 1)[0]
    for i in range(1, hosts + 1):
        url = f"{prefix}.{i}:{port}"
        try:
            return xapi_login(url), url
        except XenAPI.Failure as exc:
            if exc.details[0] == "HOST_IS_SLAVE":
                with contextlib.suppress(OSError, XenAPI.Failure):
                    url = f"http://{exc.details[1]}:{port}"
                    return xapi_login(url), url
        except OSError:
            continue
    return None


def bed_state(url: str) -> dict:
    with urllib.request.urlopen(url + "/sim/live", timeout=5) as response:
        return json.loads(response.read())


def connect(live: Live, ip: str) -> Conn:
    def attempt():
        with contextlib.suppress(OSError):
            return Conn(live.in_client(lambda: socket.create_connection((ip, 7000), timeout=1)))
        return None

    return wait_for(attempt, timeout=10, message=f"a guest to accept a connection on {ip}")


def first_disk(api, vm: str) -> str:
    return next(api.VBD.get_VDI(b) for b in sorted(api.VM.get_VBDs(vm), key=api.VBD.get_userdevice)
                if api.VBD.get_type(b) == "Disk" and not api.VBD.get_empty(b))


def copy_for_secondary(api, vm: str, name: str, sr: str) -> str:
    """The secondary VM of ``vm`` on SR ``sr``, made as docs/level2.md says: a copy of a snapshot (xapi copies
    only a halted VM or a snapshot), the snapshot and its disks removed, no longer a template, with the primary's
    VIFs (its MACs)."""
    snap = api.VM.snapshot(vm, f"{name} (eAC seed)")
    copy = api.VM.copy(snap, f"{name} (eAC secondary)", sr)
    seed_disks = [api.VBD.get_VDI(b) for b in api.VM.get_VBDs(snap) if not api.VBD.get_empty(b)]
    api.VM.destroy(snap)
    for disk in seed_disks:
        api.VDI.destroy(disk)
    api.VM.set_is_a_template(copy, False)
    for vif in api.VM.get_VIFs(copy):
        api.VIF.destroy(vif)
    for vif in api.VM.get_VIFs(vm):
        record = api.VIF.get_record(vif)
        api.VIF.create({key: record[key] for key in ("device", "network", "MAC", "MTU", "other_config",
                                                      "qos_algorithm_type", "qos_algorithm_params")} | {"VM": copy})
    return copy


def protect_by_hand(live: Live, vm_name: str, primary: str, epoch_ms: int | None = None) -> dict:
    """``vm_name`` (a live guest, resident on ``primary``) protected at Level 2 by hand as docs/level2.md says: its
    disk routed through the primary's AM while paused, the secondary VM on the AM peer's local SR with its replica
    resynced, started paused. What the caller needs of it: ``vm``, ``copy``, ``resource``, ``secondary`` (a name),
    ``hosts`` and ``ams`` (each by host name). A step that does not happen fails with an AssertionError.

    With ``epoch_ms``, Level 3: both AM resources are checkpointed with that epoch and the VM's MACs."""
    api = live.api
    token = (Path(live.live()["workdir"]) / "am" / "mgmt.token").read_text().strip()
    host_p = api.host.get_by_name_label(primary)[0]
    config_p = api.host.get_other_config(host_p)
    assert "eac_am_peer" in config_p, f"{primary} has no AM on the live bed (the pairs are hosts 1-2 and 3-4)"
    host_s = api.host.get_by_uuid(config_p["eac_am_peer"])
    secondary = api.host.get_name_label(host_s)
    am_p, am_s = AM(config_p["eac_am_url"], token), AM(api.host.get_other_config(host_s)["eac_am_url"], token)
    wait_for(lambda: am_p.peer_state() == "connected", timeout=20, message=f"the AMs of {primary} and {secondary}")
    vm = live.vm(vm_name)
    assert api.VM.get_resident_on(vm) == host_p, f"{vm_name} is not on {primary}"

    vdi = first_disk(api, vm)
    vdi_uuid, sr_uuid = api.VDI.get_uuid(vdi), api.SR.get_uuid(api.VDI.get_SR(vdi))
    name = f"vdi-{vdi_uuid}"
    level3 = {} if epoch_ms is None else {"checkpoint": {
        "epoch_ms": epoch_ms, "macs": sorted(api.VIF.get_MAC(v).lower() for v in api.VM.get_VIFs(vm))}}
    api.VM.pause(vm)
    code, body = am_p.call("POST", "/v1/resources", {"name": name, "role": "primary", "sr": sr_uuid,
                                                      "vdi": vdi_uuid, "vm": api.VM.get_uuid(vm)} | level3)
    assert code == 201, f"the primary resource: {code} {body}"
    api.VDI.add_to_other_config(vdi, RESOURCE_KEY, name)
    api.VM.unpause(vm)

    local_s = api.SR.get_by_name_label(f"Local storage {secondary}")[0]
    copy = copy_for_secondary(api, vm, vm_name, local_s)
    replica = first_disk(api, copy)
    code, body = am_s.call("POST", "/v1/resources", {"name": name, "role": "secondary", "sr": api.SR.get_uuid(local_s),
                                                      "vdi": api.VDI.get_uuid(replica), "vm": api.VM.get_uuid(copy)}
                           | level3)
    assert code == 201, f"the secondary resource: {code} {body}"
    api.VDI.add_to_other_config(replica, RESOURCE_KEY, name)
    wait_for(lambda: (am_s.resource(name) or {}).get("disk") == "UpToDate", timeout=120,
             message="the secondary's full resync")
    api.VM.start_on(copy, host_s, True, False)
    assert api.VM.get_power_state(copy) == "Paused", "the secondary VM did not start paused"
    return {"vm": vm, "copy": copy, "resource": name, "secondary": secondary,
            "hosts": {primary: host_p, secondary: host_s}, "ams": {primary: am_p, secondary: am_s}}
