"""The agent's NBD server: fixed-newstyle handshake and transmission phase with simple replies only.

Written the sans-I/O way: ``ServerConnection`` is a pure state machine (bytes in, events out, reply bytes built by
functions of this module) and ``NBDServer`` is the thin asyncio shell that owns sockets and calls the backend. The
wire format is declared once, in the tables below; am/nbd_client.py imports them rather than restating them.

Threading contract: everything here runs on one event loop; ``drop_clients``/``clients`` are called from that loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import errno as errno_
import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("am.nbd")

# -- the wire format ----------------------------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": the newstyle greeting, and the prefix of every option
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

MAX_PAYLOAD = 32 << 20  # the largest WRITE we accept and READ we answer; the spec's "never a DoS" bound
MAX_OPTION_DATA = 64 << 10  # no option we understand needs more; longer data is a client we do not want
MIN_BLOCK, PREFERRED_BLOCK = 1, 4096
# Per connection; beyond either we stop reading and TCP pushes back on the client. The byte budget is what keeps 64
# maximal writes (2 GiB) out of a dom0 that may have less; one request is always admitted, whatever its size.
MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES = 64, 64 << 20
EXPORT_NAME_PADDING = 124  # zero bytes after NBD_OPT_EXPORT_NAME's reply, unless NO_ZEROES was agreed

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, data length
OPTION_REPLY = struct.Struct(">QIII")  # OPT_REPLY_MAGIC, option, reply type, data length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
NAME_LENGTH = struct.Struct(">I")  # before a name in INFO/GO requests and REP_SERVER replies
U16 = struct.Struct(">H")  # in INFO/GO: the count of information requests, each request, an info reply's type
INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum payload
REQUEST = struct.Struct(">IHHQQI")  # REQUEST_MAGIC, command flags, command, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # SIMPLE_REPLY_MAGIC, error, cookie


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE, NO_ZEROES = 1 << 0, 1 << 1


class ClientFlag(enum.IntFlag):
    FIXED_NEWSTYLE, NO_ZEROES = 1 << 0, 1 << 1


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS, READ_ONLY, SEND_FLUSH, SEND_FUA = 1 << 0, 1 << 1, 1 << 2, 1 << 3
    SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN, SEND_CACHE, SEND_FAST_ZERO = 1 << 5, 1 << 6, 1 << 8, 1 << 10, 1 << 11


class Opt(enum.IntEnum):
    EXPORT_NAME, ABORT, LIST, STARTTLS, INFO, GO = 1, 2, 3, 5, 6, 7
    STRUCTURED_REPLY, LIST_META_CONTEXT, SET_META_CONTEXT, EXTENDED_HEADERS = 8, 9, 10, 11


class Rep(enum.IntEnum):
    ACK, SERVER, INFO = 1, 2, 3
    ERR_UNSUP, ERR_POLICY, ERR_INVALID, ERR_UNKNOWN = (1 << 31) + 1, (1 << 31) + 2, (1 << 31) + 3, (1 << 31) + 6


class Info(enum.IntEnum):
    EXPORT, NAME, DESCRIPTION, BLOCK_SIZE = 0, 1, 2, 3


class Cmd(enum.IntEnum):
    READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)


class CmdFlag(enum.IntFlag):
    FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4


class Err(enum.IntEnum):
    """The only error values a reply may carry (the spec fixes them; they match Linux errnos)."""

    EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108


HANDSHAKE_FLAGS = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
# CAN_MULTI_CONN: every backend is coherent across connections (one process, one file or one mirror per export).
EXPORT_FLAGS = (
    TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES | TransmissionFlag.CAN_MULTI_CONN | TransmissionFlag.SEND_CACHE
)
# FUA is accepted on every command (the spec says so: clients set it on reads); FAST_ZERO is not advertised, so it
# is refused with EINVAL, as the spec asks of a server without SEND_FAST_ZERO.
ALLOWED_FLAGS: dict[int, CmdFlag] = {
    Cmd.READ: CmdFlag.FUA, Cmd.WRITE: CmdFlag.FUA, Cmd.DISC: CmdFlag.FUA, Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA, Cmd.CACHE: CmdFlag.FUA, Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE,
}

# -- the backend interface ----------------------------------------------------------------------------------------


class NBDError(Exception):
    """A backend's refusal of one request: ``errno`` goes into the reply (EIO if it is not an NBD error value)."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(message or os.strerror(errno))
        self.errno = errno


class ExportGone(Exception):
    """Raised by a backend that may no longer serve: the client is disconnected without a reply, so that it
    reconnects (and is refused or redirected) instead of seeing an I/O error on a disk that is still intact."""


class Export(Protocol):
    name: str
    size: int  # bytes

    def available(self) -> str | None: ...  # None = may be served; else the reason text
    async def read(self, offset: int, length: int) -> bytes: ...
    async def write(self, offset: int, data: bytes, fua: bool) -> None: ...
    async def flush(self) -> None: ...
    async def trim(self, offset: int, length: int, fua: bool) -> None: ...
    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None: ...


# -- the sans-I/O core --------------------------------------------------------------------------------------------


class Phase(enum.StrEnum):
    GREETING = "Greeting"  # greeting sent, waiting for the client's flags
    OPTIONS = "Options"
    TRANSMISSION = "Transmission"
    CLOSED = "Closed"


PHASES: dict[Phase, set[Phase]] = {
    Phase.GREETING: {Phase.OPTIONS, Phase.CLOSED},
    Phase.OPTIONS: {Phase.TRANSMISSION, Phase.CLOSED},
    Phase.TRANSMISSION: {Phase.CLOSED},
    Phase.CLOSED: set(),
}


@dataclass(frozen=True, slots=True)
class Option:
    code: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Request:
    flags: int
    cmd: int
    cookie: int
    offset: int
    length: int
    payload: bytes = field(default=b"", repr=False)  # up to 32 MiB: never in a log line


@dataclass(frozen=True, slots=True)
class Violation:
    """The client broke the protocol in a way we do not answer: the connection is to be closed."""

    reason: str


Event = Option | Request | Violation


def option_reply(opt: int, rep: Rep, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPT_REPLY_MAGIC, opt, rep, len(data)) + data


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


class ServerConnection:
    """One client's protocol state: ``receive_data`` bytes, then take ``next_event`` until it returns None.

    An ``Option`` event must be answered with ``answer_option`` before the next event is taken, because the answer
    decides how the bytes after it are parsed (options, or requests once GO succeeded)."""

    def __init__(self, peer: str = "") -> None:
        self.peer = peer
        self.phase = Phase.GREETING
        self.export: Export | None = None
        self._buf = bytearray()
        self._no_zeroes = False
        self._option_pending = False

    def _set_phase(self, new: Phase, why: str) -> None:
        if new not in PHASES[self.phase]:
            raise RuntimeError(f"NBD connection {self.peer}: illegal phase change {self.phase} -> {new}")
        log.debug("NBD %s: %s -> %s (%s)", self.peer, self.phase, new, why)
        self.phase = new

    def greeting(self) -> bytes:
        return GREETING.pack(NBDMAGIC, IHAVEOPT, HANDSHAKE_FLAGS)

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def _violation(self, reason: str) -> Violation:
        self._set_phase(Phase.CLOSED, reason)
        return Violation(reason)

    def next_event(self) -> Event | None:
        if self._option_pending:
            raise RuntimeError("answer_option() was not called for the previous option")
        buf = self._buf
        if self.phase is Phase.GREETING:
            if len(buf) < CLIENT_FLAGS.size:
                return None
            (flags,) = CLIENT_FLAGS.unpack_from(buf)
            del buf[: CLIENT_FLAGS.size]
            if flags & ~int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES):
                return self._violation(f"unknown client flags {flags:#x}")
            self._no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
            self._set_phase(Phase.OPTIONS, f"client flags {flags:#x}")
        if self.phase is Phase.OPTIONS:
            if len(buf) < OPTION.size:
                return None
            magic, code, length = OPTION.unpack_from(buf)
            if magic != IHAVEOPT:
                return self._violation(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_DATA:
                return self._violation(f"option {code} with {length} bytes of data")
            if len(buf) < OPTION.size + length:
                return None
            data = bytes(buf[OPTION.size : OPTION.size + length])
            del buf[: OPTION.size + length]
            self._option_pending = True
            return Option(code, data)
        if self.phase is Phase.TRANSMISSION:
            if len(buf) < REQUEST.size:
                return None
            magic, flags, cmd, cookie, offset, length = REQUEST.unpack_from(buf)
            if magic != REQUEST_MAGIC:
                return self._violation(f"bad request magic {magic:#x}")
            payload = length if cmd == Cmd.WRITE else 0
            if payload > MAX_PAYLOAD:
                return self._violation(f"write of {length} bytes, over the {MAX_PAYLOAD} byte limit")
            if len(buf) < REQUEST.size + payload:
                return None
            data = bytes(buf[REQUEST.size : REQUEST.size + payload]) if payload else b""
            del buf[: REQUEST.size + payload]
            if cmd == Cmd.DISC:
                self._set_phase(Phase.CLOSED, "client sent NBD_CMD_DISC")
            return Request(flags, cmd, cookie, offset, length, data)
        return None

    def answer_option(
        self, option: Option, lookup: Callable[[str], Export | None], names: Callable[[], list[str]]
    ) -> bytes:
        """The bytes answering ``option``; afterwards ``phase`` says whether to close or to start transmission."""
        self._option_pending = False
        code, data = option.code, option.data
        if code == Opt.EXPORT_NAME:
            # This option cannot carry an error: refusing it means hanging up.
            export, refusal = self._resolve(data, lookup)
            if export is None:
                log.info("NBD %s: NBD_OPT_EXPORT_NAME refused, hanging up: %s", self.peer, refusal[1])
                self._set_phase(Phase.CLOSED, "export refused")
                return b""
            self._go(export)
            return EXPORT_NAME_REPLY.pack(export.size, EXPORT_FLAGS) + bytes(
                0 if self._no_zeroes else EXPORT_NAME_PADDING
            )
        if code == Opt.ABORT:
            self._set_phase(Phase.CLOSED, "client sent NBD_OPT_ABORT")
            return option_reply(code, Rep.ACK)
        if code == Opt.LIST:
            if data:
                return option_reply(code, Rep.ERR_INVALID, b"NBD_OPT_LIST takes no data")
            servers = b"".join(
                option_reply(code, Rep.SERVER, NAME_LENGTH.pack(len(raw)) + raw)
                for raw in (name.encode() for name in names())
            )
            return servers + option_reply(code, Rep.ACK)
        if code in (Opt.INFO, Opt.GO):
            return self._info_or_go(code, data, lookup)
        return option_reply(code, Rep.ERR_UNSUP, f"option {code} is not supported".encode())

    def _info_or_go(self, code: int, data: bytes, lookup: Callable[[str], Export | None]) -> bytes:
        malformed = option_reply(code, Rep.ERR_INVALID, b"malformed NBD_OPT_INFO/GO data")
        if len(data) < NAME_LENGTH.size + U16.size:
            return malformed
        end = NAME_LENGTH.size + NAME_LENGTH.unpack_from(data)[0]
        if len(data) < end + U16.size or len(data) != end + U16.size * (1 + U16.unpack_from(data, end)[0]):
            return malformed
        count = (len(data) - end) // U16.size - 1
        asked = {U16.unpack_from(data, end + U16.size * (1 + i))[0] for i in range(count)}
        export, (rep, message) = self._resolve(data[NAME_LENGTH.size : end], lookup)
        if export is None:
            log.info("NBD %s: option %d refused: %s", self.peer, code, message)
            return option_reply(code, rep, message.encode())
        infos = [INFO_EXPORT.pack(Info.EXPORT, export.size, EXPORT_FLAGS)]
        if Info.NAME in asked:
            infos.append(U16.pack(Info.NAME) + export.name.encode())
        infos.append(INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD))
        out = b"".join(option_reply(code, Rep.INFO, info) for info in infos) + option_reply(code, Rep.ACK)
        if code == Opt.GO:
            self._go(export)
        return out

    def _resolve(self, raw: bytes, lookup: Callable[[str], Export | None]) -> tuple[Export | None, tuple[Rep, str]]:
        try:
            name = raw.decode()
        except UnicodeDecodeError:
            return None, (Rep.ERR_INVALID, "the export name is not UTF-8")
        export = lookup(name)
        if export is None:
            return None, (Rep.ERR_UNKNOWN, f"no export named {name!r}")
        reason = export.available()
        if reason is not None:
            # The spec has no "unavailable" reply; POLICY ("known, but the server will not") is the nearest, and
            # unlike UNKNOWN it does not make clients report that the export does not exist.
            return None, (Rep.ERR_POLICY, f"export {name!r} is unavailable: {reason}")
        return export, (Rep.ACK, "")

    def _go(self, export: Export) -> None:
        self.export = export
        self._set_phase(Phase.TRANSMISSION, f"serving export {export.name!r} ({export.size} bytes)")

    def check(self, request: Request) -> int:
        """The error to answer ``request`` with before it reaches the backend, or 0."""
        allowed = ALLOWED_FLAGS.get(request.cmd)
        if allowed is None or request.flags & ~int(allowed):
            return Err.EINVAL
        if request.cmd in (Cmd.DISC, Cmd.FLUSH):
            return 0
        if request.cmd == Cmd.READ and request.length > MAX_PAYLOAD:
            return Err.EINVAL
        assert self.export is not None
        if request.offset + request.length > self.export.size:
            # As the spec, qemu-nbd and nbdkit do: a write past the end is "no space", anything else "invalid".
            return Err.ENOSPC if request.cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Err.EINVAL
        return 0


# -- the asyncio shell --------------------------------------------------------------------------------------------

READ_CHUNK = 1 << 20  # also the StreamReader's limit: a 32 MiB write arrives in a few dozen reads, not 500


class _Client:
    """One connection: takes events from its core, runs each request as a task created in arrival order (so a
    backend's work before its first ``await`` sees requests in that order), and writes replies under a lock."""

    def __init__(self, server: NBDServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        self.core = ServerConnection(f"{peer[0]}:{peer[1]}" if peer else "?")
        self.tasks: set[asyncio.Task[None]] = set()
        self._server, self._reader, self._writer = server, reader, writer
        self._lock = asyncio.Lock()
        self._in_flight = [0, 0]  # requests, payload bytes (written or to be read)
        self._room = asyncio.Event()  # set when a request completes
        self._pump: asyncio.Task[object] | None = None  # set while the read loop runs, so drop() can interrupt it
        self.dropped = False

    @property
    def export_name(self) -> str | None:
        return None if self.dropped or self.core.export is None else self.core.export.name

    def drop(self, why: str) -> None:
        """Hang up now, even if the read loop waits for room. Backend calls under way are not cancelled (a
        write done on one replica only is worse than a late one); their replies go nowhere."""
        if self.dropped:
            return
        self.dropped = True
        log.info("NBD %s: dropping the connection: %s", self.core.peer, why)
        self._writer.transport.abort()
        if self._pump is not None and self._pump is not asyncio.current_task():
            self._pump.cancel()

    async def run(self) -> None:
        self._pump = asyncio.current_task()
        try:
            self._writer.write(self.core.greeting())
            await self._read_loop()
        except asyncio.CancelledError:
            if not self.dropped:
                raise
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.info("NBD %s: connection lost: %s", self.core.peer, exc)
        except Exception:
            log.exception("NBD %s: connection failed", self.core.peer)
        finally:
            self._pump = None
            if self.tasks:  # NBD_CMD_DISC: every request still in flight is answered before we hang up
                await asyncio.wait(self.tasks)
            self._writer.close()

    async def _read_loop(self) -> None:
        core = self.core
        while True:
            event = core.next_event()
            if event is None:
                if core.phase is Phase.CLOSED:
                    return
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    log.debug("NBD %s: the client closed the connection", core.peer)
                    return
                core.receive_data(data)
            elif isinstance(event, Violation):
                log.warning("NBD %s: protocol violation: %s", core.peer, event.reason)
                self.drop("protocol violation")
                return
            elif isinstance(event, Option):
                self._writer.write(core.answer_option(event, self._server.lookup, self._server.names))
                await self._writer.drain()
                if core.phase is Phase.CLOSED:
                    return
            elif event.cmd != Cmd.DISC:
                cost = event.length if event.cmd in (Cmd.READ, Cmd.WRITE) else 0
                while not self._admits(cost):
                    self._room.clear()
                    await self._room.wait()
                self._in_flight[0] += 1
                self._in_flight[1] += cost
                task = asyncio.create_task(self._serve(event, cost))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    def _admits(self, cost: int) -> bool:
        count, size = self._in_flight
        return count == 0 or (count < MAX_IN_FLIGHT and size + cost <= MAX_IN_FLIGHT_BYTES)

    async def _serve(self, request: Request, cost: int) -> None:
        try:
            data, error = b"", self.core.check(request)
            try:
                if not error:
                    data = await self._execute(request)
            except NBDError as exc:
                error = exc.errno if exc.errno in Err._value2member_map_ else Err.EIO
            except ExportGone as exc:
                self.drop(f"export gone: {exc}")
                return
            except Exception:
                log.exception("NBD %s: backend failed on %r", self.core.peer, request)
                error = Err.EIO
            await self._reply(request.cookie, error, data)
        finally:
            self._in_flight[0] -= 1
            self._in_flight[1] -= cost
            self._room.set()

    async def _execute(self, request: Request) -> bytes:
        export, offset, length = self.core.export, request.offset, request.length
        assert export is not None
        fua = bool(request.flags & CmdFlag.FUA)
        if length == 0 and request.cmd != Cmd.FLUSH:
            return b""  # the spec leaves zero-length requests open; not bothering the backend is the safe reading
        match request.cmd:
            case Cmd.READ:
                data = await export.read(offset, length)
                if len(data) != length:  # a short simple reply would desynchronise the stream for good
                    raise RuntimeError(f"backend read returned {len(data)} of {length} bytes")
                return data
            case Cmd.WRITE:
                await export.write(offset, request.payload, fua)
            case Cmd.FLUSH:
                await export.flush()
            case Cmd.TRIM:
                await export.trim(offset, length, fua)
            case Cmd.WRITE_ZEROES:
                await export.write_zeroes(offset, length, fua, not request.flags & CmdFlag.NO_HOLE)
        return b""  # CACHE is only a hint, and we keep no cache

    async def _reply(self, cookie: int, error: int, data: bytes) -> None:
        if self.dropped:
            return
        async with self._lock:
            self._writer.writelines((simple_reply(cookie, error), data))
            with contextlib.suppress(ConnectionError):  # the read loop sees the same loss and hangs up
                await self._writer.drain()


class NBDServer:
    """Serves the exports that ``lookup`` finds (``names`` lists them for NBD_OPT_LIST) on one TCP port."""

    def __init__(self, lookup: Callable[[str], Export | None], names: Callable[[], list[str]]) -> None:
        self.lookup, self.names = lookup, names
        self.port = 0  # the bound port once started (useful when asked for port 0)
        self._server: asyncio.Server | None = None
        self._clients: dict[_Client, asyncio.Task[object]] = {}

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._accept, host, port, limit=READ_CHUNK)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("NBD server listening on %s:%d", host, self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _Client(self, reader, writer)
        task = asyncio.current_task()
        assert task is not None
        self._clients[client] = task
        try:
            await client.run()
        finally:
            del self._clients[client]

    async def close(self, grace: float = 5.0) -> None:
        """Stop listening and drop every client; backend calls still running after ``grace`` seconds are cancelled
        (a backend holding I/O while suspended would otherwise hold the shutdown forever)."""
        if self._server is not None:
            self._server.close()
        for client in list(self._clients):
            client.drop("server closing")
        if self._clients:
            _, late = await asyncio.wait(set(self._clients.values()), timeout=grace)
            for client in list(self._clients):
                for task in client.tasks:
                    task.cancel()
            if late:
                await asyncio.wait(late)
        if self._server is not None:
            await self._server.wait_closed()

    def drop_clients(self, export_name: str) -> int:
        dropped = [c for c in self._clients if c.export_name == export_name]
        for client in dropped:
            client.drop(f"export {export_name!r} dropped its clients")
        return len(dropped)

    def clients(self, export_name: str) -> int:
        return sum(1 for c in self._clients if c.export_name == export_name)


# -- a local file as an export ------------------------------------------------------------------------------------

_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
except (OSError, AttributeError):  # not Linux: every zeroing writes zeros
    _fallocate = None


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """True if the range now reads as zeros without being allocated; False if the filesystem cannot punch."""
    if _fallocate is None:
        return False
    if _fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno_.EOPNOTSUPP, errno_.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def _os_errors() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        nbd = Err.EPERM if exc.errno in (errno_.EPERM, errno_.EACCES, errno_.EROFS) else Err.EIO
        if exc.errno in (errno_.ENOSPC, errno_.EDQUOT, errno_.EFBIG):  # the mapping the spec asks for
            nbd = Err.ENOSPC
        raise NBDError(nbd, str(exc)) from exc


class FileExport:
    """An export over a local raw image, sparse where the filesystem allows: the unmirrored baseline of the
    benchmarks and the tests' backend. Reads, writes and zeroing happen in the call itself, before any ``await``, so
    they reach the file in arrival order; only fdatasync, the one call that waits on the disk, goes to a thread.
    Trim punches a hole or, failing that, writes zeros: either way it reads back as zeros, so two replicas stay
    byte-identical."""

    def __init__(self, name: str, path: str | os.PathLike[str], size: int | None = None) -> None:
        self.name = name
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if size is not None:
            os.ftruncate(self._fd, size)
        self.size = os.fstat(self._fd).st_size

    def available(self) -> str | None:
        return None

    async def read(self, offset: int, length: int) -> bytes:
        with _os_errors():
            data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise NBDError(Err.EIO, f"{self.path} is shorter than its export")
        return data

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        with _os_errors():
            self._pwrite(offset, data)
        if fua:
            await self.flush()

    async def flush(self) -> None:
        with _os_errors():
            await asyncio.to_thread(os.fdatasync, self._fd)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        await self.write_zeroes(offset, length, fua, may_trim=True)

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        with _os_errors():
            if not (may_trim and _punch_hole(self._fd, offset, length)):
                zeros = bytes(min(length, 1 << 20))
                for start in range(offset, offset + length, len(zeros)):
                    self._pwrite(start, zeros[: offset + length - start])
        if fua:
            await self.flush()

    def _pwrite(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def close(self) -> None:
        os.close(self._fd)
