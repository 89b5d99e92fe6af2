"""What a replica keeps on its host: the sparse raw image, the dirty bitmap and the metadata (generations, states).

The bitmap and the metadata are written with fdatasync and atomic renames: a degraded write is acknowledged only
after the bit covering it is on stable storage, so a crash can never forget a region the peer is missing.
"""
from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import uuid
from pathlib import Path

import msgspec


class LocalDiskError(OSError):
    """The local image failed (I/O error or short transfer): the resource goes on with the peer's replica."""


def new_gen() -> str:
    return uuid.uuid4().hex[:16]


class Image:
    """A local sparse raw image. Reads and writes run synchronously so the caller's order is the disk's order."""

    def __init__(self, path: Path, size: int, *, create: bool) -> None:
        self.path = path
        self.size = size
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        self.fd = os.open(path, flags, 0o600)
        if create and os.fstat(self.fd).st_size < size:
            os.ftruncate(self.fd, size)
        if os.fstat(self.fd).st_size < size:
            os.close(self.fd)
            raise ValueError(f"image {path} is smaller than {size} bytes")
        self.injected_failure = False  # the test bed's disk fault: every I/O fails as a dying disk's would
        # The test bed's hung disk: a flush waits until it is set again, as on a disk that stopped answering (the
        # I/O that does not wait for it goes on; the event loop is not blocked).
        self.unstalled = asyncio.Event()
        self.unstalled.set()

    def _check(self) -> None:
        if self.injected_failure:
            raise LocalDiskError(5, "injected disk failure")

    def read(self, offset: int, length: int) -> bytes:
        self._check()
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as exc:
            raise LocalDiskError(exc.errno, exc.strerror) from None
        if len(data) != length:
            raise LocalDiskError(5, f"short read at {offset}")
        return data

    def write(self, offset: int, data: bytes) -> None:
        self._check()
        try:
            done = os.pwrite(self.fd, data, offset)
        except OSError as exc:
            raise LocalDiskError(exc.errno, exc.strerror) from None
        if done != len(data):
            raise LocalDiskError(5, f"short write at {offset}")

    def is_hole(self, offset: int, length: int) -> bool:
        """True when the file holds no data over these bytes (a hole of a sparse image reads as zeroes): known
        without reading them. False when unsure."""
        if self.injected_failure:
            return False
        try:
            data_at = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            return exc.errno == errno.ENXIO  # no data from ``offset`` to the end of the file
        return data_at >= offset + length

    def is_zero(self, offset: int, length: int) -> bool:
        return self.is_hole(offset, length) or not any(self.read(offset, length))

    def zero(self, offset: int, length: int, *, keep_holes: bool = False) -> None:
        """Zeroes over ``length`` bytes; ``keep_holes``: only where the image holds something else, so that the
        unwritten part of a sparse image stays unallocated (a resync's zero regions)."""
        step = 1 << 20
        for at in range(offset, offset + length, step):
            size = min(step, offset + length - at)
            if keep_holes and self.is_zero(at, size):
                continue
            self.write(at, bytes(size))

    async def sync(self) -> None:
        self._check()
        await self.unstalled.wait()
        try:
            await asyncio.to_thread(os.fdatasync, self.fd)
        except OSError as exc:
            raise LocalDiskError(exc.errno, exc.strerror) from None

    def close(self) -> None:
        os.close(self.fd)


_SET = re.compile(rb"\xff+|[^\x00\xff]")
_BITS_OF = [tuple(i for i in range(8) if byte >> i & 1) for byte in range(256)]


class Bitmap:
    """One bit per region of the disk: set = the peer may not have this region's latest data."""

    def __init__(self, path: Path, size: int, region: int) -> None:
        self.path = path
        self.region = region
        self.regions = (size + region - 1) // region
        nbytes = (self.regions + 7) // 8
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        current = os.pread(self.fd, nbytes, 0)
        self.bits = bytearray(current.ljust(nbytes, b"\0"))
        if len(current) < nbytes:
            os.pwrite(self.fd, bytes(self.bits), 0)
        self._lock = asyncio.Lock()

    def regions_of(self, offset: int, length: int) -> range:
        return range(offset // self.region, (offset + max(length, 1) - 1) // self.region + 1)

    def is_set(self, index: int) -> bool:
        return bool(self.bits[index >> 3] & (1 << (index & 7)))

    # count, dirty and mark_all work a byte at a time: a disk of many GiB has hundreds of thousands of regions,
    # and a loop over them blocked the event loop past the links' timeout when a full resync started.
    def count(self) -> int:
        return int.from_bytes(self.bits, "little").bit_count()

    def dirty(self) -> list[int]:
        out: list[int] = []
        for run in _SET.finditer(self.bits):  # a run of full bytes, or one partly set byte: found in C
            start, end = run.span()
            if self.bits[start] == 0xFF:
                out.extend(range(start << 3, end << 3))
            else:
                out.extend((start << 3) + i for i in _BITS_OF[self.bits[start]])
        while out and out[-1] >= self.regions:
            out.pop()
        return out

    def _set(self, index: int, value: bool) -> None:
        if value:
            self.bits[index >> 3] |= 1 << (index & 7)
        else:
            self.bits[index >> 3] &= ~(1 << (index & 7)) & 0xFF

    async def mark(self, indexes: range | list[int]) -> None:
        """Set the bits and return only once they are on stable storage."""
        new = [i for i in indexes if not self.is_set(i)]
        if not new:
            return
        for i in new:
            self._set(i, True)
        async with self._lock:  # one fdatasync covers every caller that set bits before it started
            lo, hi = new[0] >> 3, (new[-1] >> 3) + 1
            os.pwrite(self.fd, bytes(self.bits[lo:hi]), lo)
            await asyncio.to_thread(os.fdatasync, self.fd)

    def mark_all(self) -> None:
        full, rest = divmod(self.regions, 8)
        self.bits[:full] = b"\xff" * full
        if rest:
            self.bits[full] = (1 << rest) - 1
        self.save()

    def clear(self, index: int) -> None:
        """Cleared lazily: a bit left set on disk only costs a region copied again."""
        self._set(index, False)

    def save(self) -> None:
        os.pwrite(self.fd, bytes(self.bits), 0)
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class Meta(msgspec.Struct):
    name: str
    size: int
    image: str
    role: str
    disk: str
    epoch: int = 0
    gen: str = ""
    history: list[str] = []
    bitmap_base: str = ""
    unclean: bool = False  # set while primary; cleared by a clean demotion
    split_brain: bool = False
    sr: str = ""  # the storage repository and VDI whose image this is (empty: an image given by path)
    vdi: str = ""
    vm: str = ""  # the VM that runs on this replica's side: the one ``[vm] on_promote`` is told of
    checkpoint_epoch_ms: int = 0  # Level 3 (am/checkpoint.py): the epoch; 0 for a Level 2 resource
    checkpoint_macs: list[str] = []  # Level 3: the VM's MACs, whose output is held until its checkpoint commits


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path``: a crash leaves the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself is durable only once the directory is
    finally:
        os.close(dir_fd)


def save_meta(path: Path, meta: Meta) -> None:
    write_atomically(path, msgspec.json.encode(meta))


def load_meta(path: Path) -> Meta:
    try:
        return msgspec.json.decode(path.read_bytes(), type=Meta)
    except (msgspec.DecodeError, msgspec.ValidationError, json.JSONDecodeError) as exc:
        raise ValueError(f"metadata {path} is damaged: {exc}") from None
