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
import sys
import time
from pathlib import Path

from am.config import Address, ConfigError
from am.nbd_client import NBDClient, NBDOptionError, NBDReplyError

from .guest_core import (
    MAX_PAYLOAD,
    BadRequest,
    Count,
    Get,
    LineBuffer,
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


class Guest:
    def __init__(self, name: str, disk: Disk, payloads: list[bytes], end: int) -> None:
        self.name = name
        self.disk = disk
        self.payloads = payloads  # payloads[i] is record i + 1, all on the disk
        self.end = end
        # One record at a time: a later record is never on the disk before an earlier one was acknowledged.
        self._write = asyncio.Lock()
        self.lost = asyncio.Event()

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
        if isinstance(request, Count):
            return b"COUNT %d" % len(self.payloads)
        if isinstance(request, Ping):
            return b"PONG " + self.name.encode()
        assert isinstance(request, BadRequest)
        return b"ERR " + request.reason.encode()

    async def serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines = LineBuffer()
        try:
            while data := await reader.read(MAX_PAYLOAD):
                for line in lines.feed(data):
                    writer.write(await self.answer(line) + b"\n")
                await writer.drain()
        except (ConnectionError, ValueError, DiskLost) as exc:
            log.info("client connection ends: %s", exc)
        finally:
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


async def read_log(disk: Disk) -> tuple[list[bytes], int]:
    scanner = LogScanner(disk.size)
    while (want := scanner.want()) is not None:
        scanner.feed(await disk.read(*want))
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
    try:
        disk.retry_for = args.disk_timeout  # the disk server may still be starting (a host that just booted)
        await disk.ensure()
        disk.retry_for = args.reconnect_timeout
        payloads, end = await read_log(disk)
    except (DiskLost, NBDReplyError) as exc:
        print(f"guest {args.name}: {exc}", file=sys.stderr, flush=True)
        return EXIT_NO_DISK
    guest = Guest(args.name, disk, payloads, end)
    listen = Address.parse(args.listen, "--listen")
    server = await asyncio.start_server(guest.serve_client, listen.host, listen.port, reuse_address=True)
    if args.nic:
        try:
            announce(args.nic, listen.host)
        except OSError as exc:  # not fatal: the switch learns the port from the guest's first answer
            log.warning("gratuitous ARP on %s failed: %s", args.nic, exc)
    print(f"guest {args.name} ready on {args.listen}: {len(payloads)} records on the disk", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waits = {asyncio.create_task(stop.wait()), asyncio.create_task(guest.lost.wait()),
             asyncio.create_task(guest.keep_disk())}
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    server.close()
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
    p.add_argument("--disk-timeout", type=float, default=10.0, help="how long to wait for the disk at start, s")
    p.add_argument("--reconnect-timeout", type=float, default=30.0,
                   help="how long to try to get a lost disk connection back before giving up, s")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
