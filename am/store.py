"""What a replica keeps on its host: the sparse raw image, the dirty bitmap and the metadata (generations, states).

The bitmap and the metadata are written with fdatasync and atomic renames: a degraded write is acknowledged only
after the bit covering it is on stable storage, so a crash can never forget a region the peer is missing.
"""
from __future__ import annotations

import asyncio
import json
import os
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

    def zero(self, offset: int, length: int) -> None:
        step = 1 << 20
        for at in range(offset, offset + length, step):
            self.write(at, bytes(min(step, offset + length - at)))

    async def sync(self) -> None:
        self._check()
        try:
            await asyncio.to_thread(os.fdatasync, self.fd)
        except OSError as exc:
            raise LocalDiskError(exc.errno, exc.strerror) from None

    def close(self) -> None:
        os.close(self.fd)


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

    def count(self) -> int:
        return sum(bin(b).count("1") for b in self.bits)

    def dirty(self) -> list[int]:
        return [i for i in range(self.regions) if self.is_set(i)]

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
        for i in range(self.regions):
            self._set(i, True)
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
