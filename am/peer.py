"""The two availability links to the peer AM: one TCP connection each, heartbeats on both, silence = down.

Threading contract: everything here runs on the agent's event loop. ``send`` never blocks: a message goes on the
active link's transport buffer. The active link is sticky: it moves only when it goes down, and every move is
announced (``on_change``) so each resource re-sends what the peer has not acknowledged on the new link.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

from am import wire
from am.config import Config
from am.states import Link, StateCell

log = logging.getLogger("am.peer")
LINKS = ("a", "b")
STREAM_LIMIT = 4 << 20  # a reader buffer of a few writes: fewer pauses of the transport under load


class Connection:
    def __init__(self, link: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.link = link
        self.reader = reader
        self.writer = writer
        self.last_rx = time.monotonic()
        self.last_hb_sent = 0.0  # the peer's ``sent`` of its last heartbeat, echoed back
        self.last_hb_at = 0.0
        self._out: list[bytes] = []

    def send(self, msg: wire.Message) -> None:
        """Queued, and written with the other messages of this loop iteration in one system call."""
        if self.writer.is_closing():
            return
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.extend(wire.encode_parts(msg))

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and not self.writer.is_closing():
            self.writer.writelines(out)

    def abort(self) -> None:
        # abort, not close: nothing queued on a dead link may reach the peer after the move to the other one
        self._out.clear()
        self.writer.transport.abort()


class PeerLinks:
    def __init__(self, cfg: Config, on_message: Callable[[str, wire.Message], None],
                 on_change: Callable[[str], None], on_state: Callable[[str, object, object, str], None]) -> None:
        self.cfg = cfg
        self.boot = uuid.uuid4().hex[:12]
        self.peer_boot = ""
        self.on_message = on_message
        self.on_change = on_change
        self.conns: dict[str, Connection | None] = {link: None for link in LINKS}
        self.state = {link: StateCell(f"link {link}", Link.DOWN, on_state) for link in LINKS}
        self.rtt_ms: dict[str, float | None] = {link: None for link in LINKS}
        self.active: str | None = None
        self.dialer = cfg.node < cfg.peer  # one side dials, so each link has one connection
        self._tasks: list[asyncio.Task] = []
        self._servers: list[asyncio.Server] = []
        self._probes: dict[int, tuple[asyncio.Future, bytes]] = {}
        self.timeout = cfg.timers.link_timeout_ms / 1000
        self.interval = cfg.timers.heartbeat_ms / 1000

    async def start(self) -> None:
        for link in LINKS:
            addr = self.cfg.link_addresses[link]
            server = await asyncio.start_server(
                lambda r, w, link=link: self._accept(link, r, w), addr.host, addr.port, reuse_address=True,
                limit=STREAM_LIMIT)
            self._servers.append(server)
            if self.dialer:
                self._tasks.append(asyncio.create_task(self._dial_loop(link)))
        self._tasks.append(asyncio.create_task(self._heartbeat_loop()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for server in self._servers:
            server.close()
        for conn in self.conns.values():
            if conn:
                conn.abort()

    # -- the state of the peer as a whole --------------------------------------------------------------
    def up(self) -> list[str]:
        return [link for link in LINKS if self.state[link] == Link.UP]

    @property
    def connected(self) -> bool:
        return self.active is not None

    def send(self, msg: wire.Message) -> bool:
        """On the active link; False when the peer is lost (the caller keeps the message for a resend)."""
        if self.active is None:
            return False
        conn = self.conns[self.active]
        if conn is None:
            return False
        conn.send(msg)
        return True

    def send_on(self, link: str, msg: wire.Message) -> None:
        conn = self.conns.get(link)
        if conn is not None:
            conn.send(msg)

    def _choose_active(self, why: str) -> None:
        if self.active is not None and self.state[self.active] == Link.UP:
            return
        up = self.up()
        new = up[0] if up else None
        if new != self.active:
            log.info("replication link %s -> %s (%s)", self.active, new, why)
            self.active = new
            self.on_change(why)

    # -- connections ----------------------------------------------------------------------------------
    async def _dial_loop(self, link: str) -> None:
        addr = self.cfg.peer_addresses[link]
        while True:
            if self.conns[link] is None:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(addr.host, addr.port, limit=STREAM_LIMIT), self.timeout)
                    writer.write(wire.encode(wire.Hello(self.cfg.node, link, self.boot)))
                    hello = await asyncio.wait_for(wire.read_message(reader), self.timeout)
                    if self._check_hello(link, hello):
                        self._attach(link, reader, writer)
                    else:
                        writer.transport.abort()
                except (TimeoutError, OSError, asyncio.IncompleteReadError, wire.BadFrame):
                    pass
            await asyncio.sleep(self.interval)

    async def _accept(self, link: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await asyncio.wait_for(wire.read_message(reader), self.timeout)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, wire.BadFrame) as exc:
            log.warning("link %s: refused a connection without a valid hello (%s)", link, exc)
            writer.transport.abort()
            return
        if not self._check_hello(link, hello):
            writer.transport.abort()
            return
        writer.write(wire.encode(wire.Hello(self.cfg.node, link, self.boot)))
        self._attach(link, reader, writer)

    def _check_hello(self, link: str, hello: wire.Message) -> bool:
        if not isinstance(hello, wire.Hello) or hello.node != self.cfg.peer or hello.link != link:
            log.warning("link %s: refused %r (expected %s on link %s)", link, hello, self.cfg.peer, link)
            return False
        if self.peer_boot and hello.boot != self.peer_boot:
            log.info("peer %s restarted (boot %s)", self.cfg.peer, hello.boot)
        self.peer_boot = hello.boot
        return True

    def _attach(self, link: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        old = self.conns[link]
        if old is not None:
            old.abort()
        conn = Connection(link, reader, writer)
        self.conns[link] = conn
        self.state[link].set(Link.UP, "hello exchanged")
        self._tasks.append(asyncio.create_task(self._read_loop(conn)))
        self._choose_active(f"link {link} up")

    def _drop(self, conn: Connection, why: str) -> None:
        if self.conns[conn.link] is not conn:
            return
        conn.abort()
        self.conns[conn.link] = None
        self.rtt_ms[conn.link] = None
        self.state[conn.link].set(Link.DOWN, why)
        self._choose_active(f"link {conn.link} down: {why}")

    async def _read_loop(self, conn: Connection) -> None:
        try:
            while True:
                msg = await wire.read_message(conn.reader)
                conn.last_rx = time.monotonic()
                if isinstance(msg, wire.Heartbeat):
                    conn.last_hb_sent, conn.last_hb_at = msg.sent, conn.last_rx
                    if msg.echo:
                        self.rtt_ms[conn.link] = max(0.0, (conn.last_rx - msg.echo) * 1000)
                    continue
                if isinstance(msg, wire.Probe):
                    if msg.reply:
                        self._probe_reply(msg)
                    else:
                        conn.send(wire.Probe(msg.pid, msg.payload, reply=True))
                    continue
                self.on_message(conn.link, msg)
        except (OSError, asyncio.IncompleteReadError) as exc:
            self._drop(conn, f"connection lost ({type(exc).__name__})")
        except wire.BadFrame as exc:
            log.warning("link %s: %s", conn.link, exc)
            self._drop(conn, "malformed frame")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("link %s: message handling failed", conn.link)
            self._drop(conn, "internal error")

    async def _heartbeat_loop(self) -> None:
        while True:
            now = time.monotonic()
            for conn in list(self.conns.values()):
                if conn is None:
                    continue
                if now - conn.last_rx > self.timeout:
                    self._drop(conn, f"silent for {self.cfg.timers.link_timeout_ms} ms")
                    continue
                # echo the peer's clock shifted by how long we held it, so its rtt excludes our interval
                echo = conn.last_hb_sent + (now - conn.last_hb_at) if conn.last_hb_sent else 0.0
                conn.send(wire.Heartbeat(sent=now, echo=echo))
            await asyncio.sleep(self.interval)

    async def probe(self, size: int = 64 * 1024) -> dict[str, float | None]:
        """Active validation of the links: a payload echoed on each link; round-trip ms, None when it failed."""
        results: dict[str, float | None] = {}
        for link in LINKS:
            conn = self.conns[link]
            if conn is None:
                results[link] = None
                continue
            waiter = asyncio.get_running_loop().create_future()
            pid = int(time.monotonic_ns() & 0x7FFFFFFF)
            payload = uuid.uuid4().bytes * (size // 16)
            self._probes[pid] = (waiter, payload)
            start = time.monotonic()
            conn.send(wire.Probe(pid, payload))
            try:
                ok = await asyncio.wait_for(waiter, self.timeout * 2)
                results[link] = (time.monotonic() - start) * 1000 if ok else None
            except TimeoutError:
                results[link] = None
            finally:
                self._probes.pop(pid, None)
        return results

    def _probe_reply(self, msg: wire.Probe) -> None:
        entry = self._probes.get(msg.pid)
        if entry and not entry[0].done():
            entry[0].set_result(msg.payload == entry[1])

