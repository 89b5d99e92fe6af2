"""``python -m xapisim.live.disks``: a simulated host's local disk server, for the guests' unmirrored disks.

    python -m xapisim.live.disks --listen 10.X.0.11:10810 --dir SR_ROOT [--failed]

Serves every ``SR_ROOT/<SR uuid>/<VDI uuid>.img`` as the NBD export ``<VDI uuid>`` (am.nbd's server over its
``FileExport``): the bed keeps one image per VDI in its SR's directory, the simulated storage every host reaches
(the AMs' ``sr_root`` is the same directory). SIGUSR1 makes the host's disk fail
(every request then gets EIO, as from a dying disk), SIGUSR2 repairs it; ``--failed`` starts it failed (a host
that boots with its disk still broken). A Level 2 disk is an export of the host's AM instead (the VDI's
``eac_am_resource``): the bed names a guest's disk by address and export only, so the switch is in the bed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import sys
from pathlib import Path

from am.config import Address
from am.nbd import Err, FileExport, NBDError, NBDServer

log = logging.getLogger("xapisim.live.disks")

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class HostDisk:
    """This host's exports and whether its disk has failed."""

    def __init__(self, directory: Path, failed: bool) -> None:
        self.directory = directory
        self.failed = failed
        self.exports: dict[str, FailingExport] = {}

    def lookup(self, name: str) -> FailingExport | None:
        if not NAME.match(name) or name.startswith("."):
            return None
        if name not in self.exports:
            found = [p for p in self.directory.glob(f"*/{name}.img") if p.is_file()]
            if len(found) != 1:
                return None
            path = found[0]
            self.exports[name] = FailingExport(FileExport(name, path), self)
        return self.exports[name]

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.directory.glob("*/*.img"))


class FailingExport:
    """A FileExport that answers EIO while its host's disk is failed."""

    def __init__(self, inner: FileExport, disk: HostDisk) -> None:
        self.inner, self.disk = inner, disk
        self.name, self.size = inner.name, inner.size

    def available(self) -> str | None:
        return None

    def _check(self) -> None:
        if self.disk.failed:
            raise NBDError(Err.EIO, "the host's disk has failed")

    async def read(self, offset: int, length: int) -> bytes:
        self._check()
        return await self.inner.read(offset, length)

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        self._check()
        await self.inner.write(offset, data, fua)

    async def flush(self) -> None:
        self._check()
        await self.inner.flush()

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        self._check()
        await self.inner.trim(offset, length, fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        self._check()
        await self.inner.write_zeroes(offset, length, fua, may_trim)


async def serve(args: argparse.Namespace) -> None:
    disk = HostDisk(Path(args.dir), args.failed)
    server = NBDServer(disk.lookup, disk.names)
    listen = Address.parse(args.listen, "--listen")
    await server.start(listen.host, listen.port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def set_failed(failed: bool) -> None:
        disk.failed = failed
        log.warning("disk %s", "failed" if failed else "repaired")

    loop.add_signal_handler(signal.SIGUSR1, set_failed, True)
    loop.add_signal_handler(signal.SIGUSR2, set_failed, False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"disks ready on {args.listen}{' (failed)' if disk.failed else ''}", flush=True)
    await stop.wait()
    await server.close(grace=1.0)
    for export in disk.exports.values():
        export.inner.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xapisim.live.disks", description="A simulated host's disk server.")
    p.add_argument("--listen", required=True, metavar="IP:PORT")
    p.add_argument("--dir", required=True, help="the SRs' directories, one <export>.img per VDI in them")
    p.add_argument("--failed", action="store_true", help="start with the disk failed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
