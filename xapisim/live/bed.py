"""The live test bed: the simulated pool's hosts, links and live guests as namespaces and processes (root only).

Topology (namespaces ``<prefix>-<name>``, the prefix ``xs`` + 4 random hex digits; X derived from it, chosen so
that no route of the root namespace already covers 10.X.0.0/16)::

    namespace   what                                             address
    lan         bridge ``sw``: the switch of the application network
    la, lb      bridge ``sw``: availability-link networks A and B
    h<i>        host i (1-based, the pool's order): bridge ``xenbr0``   10.X.0.(10+i)/20   (dom0's address)
                  ``eth0`` (the NIC, a port of xenbr0) <-> lan ``h<i>``
                  ``alink`` <-> la ``h<i>``                          10.X.16.(10+i)/24
                  ``blink`` <-> lb ``h<i>``                          10.X.17.(10+i)/24
                  ``pa``, ``pb``: VXLANs to the peer's ``pa``/``pb`` over ``alink``/``blink`` (AM pairs only), in
                  no bridge: the AM's network pairing puts one into xenbr0 when a NIC fails (``xapisim.live.pairing``)
                  its AM (management :7480, NBD :10809, links :7481), its disk server (:10810)
                  ``vif<domid>.0``: a guest's port on xenbr0
    witness     ``eth0`` on the lan, the AM witness (:7490)       10.X.0.2/20
    client      ``eth0`` on the lan                               10.X.0.3/20
    g<uuid8>    one live guest: ``eth0`` (its VIF's MAC)          10.X.1.n/20, service on :7000
    (root)      ``<prefix>-up`` on the lan: the simulator's own namespace reaches every address above
                                                                  10.X.0.1/20

The AMs are paired in the pool's order (hosts 1-2, 3-4...; an odd last host runs none), share one witness and one
management token (``<workdir>/am/mgmt.token``), and have ``testbed.fault_injection`` on. Their ``[network]`` section
names ``xenbr0``, ``eth0`` and the pairing interfaces ``pa`` (link A) and ``pb`` (link B): when a host's NIC loses
its carrier (``POST /sim/hosts/<h>/nic {"up": false}`` sets its switch-side end down), its AM, while it protects a VM
(a resource primary there), moves the host's guests' traffic through the peer's NIC over a link; cutting that link
(``/sim/hosts/<h>/links/<a|b>``) cuts the pairing on it too, since the VXLAN rides the link. The links carry
1550-byte frames (the VXLAN's 50 bytes on top of 1500).

A reconcile thread keeps the machines matching the pool (``reconcile.plan``): it wakes on every change of the
store and on every host power change, reads what should run, and acts. A live guest's process that exits on its
own is a guest crash: its VM becomes Halted with ``VM_CRASHED`` (HA restarts it if it is protected).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import faults
from . import pairing
from .faults import LiveRoutes
from .guest import closed_port_table
from .migrate import LiveMigrations, move_guest
from .netns import IP, Namespaces, NetnsError, cut_table, drop_table, free_prefix
from .reconcile import (
    LINKS,
    Action,
    BootHost,
    CrashHost,
    GuestState,
    HostState,
    MigrateGuest,
    Migration,
    PauseGuest,
    ReserveGuest,
    SetDisk,
    SetLink,
    SetNic,
    StartGuest,
    StopGuest,
    World,
    after,
    plan,
)

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger("xapisim.live")

# other_config keys of a VM: the flag that asks for a live guest, and the address the bed gave it.
LIVE_GUEST_KEY = "xapisim_live_guest"
LIVE_IP_KEY = "xapisim_live_ip"
# Host other_config keys that say where a host's AM is (docs/level2.md), and the VDI other_config key that routes
# a disk through its host's AM.
AM_URL_KEY = "eac_am_url"
AM_PEER_KEY = "eac_am_peer"
AM_RESOURCE_KEY = "eac_am_resource"
# VDI types that are disks of a guest: the bed keeps an image for each.
IMAGE_TYPES = ("user", "system")
# The small VMs of the demo preset that get a live guest in live mode (backup-proxy starts Halted).
DEMO_LIVE_GUESTS = ("web-01", "web-02", "vpn-gw", "backup-proxy")

MGMT_PORT, AM_NBD_PORT, LINK_PORT, WITNESS_PORT = 7480, 10809, 7481, 7490
DISK_PORT = 10810
GUEST_PORT = 7000
# How long a clean guest stop may take before the guest is killed.
STOP_GRACE = 3.0


@dataclass
class LiveGuest:
    vm: str
    name: str
    uuid: str
    namespace: str  # short name
    ip: str
    mac: str
    host: str
    disk: str  # "address:port" of its NBD server ("" while reserved: told when it goes on)
    export: str
    proc: subprocess.Popen
    endpoint_file: Path  # where the guest reads its disk's endpoint (rewritten while it is paused)
    paused: bool = False
    stopping: bool = False
    vif: str = ""  # its port on its host's xenbr0
    reserved: bool = False  # its VM was started paused: the process waits for its order to go on


def copy_sparse(source: Path, target: Path) -> None:
    """Copy the data of a sparse image, not its holes: a copied VDI of many GiB costs what its guest wrote."""
    with source.open("rb") as src, target.open("wb") as dst:
        size = os.fstat(src.fileno()).st_size
        at = 0
        while at < size:
            try:
                at = os.lseek(src.fileno(), at, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after ``at``
                break
            end = os.lseek(src.fileno(), at, os.SEEK_HOLE)
            src.seek(at)
            dst.seek(at)
            while at < end:
                chunk = src.read(min(1 << 20, end - at))
                if not chunk:
                    break
                dst.write(chunk)
                at += len(chunk)
        dst.truncate(size)


def write_endpoint(path: Path, endpoint: str) -> None:
    """Replace a guest's endpoint file at once: the guest reads either the old endpoint or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(endpoint + "\n")
    os.replace(tmp, path)


def _root_routes() -> str:
    out = subprocess.run([IP, "-4", "route", "show", "table", "all"], capture_output=True, text=True, timeout=10)
    return out.stdout


def _free_octet(prefix: str) -> int:
    """The X of 10.X.0.0/16 for this bed: derived from the prefix, moved on while a root route overlaps it."""
    routes = _root_routes()
    used = []
    for word in routes.split():
        with contextlib.suppress(ValueError):
            used.append(ipaddress.ip_network(word, strict=False))
    octet = 20 + zlib.crc32(prefix.encode()) % 200
    for step in range(200):
        x = 20 + (octet - 20 + step) % 200
        net = ipaddress.ip_network(f"10.{x}.0.0/16")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return x
    raise NetnsError("no free 10.X.0.0/16 for the live bed")


class LiveBed:
    """The machines of one simulated pool. ``start()`` builds them and starts following the pool; ``stop()``
    removes every namespace, process and nft table it made (also run at exit)."""

    def __init__(self, engine: Engine, workdir: str | os.PathLike | None = None, prefix: str | None = None,
                 xapi_port: int | None = None) -> None:
        self.engine = engine
        # The port the simulator also serves on the uplink address (``Simulator.listen_as_master``): the AMs'
        # on_promote hook reaches XAPI there. None: no hook.
        self.xapi_port = xapi_port
        self.prefix = prefix or free_prefix("xs")
        # The guests' checkpoint control sockets (Level 3): a short path, as a Unix socket's is at most 107 bytes
        self.control_dir = Path(tempfile.gettempdir()) / f"{self.prefix}-ctl"
        self.ns = Namespaces(self.prefix)
        self.octet = _free_octet(self.prefix)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.token = secrets.token_hex(16)
        self.host_ns: dict[str, str] = {}  # host ref -> short namespace name
        self.peers: dict[str, str] = {}  # host ref -> its AM peer
        self.guests: dict[str, LiveGuest] = {}  # VM ref -> its running guest
        self.guest_ips: dict[str, str] = {}  # VM ref -> its address, kept across restarts
        self.migrations: dict[str, Migration] = {}  # VM ref -> its live migration not done yet (engine lock)
        self.link_cuts: set[tuple[str, str]] = set()  # (host ref, "a" | "b")
        self.disk_failed: set[str] = set()
        self.host_procs: dict[str, dict[str, subprocess.Popen]] = {}
        self.have = World()
        self._lock = threading.Lock()  # one reconcile at a time
        self._poked = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous_power_hook: Any = None
        self._previous_storage_hook: Any = None
        self._hooked = False
        self._started = False

    # -- addresses ---------------------------------------------------------------------------------------

    def host_index(self, host: str) -> int:
        return self.engine.host_index(host) + 1

    def host_addr(self, host: str) -> str:
        return f"10.{self.octet}.0.{10 + self.host_index(host)}"

    def link_addr(self, host: str, link: str) -> str:
        return f"10.{self.octet}.{16 + LINKS.index(link)}.{10 + self.host_index(host)}"

    @property
    def witness_addr(self) -> str:
        return f"10.{self.octet}.0.2"

    @property
    def client_addr(self) -> str:
        return f"10.{self.octet}.0.3"

    @property
    def uplink_addr(self) -> str:
        return f"10.{self.octet}.0.1"

    def host_name(self, host: str) -> str:
        return self.engine.store.tables["host"][host]["name_label"]

    @property
    def sr_root(self) -> Path:
        """The storage repositories' images: ``<sr_root>/<SR uuid>/<VDI uuid>.img`` (every AM's ``sr_root``)."""
        return self.workdir / "srs"

    def image_of(self, vdi: str) -> Path:
        """A VDI's image (call with the engine's lock held)."""
        store = self.engine.store
        rec = store.tables["VDI"][vdi]
        return self.sr_root / store.tables["SR"][rec["SR"]]["uuid"] / f"{rec['uuid']}.img"

    @property
    def hook_credentials(self) -> Path:
        return self.workdir / "xapi" / "hook.json"

    # -- start ---------------------------------------------------------------------------------------------

    def start(self) -> LiveBed:
        if os.geteuid() != 0:
            raise PermissionError("the live bed needs root (network namespaces)")
        started = time.monotonic()
        try:
            self._build()
            self._images()
            self._advertise_ams()
            self._mark_live_guests()
            self._start_witness()
            self._hook()
            self.reconcile()
            self._wait_for_ams()
        except BaseException:
            self.stop()
            raise
        self._thread = threading.Thread(target=self._follow, name="xapisim-live", daemon=True)
        self._thread.start()
        self._started = True
        log.info("live bed %s up in %.1fs (10.%d.0.0/16, workdir %s)", self.prefix, time.monotonic() - started,
                 self.octet, self.workdir)
        return self

    def _build(self) -> None:
        engine, p, n = self.engine, self.prefix, self.ns.netns
        for sub in ("srs", "am", "logs", "guests", "xapi"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.control_dir.mkdir(mode=0o700, exist_ok=True)
        (self.workdir / "xapi").chmod(0o700)
        if self.xapi_port is not None:
            # The hook's XAPI credentials, readable by root only (as a host's own xapi is root's).
            fd = os.open(self.hook_credentials, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)  # a file left by an earlier run keeps its mode otherwise
            with os.fdopen(fd, "w") as f:
                json.dump({"url": f"http://{self.uplink_addr}:{self.xapi_port}", "user": engine.config.user,
                           "password": engine.config.password}, f)
        (self.workdir / "am" / "mgmt.token").write_text(self.token)
        (self.workdir / "am" / "witness.token").write_text(secrets.token_hex(16))
        for i, host in enumerate(engine.hosts):
            self.host_ns[host] = f"h{i + 1}"
        for i in range(0, len(engine.hosts) - 1, 2):
            a, b = engine.hosts[i], engine.hosts[i + 1]
            self.peers[a], self.peers[b] = b, a
        hosts = list(self.host_ns.values())
        names = ["lan", "la", "lb", "witness", "client", *hosts]
        bridge = "type bridge stp_state 0 forward_delay 0"
        root = [f"link add sw netns {n(s)} {bridge}" for s in ("lan", "la", "lb")]
        for host, h in self.host_ns.items():
            # A bridge takes the lowest MAC of its ports unless given one: a guest's port joining would change
            # dom0's MAC under the guests' ARP caches.
            mac = f"02:00:{self.octet:02x}:00:00:{self.host_index(host):02x}"
            root += [
                f"link add xenbr0 netns {n(h)} address {mac} {bridge}",
                f"link add eth0 netns {n(h)} index {pairing.NIC_IFINDEX} type veth peer name {h} netns {n('lan')}",
                f"link add alink netns {n(h)} type veth peer name {h} netns {n('la')}",
                f"link add blink netns {n(h)} type veth peer name {h} netns {n('lb')}",
            ]
        for other in ("witness", "client"):
            root.append(f"link add eth0 netns {n(other)} type veth peer name {other} netns {n('lan')}")
        root += [
            f"link add {p}-up type veth peer name uplink netns {n('lan')}",
            f"addr add {self.uplink_addr}/20 dev {p}-up",
            f"link set {p}-up up",
        ]
        self.ns.add_namespaces(names, root)
        per_ns: dict[str, list[str]] = {}
        lan_ports = [*hosts, "witness", "client", "uplink"]
        for switch, ports in (("lan", lan_ports), ("la", hosts), ("lb", hosts)):
            per_ns[switch] = ["link set lo up", "link set sw up"]
            per_ns[switch] += [line for port in ports for line in (f"link set {port} master sw", f"link set {port} up")]
            if switch != "lan":
                per_ns[switch] += pairing.switch_lines(hosts)
        for host, h in self.host_ns.items():
            per_ns[h] = [
                "link set lo up",
                f"addr add {self.host_addr(host)}/20 dev xenbr0",
                "link set xenbr0 up",
                "link set eth0 master xenbr0",
                "link set eth0 up",
                f"addr add {self.link_addr(host, 'a')}/24 dev alink",
                "link set alink up",
                f"addr add {self.link_addr(host, 'b')}/24 dev blink",
                "link set blink up",
                *pairing.host_lines(self, host),
            ]
        for other, addr in (("witness", self.witness_addr), ("client", self.client_addr)):
            per_ns[other] = ["link set lo up", f"addr add {addr}/20 dev eth0", "link set eth0 up"]
        self.ns.ip_batches(per_ns)
        for host in self.peers:
            self._write_am_config(host)

    def _write_am_config(self, host: str) -> None:
        name, peer = self.host_name(host), self.peers[host]
        (self.workdir / "am" / name).mkdir(exist_ok=True)
        (self.workdir / "am" / f"{name}.toml").write_text(f"""\
node = "{name}"
data_dir = "{name}"
[management]
listen = "{self.host_addr(host)}:{MGMT_PORT}"
token_file = "mgmt.token"
[nbd]
listen = "{self.host_addr(host)}:{AM_NBD_PORT}"
[links]
a = "{self.link_addr(host, 'a')}:{LINK_PORT}"
b = "{self.link_addr(host, 'b')}:{LINK_PORT}"
[peer]
name = "{self.host_name(peer)}"
a = "{self.link_addr(peer, 'a')}:{LINK_PORT}"
b = "{self.link_addr(peer, 'b')}:{LINK_PORT}"
[witness]
url = "http://{self.witness_addr}:{WITNESS_PORT}"
token_file = "witness.token"
[disks]
sr_root = "{self.sr_root}"
[checkpoint]
control_dir = "{self.control_dir}"
{self._vm_section(host)}{pairing.am_section()}[testbed]
fault_injection = true
""")

    def _vm_section(self, host: str) -> str:
        if self.xapi_port is None:
            return ""
        # The hook unpauses through the host's own toolstack first (no master needed); through XAPI only when that
        # fails, and a crash of the pool's master leaves XAPI silent until HA elects another (the pool's HA
        # timeout): the hook waits that long and more.
        wait = self.engine.config.ha_timeout + 10.0
        uuid = self.engine.store.tables["host"][host]["uuid"]
        argv = [sys.executable, "-m", "xapisim.live.hook", "--credentials", str(self.hook_credentials),
                "--host", uuid, "--timeout", f"{wait:g}"]
        return f"[vm]\non_promote = {json.dumps(argv)}\non_promote_timeout_s = {wait + 5.0:g}\n"

    def _images(self) -> None:
        """An image for every guest disk of the pool (sparse: free until written), and the storage hook that
        keeps them following the VDIs: a copy or a snapshot starts with its source's data."""
        store = self.engine.store
        with self.engine.lock:
            for sr in store.tables["SR"].values():
                (self.sr_root / sr["uuid"]).mkdir(exist_ok=True)
            for vdi, rec in store.tables["VDI"].items():
                if rec["type"] in IMAGE_TYPES and store.exists("SR", rec["SR"]):
                    self._make_image(vdi, None)
            self._previous_storage_hook = self.engine.storage_hook
            self.engine.storage_hook = self._storage_changed

    def _storage_changed(self, event: str, vdi: str, copy_of: str | None) -> None:
        store = self.engine.store
        rec = store.tables["VDI"].get(vdi)
        if rec is None or rec["type"] not in IMAGE_TYPES or not store.exists("SR", rec["SR"]):
            return
        try:
            if event == "created":
                self._make_image(vdi, copy_of)
            elif event == "destroyed":
                self.image_of(vdi).unlink(missing_ok=True)
        except OSError:  # the pool's records never depend on the images
            log.exception("live bed: the image of VDI %s", rec["uuid"])

    def _make_image(self, vdi: str, copy_of: str | None) -> None:
        store = self.engine.store
        image = self.image_of(vdi)
        image.parent.mkdir(exist_ok=True)
        if image.exists():
            return
        source = self.image_of(copy_of) if copy_of and store.exists("VDI", copy_of) else None
        if source is not None and source.exists():
            copy_sparse(source, image)
        with image.open("ab") as f:
            f.truncate(int(store.tables["VDI"][vdi]["virtual_size"]))

    def _advertise_ams(self) -> None:
        """Host other_config: where each host's AM is and which host is its peer (docs/level2.md)."""
        store = self.engine.store
        with self.engine.lock:
            for host, peer in self.peers.items():
                store.map_put(host, "other_config", AM_URL_KEY, f"http://{self.host_addr(host)}:{MGMT_PORT}")
                store.map_put(host, "other_config", AM_PEER_KEY, store.tables["host"][peer]["uuid"])

    def _mark_live_guests(self) -> None:
        store = self.engine.store
        with self.engine.lock:
            for vm, rec in store.tables["VM"].items():
                if rec["name_label"] in DEMO_LIVE_GUESTS and not rec["is_a_template"] and not rec["is_control_domain"]:
                    store.map_put(vm, "other_config", LIVE_GUEST_KEY, "true")
            for vm in sorted(self._flagged(), key=lambda v: store.tables["VM"][v]["name_label"]):
                self._guest_ip(vm)

    def _flagged(self) -> list[str]:
        return [vm for vm, rec in self.engine.store.tables["VM"].items()
                if rec["other_config"].get(LIVE_GUEST_KEY) == "true" and not rec["is_a_template"]]

    def _guest_ip(self, vm: str) -> str:
        """The VM's address, given once and shown in its other_config (call with the engine's lock held). A VM
        whose other_config names one already (a copy of a VM: the same guest elsewhere) keeps it."""
        ip = self.guest_ips.get(vm) or self.engine.store.tables["VM"][vm]["other_config"].get(LIVE_IP_KEY)
        if ip is not None:
            self.guest_ips[vm] = ip
        else:
            n = len(self.guest_ips) + 1
            ip = f"10.{self.octet}.{1 + n // 250}.{n % 250 + 1}"
            self.guest_ips[vm] = ip
            self.engine.store.map_put(vm, "other_config", LIVE_IP_KEY, ip)
        return ip

    def _env(self) -> dict[str, str]:
        root = str(Path(__file__).resolve().parents[2])
        path = os.environ.get("PYTHONPATH")
        return {**os.environ, "PYTHONPATH": f"{root}:{path}" if path else root, "PYTHONUNBUFFERED": "1"}

    def _log(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def _start_witness(self) -> None:
        am = self.workdir / "am"
        self.ns.spawn("witness", [
            sys.executable, "-m", "am.witness", "--listen", f"{self.witness_addr}:{WITNESS_PORT}",
            "--token-file", str(am / "witness.token"), "--state", str(am / "witness.json"),
        ], log_path=self._log("witness"), env=self._env())

    def _wait_for_ams(self, timeout: float = 20.0) -> None:
        """Return once every AM answers and sees its peer on both links (a bed is ready when a console could
        protect a VM at once); a warning, not a failure, if one does not in time."""
        deadline = time.monotonic() + timeout
        waiting = set(self.peers)
        while waiting and time.monotonic() < deadline:
            for host in sorted(waiting):
                request = urllib.request.Request(f"http://{self.host_addr(host)}:{MGMT_PORT}/v1/status",
                                                 headers={"Authorization": f"Bearer {self.token}"})
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError), urllib.request.urlopen(
                    request, timeout=1
                ) as response:
                    if json.loads(response.read())["peer"]["state"] == "connected":
                        waiting.discard(host)
            if waiting:
                time.sleep(0.05)
        if waiting:
            log.warning("live bed: the AMs of %s do not see their peers yet", ", ".join(
                self.host_name(h) for h in sorted(waiting)))

    # -- following the pool --------------------------------------------------------------------------------

    def _hook(self) -> None:
        engine = self.engine
        self._previous_power_hook = previous = engine.power_hook
        self._hooked = True

        def power_hook(host: str, up: bool) -> None:
            if previous is not None:
                previous(host, up)
            self.poke()

        engine.power_hook = power_hook
        engine.sim_extension = LiveRoutes(self)
        engine.migrate_hook = LiveMigrations(self)

    def poke(self) -> None:
        """Something outside the store changed (host power, a live fault): reconcile now."""
        with self.engine.store.cond:
            self._poked = True
            self.engine.store.cond.notify_all()

    def _follow(self) -> None:
        store = self.engine.store
        seen = -1
        while not self._stopping.is_set():
            with store.cond:
                store.cond.wait_for(lambda seen=seen: self._woken(seen), timeout=0.2)
                self._poked = False
                seen = store.generation
            if self._stopping.is_set():
                return
            try:
                self._check_exits()
                self.reconcile()
            except Exception:  # a failed action is retried on the next change; never stop following
                log.exception("live bed: reconcile failed")
                self._stopping.wait(0.2)

    def _woken(self, seen: int) -> bool:
        return self.engine.store.generation != seen or self._poked or self._stopping.is_set()

    def want(self) -> World:
        engine, store = self.engine, self.engine.store
        with engine.lock:
            hosts = {}
            for host in engine.hosts:
                nic_up = not any(
                    store.tables["PIF"][pif]["device"] == "eth0" for pif in engine.pif_carrier_down
                    if store.tables["PIF"][pif]["host"] == host
                )
                hosts[host] = HostState(
                    up=engine.is_up(host),
                    nic_up=nic_up,
                    links_cut=frozenset(link for h, link in self.link_cuts if h == host),
                    disk_failed=host in self.disk_failed,
                )
            guests = {}
            for vm in self._flagged():
                rec = store.tables["VM"][vm]
                where = rec["resident_on"]
                if rec["power_state"] in ("Running", "Paused") and where in hosts and hosts[where].up:
                    guests[vm] = GuestState(where, int(rec["domid"]), paused=rec["power_state"] == "Paused")
            LiveMigrations(self).prune()
            migrations = dict(self.migrations)
        return World(hosts, guests, migrations)

    def reconcile(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            failed: set[str] = set()
            for action in plan(self.want(), self.have):
                if getattr(action, "vm", None) in failed:
                    continue
                try:
                    self._apply(action)
                except Exception:
                    if not isinstance(action, StartGuest | MigrateGuest):
                        raise  # the follow loop logs it and tries again on the next change
                    # A guest that cannot start (or be moved) is a VM that failed: show it (and never retry in a
                    # loop).
                    log.exception("live bed: %s failed: the VM crashed", self._describe(action))
                    failed.add(action.vm)
                    with contextlib.suppress(Exception):
                        self._remove_guest(action.vm)
                    with contextlib.suppress(faults.SimError):
                        faults.crash_vm(self.engine, action.vm)
                    continue
                self.have = after(self.have, action)

    def _check_exits(self) -> None:
        """A guest that ended without the bed stopping it crashed: its VM follows (VM_CRASHED, Halted)."""
        for vm, guest in list(self.guests.items()):
            code = guest.proc.poll()
            if code is None or guest.stopping:
                continue
            log.warning("guest %s exited with status %s: the VM crashed", guest.name, code)
            with self._lock:
                self._remove_guest(vm)
            with contextlib.suppress(faults.SimError):
                faults.crash_vm(self.engine, vm)

    # -- actions ---------------------------------------------------------------------------------------------

    def _describe(self, action: Action) -> str:
        """The action with names for refs, for the log."""
        store = self.engine.store
        fields = []
        for key, value in vars(action).items():
            rec = store.get(value) if isinstance(value, str) else None
            fields.append(f"{key}={rec['name_label'] if rec is not None else value}")
        return f"{type(action).__name__}({', '.join(fields)})"

    def _apply(self, action: Action) -> None:
        log.info("live bed: %s", self._describe(action))
        if isinstance(action, StopGuest):
            self._stop_guest(action.vm, hard=action.hard)
        elif isinstance(action, CrashHost):
            guests = [g for g in self.guests.values() if g.host == action.host]
            for guest in guests:
                guest.stopping = True  # killed with its host: not a guest crash (``_check_exits``)
            self.ns.kill_namespace_processes(self.host_ns[action.host], *(g.namespace for g in guests))
            self.host_procs.pop(action.host, None)
        elif isinstance(action, BootHost):
            self._boot(action.host, action.disk_failed)
        elif isinstance(action, SetNic):
            pairing.set_nic(self, action.host, action.up)
        elif isinstance(action, SetLink):
            dev, table = f"{action.link}link", f"xapisim_link_{action.link}"
            self.ns.nft([self.host_ns[action.host]], drop_table(table) if action.up else cut_table(table, dev))
        elif isinstance(action, SetDisk):
            self._signal_disk(action.host, action.failed)
        elif isinstance(action, StartGuest):
            self._start_guest(action.vm, action.host)
        elif isinstance(action, ReserveGuest):
            self._reserve_guest(action.vm, action.host)
        elif isinstance(action, PauseGuest):
            self._pause_guest(action.vm, action.paused)
        elif isinstance(action, MigrateGuest):
            move_guest(self, action.vm, action.host, action.domid, write_endpoint)

    def _boot(self, host: str, disk_failed: bool) -> None:
        h, name = self.host_ns[host], self.host_name(host)
        procs = {}
        argv = [sys.executable, "-m", "xapisim.live.disks", "--listen", f"{self.host_addr(host)}:{DISK_PORT}",
                "--dir", str(self.sr_root)]
        procs["disks"] = self.ns.spawn(h, [*argv, *(["--failed"] if disk_failed else [])],
                                       log_path=self._log(f"{name}-disks"), env=self._env())
        if host in self.peers:
            procs["am"] = self.ns.spawn(h, [sys.executable, "-m", "am", "--config",
                                            str(self.workdir / "am" / f"{name}.toml")],
                                        log_path=self._log(f"{name}-am"), env=self._env())
        self.host_procs[host] = procs

    def _signal_disk(self, host: str, failed: bool) -> None:
        proc = self.host_procs.get(host, {}).get("disks")
        if proc is None:
            return
        path = self._log(f"{self.host_name(host)}-disks")
        # The signal's default action kills: wait until the server has set its handlers (it says so). Then wait
        # for it to say the disk changed, so that the fault is in force when the /sim/ request answers.
        self._wait_log(path, "disks ready", proc)
        mark = path.stat().st_size
        os.kill(proc.pid, signal.SIGUSR1 if failed else signal.SIGUSR2)
        self._wait_log(path, "disk failed" if failed else "disk repaired", proc, after=mark)
        if failed and host in self.peers:
            self._fail_am_disks(host)

    def _am_call(self, host: str, method: str, path: str, body: dict | None = None) -> object:
        request = urllib.request.Request(
            f"http://{self.host_addr(host)}:{MGMT_PORT}{path}", method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            text = response.read()
            return json.loads(text) if text else None

    def _fail_am_disks(self, host: str) -> None:
        """The AM's replicas live on the same local disk (``[disks] sr_root``): every I/O of each fails too (the
        AM's fault injection), the AM then marks it Failed at its next I/O. Repairing the disk (``{"failed":
        false}``) does not undo that: the AM's ``disk-repaired`` does, as after a real disk's replacement."""
        try:
            resources = self._am_call(host, "GET", "/v1/resources") or []
            for res in resources:
                self._am_call(host, "POST", f"/v1/resources/{res['name']}/fault", {"disk": "fail"})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("live bed: the AM of %s did not take the disk fault: %s", self.host_name(host), exc)

    def _wait_log(self, path: Path, text: str, proc: subprocess.Popen, after: int = 0, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
                f.seek(after)
                if text.encode() in f.read():
                    return
            time.sleep(0.01)
        raise NetnsError(f"{path.name} never said {text!r}")

    def disk_endpoint(self, vm: str, host: str) -> tuple[str, str]:
        """Where the guest of ``vm`` running on ``host`` finds its disk: ("address:port", export name).

        The one place that decides it: the VM's first disk VDI, either routed through the host's AM (its
        other_config ``eac_am_resource`` names the resource: ``<host>:10809/<resource>``, docs/level2.md) or
        served unmirrored by the host's disk server (``<host>:10810/<VDI uuid>``, its image in the SR's
        directory).
        """
        store = self.engine.store
        with self.engine.lock:
            for vbd in store.tables["VM"][vm]["VBDs"]:
                rec = store.tables["VBD"][vbd]
                if rec["type"] == "Disk" and not rec["empty"] and store.exists("VDI", rec["VDI"]):
                    vdi = rec["VDI"]
                    break
            else:
                raise NetnsError(f"VM {store.tables['VM'][vm]['name_label']} has no disk")
            resource = store.tables["VDI"][vdi]["other_config"].get(AM_RESOURCE_KEY)
            if resource:
                return f"{self.host_addr(host)}:{AM_NBD_PORT}", resource
            if not self.image_of(vdi).exists():
                self._make_image(vdi, None)
            return f"{self.host_addr(host)}:{DISK_PORT}", store.tables["VDI"][vdi]["uuid"]

    def _start_guest(self, vm: str, host: str) -> None:
        """The VM's guest goes on: its reserved process if it was started paused, else a new one."""
        guest = self.guests.get(vm)
        if guest is None or not guest.reserved:
            guest = self._reserve_guest(vm, host)
        # Its disk may have been routed (or unrouted) through the AM while it waited (a takeover).
        disk, export = self.disk_endpoint(vm, host)
        write_endpoint(guest.endpoint_file, f"{disk}/{export}")
        guest.disk, guest.export = disk, export
        # Level 3: after a takeover the host's AM left the VM's last checkpoint here (am/checkpoint.py); the guest
        # starts from it, its service port closed to the network until its connections are restored (a client's
        # segment would draw a reset before them): it opens it itself.
        restore = self.workdir / "am" / self.host_name(host) / f"{export}.ckpt"
        restoring = host in self.peers and disk.endswith(f":{AM_NBD_PORT}") and restore.exists()
        if restoring:
            self.ns.nft([guest.namespace], closed_port_table(GUEST_PORT))
            log.info("live bed: guest %s restores from its checkpoint on %s", guest.name, self.host_name(host))
        self.ns.ip_batches({self.host_ns[host]: [f"link set {guest.vif} master xenbr0", f"link set {guest.vif} up"]})
        assert guest.proc.stdin is not None
        guest.proc.stdin.write((f"restore {restore}\n" if restoring else "start\n").encode())
        guest.proc.stdin.close()  # the guest reads one line: its order to go on
        guest.reserved = False

    def _reserve_guest(self, vm: str, host: str) -> LiveGuest:
        """The guest's namespace and process, the process waiting for its order to go on (``_start_guest``) with
        its NIC off the bridge: a reserved guest touches neither its disk nor the network."""
        store = self.engine.store
        with self.engine.lock:
            rec = store.tables["VM"][vm]
            name, uuid, domid = rec["name_label"], rec["uuid"], int(rec["domid"])
            vifs = sorted(rec["VIFs"], key=lambda v: int(store.tables["VIF"][v]["device"] or 0))
            mac = store.tables["VIF"][vifs[0]]["MAC"] if vifs else f"02:00:00:{secrets.token_hex(3)}"
            ip = self._guest_ip(vm)
        endpoint_file = self.workdir / "guests" / f"{uuid}.endpoint"  # written when it goes on
        g, h, n = f"g{uuid[:8]}", self.host_ns[host], self.ns.netns
        vif = f"vif{domid}.0" if 0 < domid < 10**9 else f"vif{secrets.token_hex(3)}"
        self.ns.delete_namespaces([g])  # a leftover of an interrupted stop
        nic = f"link add eth0 netns {n(g)} address {mac} type veth peer name {vif} netns {n(h)}"
        self.ns.add_namespaces([g], [nic])
        self.ns.ip_batches({g: ["link set lo up", f"addr add {ip}/20 dev eth0", "link set eth0 up"]})
        argv = [sys.executable, "-m", "xapisim.live.guest", "--name", name, "--listen", f"{ip}:{GUEST_PORT}",
                "--endpoint-file", str(endpoint_file), "--nic", "eth0",
                "--control", str(self.control_dir / f"{uuid}.ctl"), "--wait-for-order"]
        proc = self.ns.spawn(g, argv, log_path=self._log(f"guest-{name}"), env=self._env(), stdin=subprocess.PIPE)
        guest = self.guests[vm] = LiveGuest(vm, name, uuid, g, ip, mac, host, "", "", proc,
                                            endpoint_file=endpoint_file, vif=vif, reserved=True)
        return guest

    def _pause_guest(self, vm: str, paused: bool) -> None:
        guest = self.guests[vm]
        if not paused:
            # Its disk may have been routed (or unrouted) through the AM while it was stopped: it reads its
            # endpoint again before its next request (xapisim.live.guest), so that no write of it reaches the
            # image by the old way once the new one is in place.
            disk, export = self.disk_endpoint(vm, guest.host)
            if (disk, export) != (guest.disk, guest.export):
                log.info("live bed: guest %s continues on %s/%s", guest.name, disk, export)
                write_endpoint(guest.endpoint_file, f"{disk}/{export}")
                guest.disk, guest.export = disk, export
        os.killpg(guest.proc.pid, signal.SIGSTOP if paused else signal.SIGCONT)
        guest.paused = paused

    def _stop_guest(self, vm: str, hard: bool) -> None:
        guest = self.guests.get(vm)
        if guest is None:
            return
        guest.stopping = True
        if not hard and guest.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(guest.proc.pid, signal.SIGCONT)  # a paused guest must run to stop cleanly
                os.killpg(guest.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                guest.proc.wait(STOP_GRACE)
        self._remove_guest(vm)

    def _remove_guest(self, vm: str) -> None:
        guest = self.guests.pop(vm, None)
        if guest is None:
            return
        guest.stopping = True
        self.ns.delete_namespaces([guest.namespace])  # SIGKILLs what is left, and the veth goes with it
        guest.endpoint_file.unlink(missing_ok=True)
        (self.control_dir / f"{guest.uuid}.ctl").unlink(missing_ok=True)
        if guest.proc.stdin is not None:
            with contextlib.suppress(OSError):
                guest.proc.stdin.close()
        guest.proc.poll()
        guests = dict(self.have.guests)
        guests.pop(vm, None)
        self.have = World(self.have.hosts, guests)

    # -- faults the pool's records do not hold ---------------------------------------------------------------

    def set_link(self, host: str, link: str, up: bool) -> None:
        if link not in LINKS:
            raise ValueError(f"unknown link {link!r} (a or b)")
        with self.engine.lock:
            (self.link_cuts.discard if up else self.link_cuts.add)((host, link))
        self.poke()
        self.settle()

    def set_disk(self, host: str, failed: bool) -> None:
        with self.engine.lock:
            (self.disk_failed.add if failed else self.disk_failed.discard)(host)
        self.poke()
        self.settle()

    def settle(self, timeout: float = 10.0) -> None:
        """Return once the hosts match the pool (so a fault's request answers when the fault is in force)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.reconcile()
            if self.want().hosts == dict(self.have.hosts):
                return
            time.sleep(0.02)

    # -- what the bed is -------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        engine = self.engine
        with engine.lock:
            hosts = []
            for host in engine.hosts:
                have = self.have.hosts.get(host, HostState(up=False))
                entry: dict[str, Any] = {
                    "name": self.host_name(host),
                    "namespace": self.ns.netns(self.host_ns[host]),
                    "address": self.host_addr(host),
                    "links": {link: self.link_addr(host, link) for link in LINKS},
                    "disks": f"{self.host_addr(host)}:{DISK_PORT}",
                    "up": have.up,
                    "nic_up": have.nic_up,
                    "links_cut": sorted(have.links_cut),
                    "disk_failed": have.disk_failed,
                    "am": None,
                }
                if host in self.peers:
                    entry["am"] = {
                        "api": f"http://{self.host_addr(host)}:{MGMT_PORT}",
                        "nbd": f"{self.host_addr(host)}:{AM_NBD_PORT}",
                        "peer": self.host_name(self.peers[host]),
                        "token_file": str(self.workdir / "am" / "mgmt.token"),
                        "config": str(self.workdir / "am" / f"{self.host_name(host)}.toml"),
                    }
                hosts.append(entry)
            guests = [
                {
                    "vm": g.name,
                    "uuid": g.uuid,
                    "namespace": self.ns.netns(g.namespace),
                    "ip": g.ip,
                    "port": GUEST_PORT,
                    "mac": g.mac,
                    "host": self.host_name(g.host),
                    "pid": g.proc.pid,
                    "paused": g.paused or g.reserved,
                    "reserved": g.reserved,
                    "disk": {"address": g.disk, "export": g.export},
                }
                for g in self.guests.values()
            ]
        return {
            "prefix": self.prefix,
            "network": f"10.{self.octet}.0.0/16",
            "workdir": str(self.workdir),
            "uplink": {"interface": f"{self.prefix}-up", "address": self.uplink_addr},
            "witness": {"namespace": self.ns.netns("witness"), "url": f"http://{self.witness_addr}:{WITNESS_PORT}"},
            "client": {"namespace": self.ns.netns("client"), "address": self.client_addr},
            "hosts": hosts,
            "guests": guests,
        }

    # -- stop ------------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Every process, namespace and nft table of the bed gone (nft tables live in the namespaces). Idempotent."""
        self._stopping.set()
        with self.engine.store.cond:
            self.engine.store.cond.notify_all()
        if self._thread is not None:
            self._thread.join(10)
        if self.engine.sim_extension is not None and getattr(self.engine.sim_extension, "bed", None) is self:
            self.engine.sim_extension = None
        if self._hooked:
            self.engine.power_hook = self._previous_power_hook
            self.engine.migrate_hook = None
            self._hooked = False
        if self.engine.storage_hook == self._storage_changed:
            self.engine.storage_hook = self._previous_storage_hook
        with self.engine.lock:  # the AMs go with the bed
            for host in self.peers:
                if self.engine.store.exists("host", host):
                    self.engine.store.map_del(host, "other_config", AM_URL_KEY)
                    self.engine.store.map_del(host, "other_config", AM_PEER_KEY)
        try:
            self.ns.close()
        finally:
            shutil.rmtree(self.control_dir, ignore_errors=True)
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            self._started = False
