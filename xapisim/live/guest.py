"""``python -m xapisim.live.guest``: the live test bed's guest, a small TCP service whose state is on its disk.

    python -m xapisim.live.guest --name web-01 --listen 10.X.1.1:7000 --disk 10.X.0.11:10810/<export>

The disk is an NBD export (``am.nbd_client``); the log format and the line protocol are ``guest_core``'s. At
start the guest reads its log back, so a guest restarted (or started on another host, from the same export)
still answers for every request it acknowledged. A PUT is answered only once its record is on the disk (NBD
write with FUA); a disk error answers ``ERR`` and stores nothing; a lost disk connection ends the guest (exit
status 3), as a VM dies when its storage goes away.
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

from am.config import Address
from am.nbd_client import NBDClient, NBDReplyError

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


class Guest:
    def __init__(self, name: str, disk: NBDClient, payloads: list[bytes], end: int) -> None:
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
                await self.disk.write(self.end, encode_record(seq, payload), fua=True)
            except NBDReplyError as exc:
                log.warning("write of record %d failed: %s", seq, exc)
                return f"ERR {exc}".encode()
            except ConnectionError as exc:
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


async def read_log(disk: NBDClient) -> tuple[list[bytes], int]:
    scanner = LogScanner(disk.size)
    while (want := scanner.want()) is not None:
        scanner.feed(await disk.read(*want))
    return [r.payload for r in scanner.records], scanner.end


async def connect_disk(host: str, port: int, export: str, timeout: float) -> NBDClient:
    """The disk server may still be starting (a host that just booted): retry until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncio.wait_for(NBDClient.connect(host, port, export), 2.0)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            if time.monotonic() > deadline:
                raise ConnectionError(f"no disk at {host}:{port}/{export}: {exc}") from None
            await asyncio.sleep(0.05)


def announce(ifname: str, ip: str) -> None:
    """Send a gratuitous ARP from ``ifname``: the switch learns the guest's port at once (a guest restarted on
    another host would otherwise be unreachable until it sends, or until the switch forgets it, 300 s)."""
    mac = bytes.fromhex(Path(f"/sys/class/net/{ifname}/address").read_text().strip().replace(":", ""))
    addr = socket.inet_aton(ip)
    arp = struct.pack(">HHBBH", 1, 0x0800, 6, 4, 1) + mac + addr + bytes(6) + addr  # a request for its own address
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
        raw.bind((ifname, 0))
        raw.send(b"\xff" * 6 + mac + b"\x08\x06" + arp)


async def run(args: argparse.Namespace) -> int:
    where, _, export = args.disk.partition("/")
    disk_at = Address.parse(where, "--disk")
    try:
        disk = await connect_disk(disk_at.host, disk_at.port, export, args.disk_timeout)
        payloads, end = await read_log(disk)
    except (ConnectionError, NBDReplyError) as exc:
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
    waits = {asyncio.create_task(stop.wait()), asyncio.create_task(guest.lost.wait())}
    # A disk connection that drops while no request is in flight is seen by the client's reader task.
    waits.add(asyncio.create_task(_watch_disk(disk, guest)))
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


async def _watch_disk(disk: NBDClient, guest: Guest) -> None:
    await disk.wait_lost()
    guest.lost.set()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xapisim.live.guest", description="The live test bed's guest.")
    p.add_argument("--name", required=True)
    p.add_argument("--listen", required=True, metavar="IP:PORT")
    p.add_argument("--disk", required=True, metavar="HOST:PORT/EXPORT", help="its disk, an NBD export")
    p.add_argument("--nic", help="announce the address on this interface (gratuitous ARP) once listening")
    p.add_argument("--disk-timeout", type=float, default=10.0, help="how long to wait for the disk at start, s")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
