"""``python -m xapisim.live.guest``: the live test bed's guest, a small TCP service whose state is on its disk.

    python -m xapisim.live.guest --name web-01 --listen 10.X.1.1:7000 --endpoint-file <file>
    python -m xapisim.live.guest --name web-01 --listen 10.X.1.1:7000 --disk 10.X.0.11:10810/<export>

The disk is an NBD export (``am.nbd_client``) at the endpoint ``HOST:PORT/EXPORT`` the bed writes in the endpoint
file (or a fixed ``--disk``); the log format and the line protocol are ``guest_core``'s. At start the guest reads
its log back, so a guest restarted (or started on another host, from the same export) still answers for every
request it acknowledged. A PUT is answered only once its record is on the disk (NBD write with FUA); a disk error
answers ``ERR`` and stores nothing.

The disk follows its endpoint: before each request the guest reads the endpoint file, and if the bed rewrote it
(a disk routed through the host's AM while the VM was paused, docs/level2.md) it continues on the new one. A
connection that drops (an AM's swap or failover disconnects its NBD clients) is made again, to the endpoint of
the moment, for up to ``--reconnect-timeout`` seconds, and the write it had not had acknowledged is sent again
(rewriting a record in place is idempotent); only then does the guest give up and exit (status 3), as a VM
dies when its storage goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgspec

from am import checkpoint
from am.config import Address, ConfigError
from am.nbd_client import NBDClient, NBDOptionError, NBDReplyError

from . import tcprepair
from .guest_core import (
    MAX_LINE,
    Add,
    BadRequest,
    Count,
    Get,
    LogScanner,
    Ping,
    Put,
    encode_record,
    parse_request,
    record_size,
)

log = logging.getLogger("xapisim.live.guest")

EXIT_DISK_LOST = 3
EXIT_NO_DISK = 4
EXIT_BAD_CHECKPOINT = 5
EXIT_BAD_ORDER = 6  # a reserved guest was told something else than start or restore


class DiskLost(Exception):
    pass


def parse_endpoint(text: str) -> tuple[str, int, str]:
    """``HOST:PORT/EXPORT`` -> (host, port, export); ValueError if it is not one."""
    where, sep, export = text.strip().partition("/")
    if not sep or not export:
        raise ValueError(f"not HOST:PORT/EXPORT: {text.strip()!r}")
    try:
        at = Address.parse(where, "the endpoint")
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return at.host, at.port, export


class Disk:
    """The guest's disk: one NBD connection to the endpoint of the moment, made again when the endpoint changes
    or the connection drops. The caller serializes the requests (one record at a time)."""

    def __init__(self, endpoint_file: Path | None, fixed: str | None, retry_for: float) -> None:
        self.endpoint_file = endpoint_file
        self.fixed = fixed
        self.retry_for = retry_for
        self.endpoint = ""
        self.client: NBDClient | None = None
        self.reconnects = 0
        self._closing: set[asyncio.Task] = set()

    def wanted(self) -> str:
        if self.endpoint_file is None:
            return self.fixed or ""
        try:
            return self.endpoint_file.read_text().strip() or self.endpoint
        except OSError:
            return self.endpoint  # being replaced, or gone with the guest: keep the one we have

    @property
    def size(self) -> int:
        assert self.client is not None
        return self.client.size

    async def ensure(self) -> NBDClient:
        """The connection to the current endpoint, made (again) if needed; DiskLost after ``retry_for``."""
        want = self.wanted()
        if self.client is not None and self.client.lost is None and want == self.endpoint:
            return self.client
        if self.client is not None:
            why = "its endpoint changed" if want != self.endpoint else f"it was lost ({self.client.lost})"
            log.info("disk connection to %s made again: %s", self.endpoint, why)
            old, self.client = self.client, None
            # The old connection is closed in the background: nothing is in flight on it (one request at a time),
            # and its server's hang-up (after a move, over the old host's path) must not hold up the disk.
            task = asyncio.ensure_future(self._close(old))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            self.reconnects += 1
        deadline = time.monotonic() + self.retry_for
        last: Exception | None = None
        while True:
            want = self.wanted()
            try:
                host, port, export = parse_endpoint(want)
                self.client = await asyncio.wait_for(NBDClient.connect(host, port, export), 2.0)
                self.endpoint = want
                log.info("disk connected to %s", want)
                return self.client
            except (OSError, TimeoutError, asyncio.IncompleteReadError, NBDOptionError, ValueError) as exc:
                last = exc
            if time.monotonic() > deadline:
                raise DiskLost(f"no disk at {want or '(no endpoint)'}: {last}")
            await asyncio.sleep(0.05)

    @staticmethod
    async def _close(client: NBDClient) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 2.0)

    async def write(self, offset: int, data: bytes) -> None:
        """Write with FUA until the disk acknowledges it, across reconnections (re-sent if unacknowledged)."""
        while True:
            client = await self.ensure()
            try:
                await client.write(offset, data, fua=True)
                return
            except ConnectionError as exc:
                log.warning("disk connection lost during a write (%s): sending it again", exc)

    async def read(self, offset: int, length: int) -> bytes:
        while True:
            client = await self.ensure()
            try:
                return await client.read(offset, length)
            except ConnectionError as exc:
                log.warning("disk connection lost during a read (%s): reading again", exc)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


class Gate:
    """Where the guest pauses for a checkpoint: a request runs whole between two checkpoints (one waiting on its
    disk write finishes first), and none starts while paused."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy = 0

    async def enter(self) -> None:
        while not self._open.is_set():
            await self._open.wait()
        self._busy += 1
        self._idle.clear()

    def leave(self) -> None:
        self._busy -= 1
        if not self._busy:
            self._idle.set()

    async def pause(self) -> None:
        self._open.clear()
        await self._idle.wait()

    def resume(self) -> None:
        self._open.set()

    @property
    def paused(self) -> bool:
        return not self._open.is_set()


class ConnImage(msgspec.Struct, frozen=True):
    tcp: tcprepair.TcpState
    inbox: bytes  # read from the socket, not answered yet
    outbox: bytes  # answered, not taken by the kernel yet


class GuestImage(msgspec.Struct, frozen=True):
    """The guest's checkpoint: its memory (the ledger, where its log ends) and its client connections. Its records
    are on its disk, which the AM keeps at the same epoch (protocol D); a restored guest checks that they agree."""

    name: str
    adds: int
    total: int
    records: int
    end: int
    conns: list[ConnImage]


_image_encoder = msgspec.msgpack.Encoder()
_image_decoder = msgspec.msgpack.Decoder(GuestImage)


class Connection:
    """One client connection on a non-blocking socket. What was read and not answered (``inbox``) and what was
    answered and not sent (``outbox``) are the guest's memory, so a checkpoint holds them; bytes move between the
    kernel and them only in synchronous callbacks, never across an ``await`` a checkpoint could fall into."""

    def __init__(self, guest: Guest, sock: socket.socket, inbox: bytes = b"", outbox: bytes = b"") -> None:
        self.guest, self.sock = guest, sock
        sock.setblocking(False)
        self.inbox, self.outbox = bytearray(inbox), bytearray(outbox)
        self.eof = False
        self.closed = False
        self._readable = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._writing = False
        self._loop.add_reader(sock.fileno(), self._read)
        if self.outbox:
            self._flush()

    def _read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.inbox += data
        else:
            self.eof = True
            self._loop.remove_reader(self.sock.fileno())
        self._readable.set()

    def send(self, data: bytes) -> None:
        self.outbox += data
        self._flush()

    def _flush(self) -> None:
        if self.closed:
            return
        try:
            sent = self.sock.send(self.outbox) if self.outbox else 0
        except BlockingIOError:
            sent = 0
        except OSError:
            self.eof = True
            self._readable.set()
            return
        del self.outbox[:sent]
        if self.outbox and not self._writing:
            self._loop.add_writer(self.sock.fileno(), self._flush)
            self._writing = True
        elif not self.outbox and self._writing:
            self._loop.remove_writer(self.sock.fileno())
            self._writing = False

    async def serve(self) -> None:
        gate = self.guest.gate
        try:
            while True:
                cut = self.inbox.find(b"\n")
                if cut < 0:
                    if len(self.inbox) > MAX_LINE:
                        raise ValueError("line too long")
                    if self.eof:
                        return
                    self._readable.clear()
                    await self._readable.wait()
                    continue
                await gate.enter()
                try:
                    line = bytes(self.inbox[:cut]).rstrip(b"\r")
                    del self.inbox[: cut + 1]
                    self.send(await self.guest.answer(line) + b"\n")
                finally:
                    gate.leave()
        except (ValueError, DiskLost) as exc:
            log.info("client connection ends: %s", exc)
        finally:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self.sock.fileno())
                self._loop.remove_writer(self.sock.fileno())
            self.sock.close()
            self.guest.connections.discard(self)

    def image(self) -> ConnImage:
        return ConnImage(tcprepair.capture(self.sock), bytes(self.inbox), bytes(self.outbox))


class Guest:
    def __init__(self, name: str, disk: Disk, payloads: list[bytes], end: int) -> None:
        self.name = name
        self.disk = disk
        self.payloads = payloads  # payloads[i] is record i + 1, all on the disk
        self.end = end
        self.adds = 0  # the ledger of ADD requests: memory only
        self.total = 0
        # One record at a time: a later record is never on the disk before an earlier one was acknowledged.
        self._write = asyncio.Lock()
        self.lost = asyncio.Event()
        self.gate = Gate()
        self.connections: set[Connection] = set()
        self.listener: socket.socket | None = None
        self._tasks: set[asyncio.Task] = set()

    async def put(self, payload: bytes) -> bytes:
        async with self._write:
            seq = len(self.payloads) + 1
            if self.end + record_size(len(payload)) > self.disk.size:
                return b"ERR disk full"
            try:
                await self.disk.write(self.end, encode_record(seq, payload))
            except NBDReplyError as exc:
                log.warning("write of record %d failed: %s", seq, exc)
                return f"ERR {exc}".encode()
            except DiskLost as exc:
                self.lost.set()
                raise DiskLost(str(exc)) from None
            self.payloads.append(payload)
            self.end += record_size(len(payload))
            return b"OK %d" % seq

    async def answer(self, line: bytes) -> bytes:
        request = parse_request(line)
        if isinstance(request, Put):
            return await self.put(request.payload)
        if isinstance(request, Get):
            if 1 <= request.seq <= len(self.payloads):
                return b"VAL %d " % request.seq + self.payloads[request.seq - 1]
            return b"NONE %d" % request.seq
        if isinstance(request, Add):
            self.adds += 1
            self.total += request.amount
            return b"SUM %d %d" % (self.adds, self.total)
        if isinstance(request, Count):
            return b"COUNT %d" % len(self.payloads)
        if isinstance(request, Ping):
            return b"PONG " + self.name.encode()
        assert isinstance(request, BadRequest)
        return b"ERR " + request.reason.encode()

    # -- serving ---------------------------------------------------------------------------------------------
    def listen(self, host: str, port: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        self.listener = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        """Take every connection the kernel completed (also before a capture: one left in the accept queue would
        be lost with the host, though the client saw it established)."""
        while self.listener is not None:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept: %s", exc)
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.adopt(sock)

    def adopt(self, sock: socket.socket, inbox: bytes = b"", outbox: bytes = b"") -> None:
        conn = Connection(self, sock, inbox, outbox)
        self.connections.add(conn)
        task = asyncio.create_task(conn.serve())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        if self.listener is not None:
            asyncio.get_running_loop().remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
        for conn in list(self.connections):
            conn.close()

    # -- the checkpoint source (am.checkpoint's control protocol) --------------------------------------------
    def capture(self) -> bytes:
        """The guest's state, taken at a pause: synchronous, so nothing moves between its parts."""
        self._accept()
        conns = []
        for conn in list(self.connections):
            if conn.eof:
                continue  # the client closed it: not carried over
            try:
                conns.append(conn.image())
            except OSError as exc:
                log.warning("a connection is not carried over: %s", exc)
        image = GuestImage(self.name, self.adds, self.total, len(self.payloads), self.end, conns)
        return _image_encoder.encode(image)

    def restore_state(self, image: GuestImage) -> None:
        """The memory of a checkpoint, once the disk's log is read: both must say the same (protocol D)."""
        if (image.records, image.end) != (len(self.payloads), self.end):
            log.error("inconsistent restore: the checkpoint says %d records ending at %d, the disk holds %d ending "
                      "at %d", image.records, image.end, len(self.payloads), self.end)
            del self.payloads[image.records :]
            self.end = min(self.end, image.end)
        self.adds, self.total = image.adds, image.total

    def restore_connections(self, image: GuestImage) -> int:
        """The client connections of a checkpoint, each with the same TCP state: returns how many."""
        restored = 0
        for conn in image.conns:
            try:
                sock = tcprepair.restore(conn.tcp)
            except OSError as exc:
                log.error("connection from %s:%d not restored: %s", *conn.tcp.peer, exc)
                continue
            self.adopt(sock, conn.inbox, conn.outbox)
            restored += 1
        return restored

    async def serve_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client of the control socket (the host's AM): pause, capture, resume, hello. The guest never stays
        paused once that client is gone."""
        try:
            while True:
                request = await checkpoint.read_request(reader)
                try:
                    if request.op == "pause":
                        await self.gate.pause()
                        reply = checkpoint.SourceReply(True)
                    elif request.op == "capture":
                        if not self.gate.paused:
                            reply = checkpoint.SourceReply(False, error="capture without a pause")
                        else:
                            reply = checkpoint.SourceReply(True, self.capture())
                    elif request.op == "resume":
                        self.gate.resume()
                        reply = checkpoint.SourceReply(True)
                    elif request.op == "hello":
                        reply = checkpoint.SourceReply(True, self.name.encode())
                    else:
                        reply = checkpoint.SourceReply(False, error=f"unknown request {request.op[:32]!r}")
                except OSError as exc:
                    reply = checkpoint.SourceReply(False, error=str(exc))
                writer.write(checkpoint.frame(reply))
                await writer.drain()
        except (EOFError, asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            log.info("control connection ends: %s", exc or type(exc).__name__)
        finally:
            self.gate.resume()
            writer.close()

    async def keep_disk(self) -> None:
        """A connection that drops while no request is in flight is made again at once (or the guest ends)."""
        while True:
            client = self.disk.client
            if client is not None:
                await client.wait_lost()
            async with self._write:
                try:
                    await self.disk.ensure()
                except DiskLost as exc:
                    log.error("%s", exc)
                    self.lost.set()
                    return


RESTORE_TABLE = "xapisim_restore"


def closed_port_table(port: int) -> str:
    """An nft script that drops TCP segments to ``port`` in a guest being restored: one reaching it before its
    connections exist would draw a reset. The guest deletes the table once they do (``open_port``)."""
    return (f"table inet {RESTORE_TABLE} {{\n"
            f"  chain input {{ type filter hook input priority 0; policy accept; tcp dport {port} drop; }}\n}}\n")


def open_port() -> None:
    try:
        subprocess.run(["nft", "delete", "table", "inet", RESTORE_TABLE], check=True, capture_output=True,
                       timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        log.error("the service port stays closed: nft: %s", exc)


READ_AHEAD = 1 << 20


async def read_log(disk: Disk) -> tuple[list[bytes], int]:
    """The records on the disk, read a MiB at a time (a record at a time, a restored guest with thousands of records
    would take seconds before it answers)."""
    scanner = LogScanner(disk.size)
    window, at = b"", 0
    while (want := scanner.want()) is not None:
        offset, length = want
        if not (at <= offset and offset + length <= at + len(window)):
            at = offset
            window = await disk.read(offset, min(max(length, READ_AHEAD), disk.size - offset))
        scanner.feed(window[offset - at : offset - at + length])
    return [r.payload for r in scanner.records], scanner.end


def garp_frame(mac: bytes, ip: str) -> bytes:
    """An Ethernet frame holding a gratuitous ARP of ``ip`` at ``mac``: a broadcast request for its own address."""
    addr = socket.inet_aton(ip)
    arp = struct.pack(">HHBBH", 1, 0x0800, 6, 4, 1) + mac + addr + bytes(6) + addr
    return b"\xff" * 6 + mac + b"\x08\x06" + arp


def announce(ifname: str, ip: str) -> None:
    """Send a gratuitous ARP from ``ifname``: the switch learns the guest's port at once (a guest restarted on
    another host would otherwise be unreachable until it sends, or until the switch forgets it, 300 s). The bed
    sends the same frame after a live migration (``xapisim.live.migrate``)."""
    mac = bytes.fromhex(Path(f"/sys/class/net/{ifname}/address").read_text().strip().replace(":", ""))
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
        raw.bind((ifname, 0))
        raw.send(garp_frame(mac, ip))


async def run(args: argparse.Namespace) -> int:
    endpoint_file = Path(args.endpoint_file) if args.endpoint_file else None
    disk = Disk(endpoint_file, args.disk, args.reconnect_timeout)
    image = None
    if args.restore:
        try:
            image = _image_decoder.decode(Path(args.restore).read_bytes())
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            print(f"guest {args.name}: cannot restore from {args.restore}: {exc}", file=sys.stderr, flush=True)
            return EXIT_BAD_CHECKPOINT
    guest = Guest(args.name, disk, [], 0)
    await guest.gate.pause()  # no request is answered before the log is read
    listen = Address.parse(args.listen, "--listen")
    guest.listen(listen.host, listen.port)
    restored = ""
    if image is not None:
        # The connections first (the bed closed the port until they exist), then the disk: their requests wait for
        # the log.
        count = guest.restore_connections(image)
        restored = f", restored from its checkpoint with {count} connections and {image.adds} ADDs"
    if image is not None:
        open_port()
    if args.nic:
        try:
            announce(args.nic, listen.host)
        except OSError as exc:  # not fatal: the switch learns the port from the guest's first answer
            log.warning("gratuitous ARP on %s failed: %s", args.nic, exc)
    try:
        disk.retry_for = args.disk_timeout  # the disk server may still be starting (a host that just booted)
        await disk.ensure()
        disk.retry_for = args.reconnect_timeout
        guest.payloads, guest.end = await read_log(disk)
    except (DiskLost, NBDReplyError) as exc:
        print(f"guest {args.name}: {exc}", file=sys.stderr, flush=True)
        guest.close()
        return EXIT_NO_DISK
    if image is not None:
        guest.restore_state(image)
    guest.gate.resume()
    control = None
    if args.control:
        Path(args.control).unlink(missing_ok=True)
        try:
            control = await asyncio.start_unix_server(guest.serve_control, path=args.control)
        except OSError as exc:  # the guest runs on; its AM cannot checkpoint it (NoGuest)
            log.error("no checkpoint control on %s: %s", args.control, exc)
    print(f"guest {args.name} ready on {args.listen}: {len(guest.payloads)} records on the disk{restored}",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waits = {asyncio.create_task(stop.wait()), asyncio.create_task(guest.lost.wait()),
             asyncio.create_task(guest.keep_disk())}
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    guest.close()
    if control is not None:
        control.close()
        Path(args.control).unlink(missing_ok=True)
    if guest.lost.is_set():
        print(f"guest {args.name}: the disk connection was lost", file=sys.stderr, flush=True)
        return EXIT_DISK_LOST
    with contextlib.suppress(Exception):
        await asyncio.wait_for(disk.close(), 2.0)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xapisim.live.guest", description="The live test bed's guest.")
    p.add_argument("--name", required=True)
    p.add_argument("--listen", required=True, metavar="IP:PORT")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--disk", metavar="HOST:PORT/EXPORT", help="its disk, an NBD export")
    where.add_argument("--endpoint-file", metavar="FILE", help="a file holding HOST:PORT/EXPORT, followed")
    p.add_argument("--nic", help="announce the address on this interface (gratuitous ARP) once listening")
    p.add_argument("--control", metavar="SOCKET",
                   help="serve the AM's checkpoint requests (Level 3, am/checkpoint.py) on this Unix socket")
    p.add_argument("--restore", metavar="FILE", help="start from this checkpoint (its connections too)")
    p.add_argument("--wait-for-order", action="store_true",
                   help="a reserved guest (its VM started paused): wait for one line on stdin, 'start' or "
                        "'restore FILE', before touching the disk or the network")
    p.add_argument("--disk-timeout", type=float, default=10.0, help="how long to wait for the disk at start, s")
    p.add_argument("--reconnect-timeout", type=float, default=30.0,
                   help="how long to try to get a lost disk connection back before giving up, s")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.wait_for_order:
        order = sys.stdin.readline().split(maxsplit=1)
        if not order:
            return 0  # stopped before it ran
        if order[0] == "restore" and len(order) == 2:
            args.restore = order[1].strip()
        elif order != ["start"]:
            print(f"guest {args.name}: unknown order {' '.join(order)!r}", file=sys.stderr, flush=True)
            return EXIT_BAD_ORDER
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
