"""The live guest's pure parts: its on-disk log and its line protocol (no sockets, no disk; sans-I/O).

**The disk** is a log of records from offset 0, each a multiple of ``SECTOR`` bytes so that a record never shares a
sector with the next (a torn write can only damage the record being written)::

    magic u32 | seq u64 | length u32 | crc32 u32 (of seq, length and payload) | payload | zero padding

Record ``seq`` N is at the end of record N-1; a reader scans from 0 and stops at the first sector that is not a
valid record with the expected sequence number (zeros of a fresh disk, a torn write, or the remains of an older
log). A guest acknowledges a request only after its record was written with FUA, and writes one record at a time,
so every acknowledged record is before the first invalid one: a restarted guest finds them all.

**The protocol** is one line per request, one line per answer (UTF-8, ``\\n``-terminated)::

    PUT <text>  ->  OK <seq>          stored on the disk before this answer
                ->  ERR <reason>      not stored (the disk failed)
    GET <seq>   ->  VAL <seq> <text>  |  NONE <seq>
    COUNT       ->  COUNT <n>         records on the disk
    PING        ->  PONG <guest name>
    ADD <n>     ->  SUM <k> <total>   the k-th ADD; total: the sum of all k amounts (memory only, not on the disk:
                                      a Level 3 guest keeps it through the loss of its host, docs/level3.md)
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

MAGIC = 0x4C47_5331  # "LGS1"
HEADER = struct.Struct(">IQII")
SECTOR = 512
MAX_PAYLOAD = 64 * 1024
MAX_LINE = MAX_PAYLOAD + 64


def _crc(seq: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack(">QI", seq, len(payload))))


def record_size(payload_length: int) -> int:
    """Bytes a record takes on the disk: header and payload rounded up to whole sectors."""
    raw = HEADER.size + payload_length
    return -(-raw // SECTOR) * SECTOR


def encode_record(seq: int, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"a record holds at most {MAX_PAYLOAD} bytes, not {len(payload)}")
    raw = HEADER.pack(MAGIC, seq, len(payload), _crc(seq, payload)) + payload
    return raw + bytes(record_size(len(payload)) - len(raw))


@dataclass(frozen=True)
class Record:
    seq: int
    payload: bytes
    offset: int


class ScanState(enum.StrEnum):
    HEADER = "header"  # wants the first sector of the next record
    BODY = "body"  # wants the rest of a record whose header looked valid
    END = "end"  # found the end of the log


class LogScanner:
    """Finds the records of a log, fed by whatever reads the disk: ``want()`` says which bytes to read next
    (offset, length), ``feed(data)`` takes them. When ``state`` is END, ``records`` holds the log and ``end`` the
    offset where the next record goes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.records: list[Record] = []
        self.end = 0
        self.state = ScanState.HEADER if size >= SECTOR else ScanState.END
        self._length = 0

    def want(self) -> tuple[int, int] | None:
        if self.state is ScanState.HEADER:
            return self.end, SECTOR
        if self.state is ScanState.BODY:
            return self.end, record_size(self._length)
        return None

    def feed(self, data: bytes) -> None:
        if self.state is ScanState.HEADER:
            magic, seq, length, _ = HEADER.unpack_from(data)
            if (
                magic != MAGIC
                or seq != len(self.records) + 1
                or length > MAX_PAYLOAD
                or self.end + record_size(length) > self.size
            ):
                self.state = ScanState.END
                return
            self._length = length
            self.state = ScanState.BODY
            return
        if self.state is ScanState.BODY:
            _, seq, length, crc = HEADER.unpack_from(data)
            payload = bytes(data[HEADER.size : HEADER.size + length])
            if len(payload) != length or _crc(seq, payload) != crc:
                self.state = ScanState.END  # a torn write: never acknowledged
                return
            self.records.append(Record(seq, payload, self.end))
            self.end += record_size(length)
            self.state = ScanState.HEADER if self.end + SECTOR <= self.size else ScanState.END
            return
        raise RuntimeError("the scan is over")


# -- the line protocol ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Put:
    payload: bytes


@dataclass(frozen=True)
class Get:
    seq: int


@dataclass(frozen=True)
class Count:
    pass


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Add:
    amount: int


@dataclass(frozen=True)
class BadRequest:
    reason: str


Request = Put | Get | Count | Ping | Add | BadRequest


def parse_request(line: bytes) -> Request:
    """One request line (without its newline)."""
    verb, _, rest = line.partition(b" ")
    if verb == b"PUT":
        if len(rest) > MAX_PAYLOAD:
            return BadRequest(f"payload over {MAX_PAYLOAD} bytes")
        return Put(rest)
    if verb == b"GET":
        if not rest.isdigit():
            return BadRequest("GET takes a sequence number")
        return Get(int(rest))
    if verb == b"ADD":
        if not rest.isdigit() or len(rest) > 12:
            return BadRequest("ADD takes a whole number of at most 12 digits")
        return Add(int(rest))
    if verb == b"COUNT" and not rest:
        return Count()
    if verb == b"PING" and not rest:
        return Ping()
    return BadRequest(f"unknown request {verb[:16].decode(errors='replace')!r}")
