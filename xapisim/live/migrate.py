"""Live migration on the live bed: ``VM.pool_migrate`` of a running live guest moves it, it is not restarted.

What Xen does to a migrated domain, the bed does to the guest's machine: the guest process keeps running (its
namespace, its TCP connections and its memory stay), its vif leaves the source host's namespace for the target
host's and joins that host's bridge ``xenbr0`` under the new domain's name (``vif<domid>.0``), its disk endpoint
becomes the target host's (its AM's export when the disk is routed through the AM, docs/level2.md, else the
host's disk server), and a gratuitous ARP goes out of the guest's NIC, as netfront sends one after a migration, so
that the switch learns the guest's new port at once (measured in ``notes/network-pairing.md``: without it a guest
that only receives stays unreachable until the switch forgets its entry). The guest is stopped (SIGSTOP) for the
move, as a domain is paused for the last copy of its memory, and continues once its NIC has its carrier back and
the announcement is out.

``LiveMigrations`` is the engine's ``migrate_hook``: XAPI's ``VM.pool_migrate`` tells it the move it recorded
(``migrating``, engine lock held: the reconcile plan then knows the new domain is the same guest, not one to stop
and start) and waits (``migrated``) until the guest is on the target host, so that the call returns once the VM
runs there, as XAPI's does. The checks (the target live, enough free memory) are XAPI's own, made before anything
moves.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .guest import garp_frame
from .netns import IP, NetnsError
from .reconcile import Migration

if TYPE_CHECKING:
    from .bed import LiveBed, LiveGuest

log = logging.getLogger("xapisim.live")

# How long VM.pool_migrate waits for the bed to have moved the guest.
MIGRATE_TIMEOUT = 10.0
# How long the announcement waits for the guest's NIC to have its carrier again, and the second one after it.
CARRIER_TIMEOUT = 1.0
GARP_REPEAT = 0.02
SIOCGIFFLAGS, IFF_RUNNING = 0x8913, 0x40


class LiveMigrations:
    """The bed's side of VM.pool_migrate (``Engine.migrate_hook``)."""

    def __init__(self, bed: LiveBed) -> None:
        self.bed = bed

    def migrating(self, vm: str, source: str, old_domid: int, target: str, domid: int) -> None:
        """XAPI recorded the move (engine lock held): a guest running for the VM is moved, not restarted."""
        if vm in self.bed.have.guests:
            self.bed.migrations[vm] = Migration(source, old_domid, target, domid)

    def migrated(self, vm: str) -> None:
        """Return once the VM's guest runs on its target host (reconciling in this thread, as ``settle`` does)."""
        deadline = time.monotonic() + MIGRATE_TIMEOUT
        while time.monotonic() < deadline:
            with self.bed.engine.lock:
                pending = self.bed.migrations.get(vm)
            if pending is None:
                return
            try:
                self.bed.reconcile()
            except Exception:  # another action failed: the follow loop retries it; the move is waited for
                log.exception("live bed: reconcile during a migration failed")
            with self.bed.engine.lock:
                if self.bed.migrations.get(vm) is pending:
                    done = self.bed.have.guests.get(vm)
                    if done is None or (done.host, done.domid) == (pending.target, pending.domid):
                        del self.bed.migrations[vm]
                        return
            time.sleep(0.01)
        log.warning("live bed: the guest of VM %s was not moved in %.0f s", vm, MIGRATE_TIMEOUT)

    def prune(self) -> None:
        """Forget migrations the records have gone past (engine lock held): the VM halted, or another domain."""
        store = self.bed.engine.store
        for vm, m in list(self.bed.migrations.items()):
            rec = store.tables["VM"].get(vm)
            if rec is None or int(rec["domid"]) != m.domid or rec["resident_on"] != m.target:
                del self.bed.migrations[vm]


def _running(sock: socket.socket, ifname: str) -> bool:
    """The interface is operationally up (IFF_RUNNING): its carrier is back and the kernel sends on it again."""
    flags = struct.unpack_from("16sH", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, struct.pack("16sH22x",
                                                                                             ifname.encode(), 0)))[1]
    return bool(flags & IFF_RUNNING)


def wait_forwarding(bed: LiveBed, ns: str, port: str) -> bool:
    """Wait (CARRIER_TIMEOUT at most) until ``port`` of namespace ``ns``'s bridge is up and forwarding: a bridge
    port becomes so a moment after its carrier returns, and drops what arrives before (the guest's announcement
    among it, which would leave the switches pointing at the old host)."""
    deadline = time.monotonic() + CARRIER_TIMEOUT
    while True:
        out = subprocess.run([IP, "-n", bed.ns.netns(ns), "-j", "-d", "link", "show", "dev", port],
                             capture_output=True, text=True, timeout=5)
        with contextlib.suppress(ValueError, IndexError, AttributeError):
            link = json.loads(out.stdout)[0]
            if link.get("operstate") == "UP" and link["linkinfo"]["info_slave_data"].get("state") == "forwarding":
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)


def send_garp(bed: LiveBed, guest: LiveGuest) -> None:
    """A gratuitous ARP out of the guest's NIC, from inside its namespace (a thread of its own enters it), once
    the NIC has its carrier again: the kernel turns a veth's carrier on a moment after its peer comes up, and
    drops what is sent before (a lost announcement leaves the client's retransmissions going to the old host)."""
    frame = garp_frame(bytes.fromhex(guest.mac.replace(":", "")), guest.ip)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            with bed.ns.in_ns(guest.namespace), socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
                raw.bind(("eth0", 0))
                deadline = time.monotonic() + CARRIER_TIMEOUT
                while not _running(raw, "eth0") and time.monotonic() < deadline:
                    time.sleep(0.002)
                raw.send(frame)
                time.sleep(GARP_REPEAT)  # once more, as a backend's hotplug would: one frame can be lost
                raw.send(frame)
        except OSError as exc:
            failed.append(exc)

    thread = threading.Thread(target=run, name="xapisim-garp")
    thread.start()
    thread.join(5)
    if failed:  # not fatal: the switch learns the port from the guest's next frame
        log.warning("live bed: gratuitous ARP of guest %s failed: %s", guest.name, failed[0])


def move_guest(bed: LiveBed, vm: str, host: str, domid: int,
               write_endpoint: Callable[[Path, str], None]) -> None:
    """Move the running guest of ``vm`` to ``host`` as domain ``domid`` (see the module's docstring);
    ``write_endpoint`` is how the bed rewrites a guest's endpoint file."""
    guest = bed.guests[vm]
    source, target = bed.host_ns[guest.host], bed.host_ns[host]
    disk, export = bed.disk_endpoint(vm, host)
    vif = f"vif{domid}.0" if 0 < domid < 10**9 else guest.vif
    frozen = not guest.paused and guest.proc.poll() is None
    started = time.monotonic()
    if frozen:
        os.killpg(guest.proc.pid, signal.SIGSTOP)
    try:
        if source != target:
            bed.ns.ip_batch(source, [f"link set {guest.vif} down",
                                     f"link set {guest.vif} netns {bed.ns.netns(target)}"])
            lines = []
        else:  # a migration to the same host (XAPI allows it): only the new domain's name
            lines = [f"link set {guest.vif} down"]
        if vif != guest.vif:
            lines.append(f"link set {guest.vif} name {vif}")
        bed.ns.ip_batch(target, [*lines, f"link set {vif} master xenbr0", f"link set {vif} up"])
        guest.vif, guest.host = vif, host
        if (disk, export) != (guest.disk, guest.export):
            # The guest reads its endpoint before each request and when its connection drops (xapisim.live.guest).
            write_endpoint(guest.endpoint_file, f"{disk}/{export}")
            guest.disk, guest.export = disk, export
        # Resumed once its port forwards, its NIC carries frames again and the switch knows its port: what it
        # sends at once (its disk's new connection, answers to its clients) is neither dropped nor sent to the old
        # host.
        if not wait_forwarding(bed, target, vif):
            log.warning("live bed: %s of guest %s is not forwarding yet", vif, guest.name)
        send_garp(bed, guest)
    finally:
        if frozen:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(guest.proc.pid, signal.SIGCONT)
    if guest.host != host:
        raise NetnsError(f"guest {guest.name}'s vif was not moved")
    log.info("live bed: guest %s migrated to %s as %s in %.0f ms (disk %s/%s)", guest.name, bed.host_name(host), vif,
             (time.monotonic() - started) * 1000, disk, export)
