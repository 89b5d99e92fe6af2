"""Network pairing, the shell: the NIC's carrier, the bridge's ports, MAC announcements and the peer's ``NicState``.

The policy is ``pairing.py``'s (pure); this file looks and acts, on the agent's event loop. Threading contract: every
method runs on that loop. The sysfs reads are small reads of kernel attributes (they never block on I/O); ``ip`` and
``bridge`` run as asyncio subprocesses; an announcement is a few frames written to a non-blocking AF_PACKET socket.

One task (``run``) does everything, one step at a time: each heartbeat interval, and at once when the peer's state
or a link changes or netlink reports a change of an interface (the NIC's carrier among them). A step reads the NIC's
carrier and which ports are in the bridge (look), asks ``pairing.decide``, moves the ports (``pairing.steps``: out
before in), announces MACs, then tells the peer where it stands. It tells the peer it borrows only after its own NIC
is out of its bridge. A step that fails (an ``ip`` error) changes nothing this host says: the next step looks again
and retries.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING

from am import wire
from am.config import NetworkConfig
from am.pairing import Decision, Mode, PeerNic, Situation, decide, ports, steps
from am.states import Role

if TYPE_CHECKING:
    from am.agent import Agent

log = logging.getLogger("am.network")
SYS = Path("/sys/class/net")
IP = shutil.which("ip") or "/usr/sbin/ip"
BRIDGE = shutil.which("bridge") or "/usr/sbin/bridge"
COMMAND_TIMEOUT = 5.0
# /sys/class/net/<bridge>/brforward: the bridge's forwarding table as struct __fdb_entry (linux/if_bridge.h).
FDB_ENTRY = struct.Struct("=6sBBIBBH")  # mac, port_no, is_local, ageing_timer_value, port_hi, pad0, unused
ETH_P_RARP = 0x8035
RTMGRP_LINK = 1  # netlink multicast group of interface changes (linux/rtnetlink.h)
# An announcement is sent again after these delays (s), as hypervisors do after moving a VM: one frame lost (a
# switch port that just came up) must not leave the switch sending the MAC's frames to the old port for long.
ANNOUNCE_AGAIN = (0.05, 0.2, 0.5)


def carrier(dev: str) -> bool:
    """The carrier of ``dev`` in this network namespace (an interface that is down or missing has none).

    Its operational state must say "up" too: the kernel sets the carrier flag at once but gives the device its
    queue a moment later (linkwatch, which then sets the operational state): a frame sent in between is dropped,
    and an announcement lost that way left the switch sending a guest's frames to the old port for 0.4 s."""
    try:
        return ((SYS / dev / "carrier").read_text().strip() == "1"
                and (SYS / dev / "operstate").read_text().strip() in ("up", "unknown"))
    except OSError:  # EINVAL while the interface is administratively down, ENOENT when it does not exist
        return False


def link_events() -> socket.socket | None:
    """A netlink socket that turns readable at every change of an interface (a carrier lost or back among them):
    the step runs at once instead of at the next poll. None where netlink is not available (the poll remains)."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE)
    except (OSError, AttributeError):
        return None
    try:
        sock.bind((0, RTMGRP_LINK))
    except OSError:
        sock.close()
        return None
    return sock


def bridge_ports(bridge: str) -> set[str]:
    try:
        return {p.name for p in (SYS / bridge / "brif").iterdir()}
    except OSError:
        return set()


def bridge_macs(bridge: str, skip: set[str]) -> list[str]:
    """The MACs learned on the bridge's ports other than ``skip`` (the VMs' ports, when ``skip`` holds the NIC and
    the pairing interfaces), and the bridge's own (dom0's address rides the same path)."""
    numbers: dict[int, str] = {}
    for port in bridge_ports(bridge):
        with contextlib.suppress(OSError, ValueError):
            numbers[int((SYS / bridge / "brif" / port / "port_no").read_text(), 16)] = port
    macs = []
    with contextlib.suppress(OSError):
        macs.append((SYS / bridge / "address").read_text().strip())
    try:
        data = (SYS / bridge / "brforward").read_bytes()
    except OSError:
        data = b""
    for at in range(0, len(data) - FDB_ENTRY.size + 1, FDB_ENTRY.size):
        mac, port_no, is_local, _, port_hi, _, _ = FDB_ENTRY.unpack_from(data, at)
        port = numbers.get(port_hi << 8 | port_no)
        if not is_local and port is not None and port not in skip:
            macs.append(mac.hex(":"))
    return sorted(set(macs))


def rarp_frame(mac: str) -> bytes:
    """A broadcast RARP request from ``mac`` (what a hypervisor sends after moving a VM): switches learn the
    MAC's new port from its source address; nobody answers it."""
    raw = bytes.fromhex(mac.replace(":", ""))
    zero = bytes(4)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 3) + raw + zero + raw + zero  # op 3: request reverse
    return (b"\xff" * 6 + raw + struct.pack("!H", ETH_P_RARP) + arp).ljust(60, b"\0")


def announce(dev: str, macs: list[str]) -> int:
    """One announcement frame per MAC out of ``dev`` itself (an AF_PACKET socket bound to it: the frames leave by
    that port, they do not enter its bridge). Returns how many went out."""
    sent = 0
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:  # protocol 0: receives nothing
        sock.setblocking(False)
        sock.bind((dev, 0))
        for mac in macs:
            try:
                sock.send(rarp_frame(mac))
                sent += 1
            except OSError as exc:  # a full queue or a link without carrier: the next frame may go
                log.warning("announcing %s on %s: %s", mac, dev, exc)
    return sent


async def run_batch(tool: str, lines: list[str], force: bool = False) -> None:
    """``tool -batch -`` with ``lines`` (``ip`` or ``bridge``); RuntimeError with its message when it fails."""
    argv = [tool, *(["-force"] if force else []), "-batch", "-"]
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate("\n".join(lines).encode() + b"\n"), COMMAND_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"{tool} -batch took more than {COMMAND_TIMEOUT:g} s") from None
    if proc.returncode and not force:
        raise RuntimeError(f"{tool} -batch failed: {err.decode(errors='replace').strip()}")


class NetworkPairing:
    def __init__(self, agent: Agent, net: NetworkConfig, interval: float) -> None:
        self.agent, self.net, self.interval = agent, net, interval
        self.carrier = carrier(net.nic)
        self.decision = Decision()
        self.mode_seq = time.time_ns()  # unique across restarts of this agent: a stale echo never matches
        self.since = time.time()
        self.error = ""
        # the peer, from its newest NicState
        self.peer: PeerNic | None = None
        self.peer_lend: str | None = None
        self.peer_mode_seq = 0
        self.peer_macs: list[str] = []
        self._peer_key: tuple[str, int] = ("", 0)
        self._announced: set[str] = set()  # MACs announced for the peer since this lending began
        self._seq = 0
        self._again: list[asyncio.TimerHandle] = []  # announcements to repeat, for the decision in force
        self._said: tuple | None = None
        self._said_at = 0.0
        self._wake = asyncio.Event()

    @property
    def pairing_devices(self) -> set[str]:
        return set(self.net.pairing.values())

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        loop, events = asyncio.get_running_loop(), link_events()
        if events is not None:
            loop.add_reader(events.fileno(), self._on_link_event, events)
        try:
            while True:
                self._wake.clear()
                try:
                    await self._step()
                except Exception as exc:  # never let the pairing take the agent down; the next step retries
                    if str(exc) != self.error:
                        log.exception("network pairing step failed")
                    self.error = str(exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval)
        finally:
            if events is not None:
                loop.remove_reader(events.fileno())
                events.close()

    def _on_link_event(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError: drained; ENOBUFS: events were lost, look anyway
            while sock.recv(65536):
                pass
        self.wake()

    # -- the peer -----------------------------------------------------------------------------------------
    def on_state(self, msg: wire.NicState) -> None:
        boot, seq = self._peer_key
        if msg.boot == boot and msg.seq <= seq:
            return  # an older copy (the same state goes on both links)
        self._peer_key = (msg.boot, msg.seq)
        before = (self.peer, self.peer_lend, self.peer_macs)
        old_carrier = self.peer.carrier if self.peer else None
        self.peer = PeerNic(carrier=msg.carrier, borrow=msg.borrow or None, echo=msg.echo)
        self.peer_lend, self.peer_mode_seq, self.peer_macs = msg.lend or None, msg.mode_seq, list(msg.macs)
        if msg.carrier != old_carrier:
            self._event(f"the peer's NIC {'has a carrier' if msg.carrier else 'lost its carrier'}")
        if (self.peer, self.peer_lend, self.peer_macs) != before:
            self.wake()

    # -- one step -----------------------------------------------------------------------------------------
    async def _step(self) -> None:
        net, links = self.net, self.agent.links
        now_carrier = carrier(net.nic)
        if now_carrier != self.carrier:
            self.carrier = now_carrier
            log.info("NIC %s: carrier %s", net.nic, "up" if now_carrier else "down")
            self._event(f"NIC {net.nic} {'has a carrier again' if now_carrier else 'lost its carrier'}")
        links_up = [link for link in links.up() if link in net.pairing]
        if not links.up() and self.peer is not None:
            self.peer, self.peer_lend = None, None  # nothing the peer said holds once it is lost
            self._event("the peer is lost: its NIC's state is unknown")
        protecting = any(res.role == Role.PRIMARY for res in self.agent.resources.values())
        old = self.decision
        new = decide(Situation(self.carrier, links_up, self.peer, protecting, old.borrow, self.mode_seq))
        in_bridge = bridge_ports(net.bridge) & ({net.nic} | self.pairing_devices)
        want = ports(new, net.nic, net.pairing)
        if in_bridge != want:
            todo = steps(frozenset(in_bridge), want)
            lines = [f"link set {dev} master {net.bridge}" if into else f"link set {dev} nomaster"
                     for dev, into in todo]
            lines += [f"link set {dev} up" for dev, into in todo if into]
            try:
                await run_batch(IP, lines)
            except RuntimeError as exc:
                if str(exc) != self.error:  # once per distinct failure, not at every step while it lasts
                    log.error("network pairing: %s (%s)", exc, "; ".join(lines))
                    self._event(f"the bridge could not be changed: {exc}")
                self.error = str(exc)
                return
            log.info("bridge %s: %s", net.bridge, ", ".join(f"{dev} {'in' if into else 'out'}" for dev, into in todo))
        self.error = ""
        if new != old:
            for handle in self._again:  # never repeat an announcement of a path that is no longer in force
                handle.cancel()
            self._again = []
            if (new.borrow is None) != (old.borrow is None):
                self.mode_seq += 1
            self.decision, self.since = new, time.time()
            if new.lend != old.lend:
                self._announced = set()
            log.info("network pairing: %s%s", new.mode, f" over link {new.link}" if new.link else "")
            self._event(self._why(old, new))
        if new.lend is not None:
            await self._announce_for_peer()
        if old.borrow is not None and new.borrow is None and self.carrier:
            macs = bridge_macs(net.bridge, {net.nic} | self.pairing_devices)
            self._announce(macs)
            log.info("failback: announced %d MACs on %s", len(macs), net.nic)
        self._tell_peer()

    async def _announce_for_peer(self) -> None:
        """The borrower's MACs, learned by the switch at this host's NIC: its forwarding entries for them at the
        NIC (learned from the borrower's frames that came across the switch before) go first, or this bridge
        would drop the switch's frames for them as coming back where they came from."""
        fresh = [mac for mac in self.peer_macs if mac not in self._announced]
        if not fresh:
            return
        await run_batch(BRIDGE, [f"fdb del {mac} dev {self.net.nic} master" for mac in fresh], force=True)
        self._announce(fresh)
        self._announced.update(fresh)
        log.info("lending: announced %d MACs of the peer on %s", len(fresh), self.net.nic)

    def _announce(self, macs: list[str]) -> None:
        """Announce ``macs`` out of the NIC now and again after ``ANNOUNCE_AGAIN`` (cancelled when the decision
        changes: a late announcement of a path given up would pull the MACs back to it)."""
        announce(self.net.nic, macs)
        loop = asyncio.get_running_loop()
        self._again = [h for h in self._again if h.when() > loop.time()]
        self._again += [loop.call_later(delay, announce, self.net.nic, macs) for delay in ANNOUNCE_AGAIN]

    def _tell_peer(self) -> None:
        d, links = self.decision, self.agent.links
        macs = bridge_macs(self.net.bridge, {self.net.nic} | self.pairing_devices) if d.borrow else []
        said = (self.carrier, self.mode_seq, self.peer_mode_seq, d.borrow or "", d.lend or "", macs)
        now = time.monotonic()
        if said == self._said and now - self._said_at < self.interval * 0.9:
            return
        self._said, self._said_at = said, now
        self._seq += 1
        msg = wire.NicState(boot=links.boot, seq=self._seq, carrier=self.carrier, mode_seq=self.mode_seq,
                            echo=self.peer_mode_seq, borrow=d.borrow or "", lend=d.lend or "", macs=macs)
        for link in links.up():
            links.send_on(link, msg)

    def _why(self, old: Decision, new: Decision) -> str:
        if new.mode == Mode.BORROWING:
            if old.mode == Mode.BORROWING:
                return f"link {old.borrow} is down: the peer's NIC is borrowed over link {new.borrow} now"
            return f"NIC {self.net.nic} has no carrier: the peer's NIC carries the traffic over link {new.borrow}"
        if new.mode == Mode.LENDING:
            return f"the peer's NIC has no carrier: this NIC carries its traffic over link {new.lend}"
        if old.mode == Mode.BORROWING:
            return ("failback: the NIC carries the traffic again" if self.carrier
                    else "the peer's NIC cannot be borrowed any more")
        return "the peer no longer borrows this NIC"

    # -- what the console sees ------------------------------------------------------------------------------
    def _event(self, why: str) -> None:
        self.agent.event("network", None, {**self._summary(), "why": why})

    def _summary(self) -> dict:
        return {"carrier": self.carrier, "peer_carrier": self.peer.carrier if self.peer else None,
                "mode": str(self.decision.mode), "paired": self.decision.link}

    def status(self) -> dict:
        return {
            "bridge": self.net.bridge,
            "nic": self.net.nic,
            "pairing": dict(self.net.pairing),
            **self._summary(),
            "peer_lends": self.decision.borrow is not None and self.peer_lend == self.decision.borrow,
            "since": round(self.since, 3),
            "error": self.error,
        }
