"""A small asyncio NBD client: fixed newstyle, NBD_OPT_GO, simple replies, many requests in flight. The AM tests
use it, and so does the live test bed's guest (xapisim.live.guest), whose disk it is.

Its wire format is am.nbd's own tables, so it cannot catch a wrong constant there: the real clients of
test_nbd.py (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) do that. This one is for what they cannot do: many requests
in flight at once, raw protocol errors, and looking at error replies one by one.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Iterable

from am.nbd import (
    CLIENT_FLAGS,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    NAME_LENGTH,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    OPTION,
    OPTION_REPLY,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    U16,
    ClientFlag,
    Cmd,
    CmdFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
)


class NBDReplyError(Exception):
    """The server answered a request with a nonzero error."""

    def __init__(self, errno: int) -> None:
        super().__init__(f"NBD error {errno} ({os.strerror(errno)})")
        self.errno = errno


class NBDOptionError(Exception):
    """The server answered an option with an error reply; ``message`` is the text it sent along."""

    def __init__(self, option: int, reply: int, message: str) -> None:
        super().__init__(f"option {option}: reply {reply:#x}: {message}")
        self.option, self.reply, self.message = option, reply, message


async def handshake(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection and agree on fixed newstyle (and NO_ZEROES if offered): the options come next."""
    reader, writer = await asyncio.open_connection(host, port)
    magic, opt_magic, flags = GREETING.unpack(await reader.readexactly(GREETING.size))
    if (magic, opt_magic) != (NBDMAGIC, IHAVEOPT):
        writer.close()
        raise ConnectionError(f"not a newstyle NBD server: {magic:#x} {opt_magic:#x}")
    no_zeroes = ClientFlag.NO_ZEROES if flags & HandshakeFlag.NO_ZEROES else 0
    writer.write(CLIENT_FLAGS.pack(ClientFlag.FIXED_NEWSTYLE | no_zeroes))
    return reader, writer


async def send_option(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, option: int, data: bytes = b""
) -> list[tuple[int, bytes]]:
    """Send one option and collect its replies up to the final ACK; an error reply raises NBDOptionError."""
    writer.write(OPTION.pack(IHAVEOPT, option, len(data)) + data)
    replies = []
    while True:
        magic, echoed, reply, length = OPTION_REPLY.unpack(await reader.readexactly(OPTION_REPLY.size))
        if magic != OPT_REPLY_MAGIC or echoed != option:
            raise ConnectionError(f"bad option reply: magic {magic:#x}, option {echoed}")
        payload = await reader.readexactly(length)
        if reply & (1 << 31):
            raise NBDOptionError(option, reply, payload.decode(errors="replace"))
        if reply == Rep.ACK:
            return replies
        replies.append((reply, payload))


def go_data(name: str, info: Iterable[int] = (Info.BLOCK_SIZE,)) -> bytes:
    raw, asked = name.encode(), list(info)
    return NAME_LENGTH.pack(len(raw)) + raw + U16.pack(len(asked)) + b"".join(U16.pack(i) for i in asked)


class NBDClient:
    """One connection in transmission phase. Requests may be issued concurrently: a reader task hands each reply
    to the future of its cookie, and a lost connection fails every pending future with ConnectionError."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int, flags: int) -> None:
        self.size, self.flags = size, flags
        self.block_sizes: tuple[int, int, int] | None = None  # minimum, preferred, maximum payload
        self._reader, self._writer = reader, writer
        self._cookies = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[bytes], int, int]] = {}  # cookie: future, command, length
        self._lost: ConnectionError | None = None
        self._replies = asyncio.create_task(self._read_replies())

    @classmethod
    async def connect(cls, host: str, port: int, name: str) -> NBDClient:
        reader, writer = await handshake(host, port)
        try:
            replies = await send_option(reader, writer, Opt.GO, go_data(name))
        except BaseException:
            writer.close()
            raise
        infos = {U16.unpack_from(payload)[0]: payload for _, payload in replies}
        _, size, flags = INFO_EXPORT.unpack(infos[Info.EXPORT])
        client = cls(reader, writer, size, flags)
        if Info.BLOCK_SIZE in infos:
            client.block_sizes = INFO_BLOCK_SIZE.unpack(infos[Info.BLOCK_SIZE])[1:]
        return client

    @property
    def lost(self) -> ConnectionError | None:
        """Why the connection is gone, once it is (every later request raises it); None while it works."""
        return self._lost

    async def wait_lost(self) -> ConnectionError | None:
        """Return once the connection is gone (the server hung up or the network failed), or closed."""
        await asyncio.shield(self._replies)
        return self._lost

    async def __aenter__(self) -> NBDClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def request(self, cmd: int, offset: int = 0, length: int = 0, payload: bytes = b"", flags: int = 0) -> bytes:
        """Send any request, even one the server should refuse, and wait for its reply."""
        if self._lost is not None:
            raise self._lost
        cookie = next(self._cookies)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[cookie] = (future, cmd, length)
        self._writer.writelines((REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length), payload))
        with contextlib.suppress(ConnectionError):  # the reader task fails the future with the same loss
            await self._writer.drain()
        return await future

    async def read(self, offset: int, length: int) -> bytes:
        return await self.request(Cmd.READ, offset, length)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self.request(Cmd.WRITE, offset, len(data), data, CmdFlag.FUA if fua else 0)

    async def flush(self) -> None:
        await self.request(Cmd.FLUSH)

    async def trim(self, offset: int, length: int) -> None:
        await self.request(Cmd.TRIM, offset, length)

    async def write_zeroes(self, offset: int, length: int, no_hole: bool = False) -> None:
        await self.request(Cmd.WRITE_ZEROES, offset, length, flags=CmdFlag.NO_HOLE if no_hole else 0)

    async def close(self) -> None:
        """NBD_CMD_DISC: the server answers what is still in flight, then hangs up."""
        if self._lost is None:
            self._writer.write(REQUEST.pack(REQUEST_MAGIC, 0, Cmd.DISC, next(self._cookies), 0, 0))
            with contextlib.suppress(ConnectionError):
                await self._writer.drain()
        await asyncio.wait_for(self._replies, 30)
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    async def _read_replies(self) -> None:
        try:
            while True:
                magic, error, cookie = SIMPLE_REPLY.unpack(await self._reader.readexactly(SIMPLE_REPLY.size))
                if magic != SIMPLE_REPLY_MAGIC or cookie not in self._pending:
                    raise ConnectionError(f"bad reply: magic {magic:#x}, cookie {cookie}")
                future, cmd, length = self._pending.pop(cookie)
                data = await self._reader.readexactly(length) if cmd == Cmd.READ and not error else b""
                if not future.done():
                    future.set_exception(NBDReplyError(error)) if error else future.set_result(data)
        except (asyncio.IncompleteReadError, OSError) as exc:  # ConnectionError is an OSError
            self._lost = exc if isinstance(exc, ConnectionError) else ConnectionError(f"connection lost: {exc}")
            for future, _, _ in self._pending.values():
                if not future.done():
                    future.set_exception(self._lost)
            self._pending.clear()
