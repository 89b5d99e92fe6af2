"""``python -m xapisim --preset demo --live``: the pool's hosts and a few guests as real namespaces and processes.

One bed per module (starting it takes about a second). The tests drive it as the console would, with the
unmodified XenAPI package and the /sim/ API, and look at the machines: the guest's answers seen from the client
namespace, its records on the disk image, its process, the namespaces left after a stop. Root only.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support import XapisimCommand, wait_for, xapi_login
from xapisim.live.guest_core import LogScanner
from xapisim.live.netns import Namespaces, netns_names

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("ip") or Path("/usr/sbin/ip").exists())
    or not (shutil.which("nft") or Path("/usr/sbin/nft").exists()),
    reason="the live bed needs root, ip and nft (network namespaces, veths, nftables)",
)

HA_TIMEOUT = 1.0


def start_live(tmp: Path) -> XapisimCommand:
    bind = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}.1"
    return XapisimCommand(
        "--preset", "demo", "--live", "--port", "0", "--bind", bind, "--op-delay", "0",
        "--ha-timeout", str(HA_TIMEOUT), "--live-dir", str(tmp / "bed"), log=tmp / "xapisim.log",
    ).start()


class Live:
    def __init__(self, cmd: XapisimCommand) -> None:
        self.cmd = cmd
        self.session = xapi_login(cmd.url)
        self.api = self.session.xenapi
        self.bed = cmd.control("GET", "/sim/live")
        self.ns = Namespaces(self.bed["prefix"])  # only to enter the bed's namespaces: it owns none of them

    def live(self) -> dict:
        return self.cmd.control("GET", "/sim/live")

    def guest(self, name: str) -> dict | None:
        return next((g for g in self.live()["guests"] if g["vm"] == name), None)

    def running_guest(self, name: str) -> dict | None:
        """The VM's guest if it has run: not one reserved for a VM started paused (it waits, touching nothing)."""
        guest = self.guest(name)
        return guest if guest is not None and not guest["reserved"] else None

    def vm(self, name: str) -> str:
        return self.api.VM.get_by_name_label(name)[0]

    def ip(self, name: str) -> str:
        return self.api.VM.get_other_config(self.vm(name))["xapisim_live_ip"]

    def in_client(self, fn):
        """Run ``fn`` in a thread inside the client namespace (sockets it opens stay there)."""
        out: dict = {}

        def run() -> None:
            with self.ns.in_ns("client"):
                try:
                    out["value"] = fn()
                except BaseException as exc:  # handed back to the caller's thread
                    out["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(30)
        if "error" in out:
            raise out["error"]
        return out["value"]

    def connect(self, name: str, timeout: float = 10.0) -> Conn:
        def attempt():
            # the bed gives a VM its address when it starts its guest, just after XAPI's answer to the start
            ip = self.api.VM.get_other_config(self.vm(name)).get("xapisim_live_ip")
            if ip is None:
                return None
            with contextlib.suppress(OSError):
                return Conn(self.in_client(lambda: socket.create_connection((ip, 7000), timeout=1)))
            return None

        return wait_for(attempt, timeout=timeout, message=f"{name}'s guest to accept a connection")

    def log(self) -> str:
        return self.cmd.proc.output()[-5000:]


@contextlib.contextmanager
def running_bed(tmp: Path):
    """A live bed started in ``tmp`` and a logged-in ``Live`` of it, for a ``with`` block (a module's fixture);
    the bed stopped after it, its namespaces and processes gone."""
    cmd = start_live(tmp)
    live = None
    try:
        live = Live(cmd)
        yield live
    finally:
        if live is not None:
            with contextlib.suppress(Exception):
                live.session.xenapi.session.logout()
        cmd.stop()


def bridge_ports(live: Live, host: str) -> list[str]:
    """The ports of ``host``'s xenbr0 (its NIC, its guests' VIFs, pairing interfaces)."""
    ns = next(h["namespace"] for h in live.live()["hosts"] if h["name"] == host)
    out = subprocess.run(["ip", "-n", ns, "-o", "link", "show", "master", "xenbr0"], capture_output=True, text=True,
                         check=True, timeout=10).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


class Conn:
    """A client connection to a guest; a receive that times out can be tried again (no file object)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def receive(self, timeout: float = 5.0) -> str:
        self.sock.settimeout(timeout)
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the guest closed the connection")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()

    def ask(self, line: str, timeout: float = 5.0) -> str:
        self.send(line)
        return self.receive(timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def process_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z", "X")


def records_on_disk(bed: dict, export: str) -> list[bytes]:
    """The guest's log read straight from its image, as a restarted guest would read it."""
    image = next((Path(bed["workdir"]) / "srs").glob(f"*/{export}.img"))  # <sr_root>/<SR uuid>/<VDI uuid>.img
    data = image.open("rb").read(1 << 20)
    scanner = LogScanner(len(data))
    while (want := scanner.want()) is not None:
        scanner.feed(data[want[0] : want[0] + want[1]])
    return [r.payload for r in scanner.records]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with running_bed(tmp_path_factory.mktemp("live")) as bed:
        yield bed


def am_status(host: dict) -> dict | None:
    """GET /v1/status of a host's AM, from the simulator's namespace; None while it does not answer."""
    token = Path(host["am"]["token_file"]).read_text().strip()
    request = urllib.request.Request(host["am"]["api"] + "/v1/status", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return json.loads(response.read())
    except OSError:
        return None


def host_of(live: Live, name: str) -> str:
    return live.api.host.get_name_label(live.api.VM.get_resident_on(live.vm(name)))


# -- the tests -------------------------------------------------------------------------------------------------


def test_the_bed_has_a_namespace_per_host_an_am_per_paired_host_and_guests_for_flagged_running_vms(live):
    bed = live.live()
    assert [h["name"] for h in bed["hosts"]] == ["xcp-host-1", "xcp-host-2", "xcp-host-3", "xcp-host-4"]
    assert set(netns_names(bed["prefix"])) >= {h["namespace"] for h in bed["hosts"]}
    assert [h["am"]["peer"] for h in bed["hosts"]] == ["xcp-host-2", "xcp-host-1", "xcp-host-4", "xcp-host-3"]
    assert {g["vm"] for g in bed["guests"]} == {"web-01", "web-02", "vpn-gw"}
    for g in bed["guests"]:
        vifs = live.api.VM.get_VIFs(live.vm(g["vm"]))
        assert g["mac"] in {live.api.VIF.get_MAC(v) for v in vifs}, "the guest's NIC has its VIF's MAC"
        nic = subprocess.run(["ip", "-n", g["namespace"], "-o", "link", "show", "eth0"], capture_output=True,
                             text=True, timeout=10).stdout
        assert f"link/ether {g['mac']} " in nic
        port = subprocess.run(["ip", "-n", next(h["namespace"] for h in bed["hosts"] if h["name"] == g["host"]),
                               "-o", "link", "show", "master", "xenbr0"], capture_output=True, text=True,
                              timeout=10).stdout
        domid = live.api.VM.get_domid(live.vm(g["vm"]))
        assert f" vif{domid}.0@" in port, "the guest's port is on its host's bridge"
        assert g["host"] == host_of(live, g["vm"])
    # Each AM answers its API from the bed's uplink (the simulator's namespace), with the bed's token.
    wait_for(lambda: (am_status(bed["hosts"][0]) or {}).get("peer", {}).get("state") == "connected", timeout=20,
             message="xcp-host-1's AM to see its peer")


def test_a_started_vm_runs_a_guest_that_acknowledges_only_what_is_on_its_disk(live):
    vm = live.vm("backup-proxy")
    assert live.api.VM.get_power_state(vm) == "Halted"
    assert live.guest("backup-proxy") is None
    live.api.VM.start(vm, False, False)
    conn = live.connect("backup-proxy")
    try:
        assert conn.ask("PING") == "PONG backup-proxy"
        answers = [conn.ask(f"PUT request {i}") for i in range(1, 6)]
        assert answers == [f"OK {i}" for i in range(1, 6)]
        guest = live.guest("backup-proxy")
        assert records_on_disk(live.bed, guest["disk"]["export"]) == [f"request {i}".encode() for i in range(1, 6)]
        assert conn.ask("GET 3") == "VAL 3 request 3"
    finally:
        conn.close()
    # A reboot is a new guest process, which reads its disk back.
    live.api.VM.clean_reboot(vm)
    wait_for(lambda: (g := live.guest("backup-proxy")) and g["pid"] != guest["pid"], message="a new guest process")
    assert not alive(guest["pid"])
    conn = live.connect("backup-proxy")
    try:
        assert conn.ask("COUNT") == "COUNT 5"
        assert conn.ask("GET 5") == "VAL 5 request 5"
        assert conn.ask("PUT after reboot") == "OK 6"
    finally:
        conn.close()
    live.api.VM.clean_shutdown(vm)
    wait_for(lambda: live.guest("backup-proxy") is None, message="the guest to stop")
    assert not alive(guest["pid"])
    assert records_on_disk(live.bed, guest["disk"]["export"])[-1] == b"after reboot"


def test_flagging_another_vm_gives_it_a_live_guest_and_an_address(live):
    vm = live.vm("dev-sandbox")
    assert "xapisim_live_ip" not in live.api.VM.get_other_config(vm)
    live.api.VM.add_to_other_config(vm, "xapisim_live_guest", "true")
    live.api.VM.start(vm, False, False)
    conn = live.connect("dev-sandbox")
    try:
        assert conn.ask("PING") == "PONG dev-sandbox"
    finally:
        conn.close()
    assert live.guest("dev-sandbox")["ip"] == live.ip("dev-sandbox")
    live.api.VM.hard_shutdown(vm)
    wait_for(lambda: live.guest("dev-sandbox") is None, message="the guest to stop")


def test_pause_stops_the_guest_process_and_unpause_lets_it_answer(live):
    vm = live.vm("web-01")
    conn = live.connect("web-01")
    try:
        pid = live.guest("web-01")["pid"]
        live.api.VM.pause(vm)
        wait_for(lambda: process_state(pid) == "T", message="the guest process to be stopped")
        conn.send("PUT while paused")
        live.api.VM.unpause(vm)
        assert conn.receive().startswith("OK ")
        assert process_state(pid) in ("S", "R")
    finally:
        conn.close()
    assert live.api.VM.get_power_state(vm) == "Running"


def test_a_nic_cut_makes_the_guest_unreachable_and_xapi_shows_the_carrier(live):
    host = host_of(live, "web-01")
    href = live.api.host.get_by_name_label(host)[0]
    pif = next(p for p in live.api.host.get_PIFs(href) if live.api.PIF.get_device(p) == "eth0")
    conn = live.connect("web-01")
    try:
        assert conn.ask("PING") == "PONG web-01"
        live.cmd.control("POST", f"/sim/hosts/{host}/nic", {"up": False})
        assert live.api.PIF_metrics.get_carrier(live.api.PIF.get_metrics(pif)) is False
        with pytest.raises(OSError):  # a timeout: the cut is silent
            live.in_client(lambda: socket.create_connection((live.ip("web-01"), 7000), timeout=1))
        conn.send("PUT across the cut")
        with pytest.raises(TimeoutError):
            conn.receive(timeout=0.5)
        live.cmd.control("POST", f"/sim/hosts/{host}/nic", {"up": True})
        assert live.api.PIF_metrics.get_carrier(live.api.PIF.get_metrics(pif)) is True
        # TCP retransmits: the session survives the cut and the answer arrives.
        assert conn.receive(timeout=15).startswith("OK ")
    finally:
        conn.close()


def test_a_failed_disk_answers_errors_and_stores_nothing_until_repaired(live):
    host = host_of(live, "web-02")
    conn = live.connect("web-02")
    try:
        before = conn.ask("COUNT")
        live.cmd.control("POST", f"/sim/hosts/{host}/disk", {"failed": True})
        assert conn.ask("PUT lost").startswith("ERR ")
        assert conn.ask("COUNT") == before
        live.cmd.control("POST", f"/sim/hosts/{host}/disk", {"failed": False})
        assert conn.ask("PUT kept").startswith("OK ")
    finally:
        conn.close()


def test_a_cut_availability_link_is_seen_by_the_ams(live):
    host = live.live()["hosts"][2]

    def link_a():
        status = am_status(host)
        return status and status["peer"]["links"]["a"]["state"]

    wait_for(lambda: link_a() == "Up", timeout=20, message="link a up")
    live.cmd.control("POST", f"/sim/hosts/{host['name']}/links/a", {"up": False})
    assert live.live()["hosts"][2]["links_cut"] == ["a"]
    wait_for(lambda: link_a() == "Down", timeout=10, message="the AM to see link a down")
    live.cmd.control("POST", f"/sim/hosts/{host['name']}/links/a", {"up": True})
    wait_for(lambda: link_a() == "Up", timeout=10, message="link a back up")


def test_a_guest_crash_through_sim_kills_the_guest_and_a_guest_that_dies_crashes_its_vm(live):
    vm = live.vm("web-01")
    pid = live.guest("web-01")["pid"]
    live.cmd.control("POST", "/sim/vms/web-01/crash")
    wait_for(lambda: live.guest("web-01") is None and not alive(pid), message="the guest to be killed")
    assert live.api.VM.get_power_state(vm) == "Halted"
    live.api.VM.start(vm, False, False)
    pid = wait_for(lambda: (g := live.guest("web-01")) and g["pid"], message="the guest to start again")
    # The process dies on its own: XAPI shows the VM crashed.
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: live.api.VM.get_power_state(vm) == "Halted", message="the VM to be Halted")
    messages = live.api.message.get_all_records()
    assert any(m["name"] == "VM_CRASHED" and m["obj_uuid"] == live.api.VM.get_uuid(vm) for m in messages.values())
    live.api.VM.start(vm, False, False)
    wait_for(lambda: live.guest("web-01"), message="web-01's guest back")


def test_a_host_crash_kills_its_guests_and_its_am_and_xapi_follows(live):
    vm = live.vm("web-02")
    host = host_of(live, "web-02")
    entry = next(h for h in live.live()["hosts"] if h["name"] == host)
    guest = live.guest("web-02")
    am_pids = Namespaces(live.bed["prefix"]).pids(entry["namespace"].split("-", 1)[1])
    assert am_pids, "the host runs its AM and its disk server"
    live.cmd.control("POST", f"/sim/hosts/{host}/crash")
    wait_for(lambda: not alive(guest["pid"]), message="the guest to die with its host")
    wait_for(lambda: not any(alive(p) for p in am_pids), message="the host's processes to die")
    with pytest.raises(OSError):
        live.in_client(lambda: socket.create_connection((live.ip("web-02"), 7000), timeout=1))
    wait_for(lambda: live.api.VM.get_power_state(vm) == "Halted", timeout=HA_TIMEOUT + 5,
             message="XAPI to declare the host dead")
    live.cmd.control("POST", f"/sim/hosts/{host}/power-on")
    wait_for(lambda: Namespaces(live.bed["prefix"]).pids(entry["namespace"].split("-", 1)[1]),
             message="the host's AM and disk server to start again")
    href = live.api.host.get_by_name_label(host)[0]
    wait_for(lambda: live.api.host_metrics.get_live(live.api.host.get_metrics(href)), message="the host to be live")
    live.api.VM.start_on(vm, href, False, False)
    conn = live.connect("web-02")
    try:
        assert conn.ask("GET 1").startswith("VAL 1 "), "the guest's disk survived the host crash"
    finally:
        conn.close()


def test_ha_restarts_a_protected_live_vm_on_a_survivor_whose_guest_answers_from_the_same_disk(live):
    vm = live.vm("vpn-gw")
    conn = live.connect("vpn-gw")
    try:
        stored = conn.ask("PUT before the failover")
        assert stored.startswith("OK ")
    finally:
        conn.close()
    seq = stored.split()[1]
    shared = next(r for r, sr in live.api.SR.get_all_records().items() if sr["shared"])
    crashed = live.api.VM.get_resident_on(vm)
    crashed_name = live.api.host.get_name_label(crashed)
    live.api.VM.set_ha_restart_priority(vm, "restart")
    live.api.pool.enable_ha([shared], {"timeout": "1"})
    try:
        old = live.guest("vpn-gw")
        live.cmd.control("POST", f"/sim/hosts/{crashed_name}/crash")
        wait_for(lambda: not alive(old["pid"]), message="the guest to die with its host")
        wait_for(lambda: live.api.VM.get_power_state(vm) == "Running" and live.api.VM.get_resident_on(vm) != crashed,
                 timeout=15, message="HA to restart the VM on a survivor")
        guest = wait_for(lambda: live.guest("vpn-gw"), message="the guest on the survivor")
        assert guest["host"] != crashed_name
        conn = live.connect("vpn-gw")
        try:
            assert conn.ask(f"GET {seq}") == f"VAL {seq} before the failover"
        finally:
            conn.close()
    finally:
        live.api.pool.disable_ha()
        live.api.VM.set_ha_restart_priority(vm, "")
        live.cmd.control("POST", f"/sim/hosts/{crashed_name}/power-on")


def test_sigterm_leaves_no_namespace_no_process_and_no_interface(tmp_path):
    cmd = start_live(tmp_path)
    control = Live(cmd)
    bed = control.bed
    pids = [g["pid"] for g in bed["guests"]]
    assert pids and netns_names(bed["prefix"])
    assert cmd.stop() == 0
    assert netns_names(bed["prefix"]) == []
    assert not any(alive(p) for p in pids)
    leftovers = subprocess.run(["pgrep", "-f", bed["workdir"]], capture_output=True, text=True).stdout.split()
    assert leftovers == []
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert bed["uplink"]["interface"] not in links


def test_bad_live_fault_requests_get_4xx_and_change_nothing(live):
    cases = [
        ("POST", "/sim/hosts/no-such-host/nic", {"up": False}, 404),
        ("POST", "/sim/hosts/xcp-host-1/nic", {"up": "no"}, 400),
        ("POST", "/sim/hosts/xcp-host-1/disk", {}, 400),
        ("POST", "/sim/hosts/xcp-host-1/links/c", {"up": False}, 404),
        ("GET", "/sim/hosts/xcp-host-1/nic", None, 405),
        ("POST", "/sim/live", None, 405),
    ]
    for method, path, body, expected in cases:
        with pytest.raises(urllib.error.HTTPError) as failure:
            live.cmd.control(method, path, body)
        assert failure.value.code == expected, (method, path)
        assert json.loads(failure.value.read())["error"]
    host = live.live()["hosts"][0]
    assert (host["nic_up"], host["disk_failed"], host["links_cut"]) == (True, False, [])


def test_live_mode_refuses_another_preset():
    done = subprocess.run(
        [sys.executable, "-m", "xapisim", "--preset", "generated", "--live", "--port", "0"],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 2
    assert "demo preset only" in done.stderr
