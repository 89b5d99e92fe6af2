"""The agent's NBD server (am/nbd.py) against real clients: qemu-io, qemu-img, nbdinfo, nbdcopy and fio over TCP on
loopback, tests/am/nbd_client.py for what those cannot do (hundreds of requests in flight, raw protocol abuse), and
the sans-I/O core fed one byte at a time. No database: the server runs on its own event loop in a thread, so a test
may block on a subprocess while it serves."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from am.nbd import (
    CLIENT_FLAGS,
    EXPORT_FLAGS,
    EXPORT_NAME_PADDING,
    EXPORT_NAME_REPLY,
    GREETING,
    IHAVEOPT,
    MAX_IN_FLIGHT,
    MAX_IN_FLIGHT_BYTES,
    MAX_OPTION_DATA,
    MAX_PAYLOAD,
    NBDMAGIC,
    OPTION,
    REQUEST,
    REQUEST_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    Err,
    ExportGone,
    FileExport,
    HandshakeFlag,
    NBDServer,
    Opt,
    Option,
    Phase,
    Rep,
    Request,
    ServerConnection,
    Violation,
)
from am.nbd_client import NBDClient, NBDOptionError, NBDReplyError, go_data, handshake, send_option

SIZE = 32 << 20
HOST = "127.0.0.1"
TOOL_TIMEOUT = 60


class Unavailable(FileExport):
    def available(self) -> str | None:
        return "not primary on this host"


class Faulty(FileExport):
    """Reads fail with a bug (not an NBDError): the client must get EIO and the server must live on."""

    async def read(self, offset: int, length: int) -> bytes:
        raise RuntimeError("simulated backend bug")


class Gone(FileExport):
    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        raise ExportGone("demoted")


class Gated(FileExport):
    """Records each write's offset before its first await, then holds it until the gate opens."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.order: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        self.order.append(offset)
        await self.gate.wait()
        await super().write(offset, data, fua)


class ServedExports:
    """An NBDServer on its own event loop in a background thread, serving one export of each kind."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.exports: dict[str, FileExport] = {
            "disk": FileExport("disk", tmp / "disk.raw", SIZE),
            "down": Unavailable("down", tmp / "down.raw", 1 << 20),
            "faulty": Faulty("faulty", tmp / "faulty.raw", 1 << 20),
            "gone": Gone("gone", tmp / "gone.raw", 1 << 20),
            "gated": Gated("gated", tmp / "gated.raw", SIZE),
        }
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="nbd-server", daemon=True)
        self.thread.start()
        # NBD_OPT_LIST shows what may be served now, as the agent's list will
        served = lambda: sorted(n for n, e in self.exports.items() if not e.available())  # noqa: E731
        self.server = NBDServer(self.exports.get, served)
        self.call(self.server.start(HOST, 0))
        self.port = self.server.port

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        """Run ``coro`` on the server's loop (the server's methods are called from there only)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def on_loop(self, fn: Any, *args: Any) -> Any:
        async def run() -> Any:
            return fn(*args)

        return self.call(run())

    def uri(self, name: str = "disk") -> str:
        return f"nbd://{HOST}:{self.port}/{name}"

    def connect(self, name: str = "disk") -> Coroutine[Any, Any, NBDClient]:
        return NBDClient.connect(HOST, self.port, name)

    def image(self, name: str = "disk") -> bytes:
        return Path(self.exports[name].path).read_bytes()

    def stop(self) -> None:
        self.call(self.server.close(grace=5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        for export in self.exports.values():
            export.close()


@pytest.fixture
def nbd(tmp_path: Path) -> Iterator[ServedExports]:
    served = ServedExports(tmp_path)
    yield served
    served.stop()


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
    """Run a client coroutine on a loop of the test's own, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def tool(*args: str | Path, ok: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False, cwd=cwd
    )
    if ok:
        assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def pattern(i: int, length: int) -> bytes:
    return (i.to_bytes(2, "big") + bytes([i % 251])) * (length // 3) + b"\xee" * (length % 3)


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True if the server hangs up (EOF or reset) without sending anything more."""
    try:
        return await asyncio.wait_for(reader.read(1), 10) == b""
    except ConnectionError:
        return True


# -- real clients -------------------------------------------------------------------------------------------------


def test_qemu_io_writes_fua_writes_zeroes_discards_and_reads_back_patterns(nbd):
    tool(
        "qemu-io", "-f", "raw", nbd.uri(),
        "-c", "write -P 0xab 0 1M",
        "-c", "write -f -P 0xcd 1M 64k",  # FUA
        "-c", "write -P 0x11 2M 3M",
        "-c", "write -z 2M 1M",  # NBD_CMD_FLAG_NO_HOLE: must be written as zeros
        "-c", "write -z -u 3M 1M",  # may punch a hole
        "-c", "discard 4M 1M",
        "-c", "flush",
        "-c", "read -P 0xab 0 1M",
        "-c", "read -P 0xcd 1M 64k",
        "-c", "read -P 0 2M 3M",
    )  # fmt: skip
    image = nbd.image()
    assert image[: 1 << 20] == b"\xab" * (1 << 20)
    assert image[1 << 20 : (1 << 20) + (64 << 10)] == b"\xcd" * (64 << 10)
    assert image[2 << 20 : 5 << 20] == bytes(3 << 20)


def test_qemu_img_convert_onto_the_export_copies_every_byte(nbd, tmp_path):
    source = bytearray(os.urandom(SIZE))
    source[4 << 20 : 12 << 20] = bytes(8 << 20)  # a run of zeros qemu-img sends as WRITE_ZEROES
    src = tmp_path / "src.raw"
    src.write_bytes(source)
    Path(nbd.exports["disk"].path).write_bytes(b"\x5a" * SIZE)  # so that skipped zeros would show
    tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, nbd.uri())
    assert nbd.image() == bytes(source)


def test_nbdinfo_reports_size_flags_and_block_sizes(nbd):
    (export,) = json.loads(tool("nbdinfo", "--json", nbd.uri()).stdout)["exports"]
    assert export["export-size"] == SIZE
    assert {k: export[k] for k in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn")} == dict.fromkeys(
        ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"), True
    )
    assert (export["is_read_only"], export["can_fast_zero"], export["can_df"]) == (False, False, False)
    assert (export["block_size_minimum"], export["block_size_preferred"], export["block_size_maximum"]) == (
        1, 4096, 32 << 20,
    )  # fmt: skip


def test_nbdinfo_lists_every_export_that_may_be_served(nbd):
    listing = json.loads(tool("nbdinfo", "--list", "--json", f"nbd://{HOST}:{nbd.port}").stdout)
    assert sorted(e["export-name"] for e in listing["exports"]) == ["disk", "faulty", "gated", "gone"]


def test_nbdcopy_copies_the_export_to_a_file(nbd, tmp_path):
    content = os.urandom(SIZE)
    Path(nbd.exports["disk"].path).write_bytes(content)
    out = tmp_path / "out.raw"
    out.touch()
    tool("nbdcopy", nbd.uri(), out)
    assert out.read_bytes() == content


def fio_has_nbd() -> bool:
    if shutil.which("fio") is None:
        return False
    return "nbd" in subprocess.run(["fio", "--enghelp"], capture_output=True, text=True, timeout=10).stdout.split()


@pytest.mark.skipif(not fio_has_nbd(), reason="this fio is not built with libnbd (no 'nbd' in fio --enghelp)")
def test_fio_random_writes_verify_through_the_nbd_engine(nbd):
    tool(
        "fio", "--name=nbd", "--ioengine=nbd", f"--uri={nbd.uri()}", "--rw=randwrite", "--bs=4k", "--size=16M",
        "--iodepth=32", "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--runtime=30",
        cwd=nbd.tmp,
    )  # fmt: skip


def test_unavailable_export_is_refused_to_qemu_with_its_reason(nbd):
    proc = tool("qemu-io", "-f", "raw", nbd.uri("down"), "-c", "read 0 4k", ok=False)
    assert proc.returncode != 0
    assert "not primary on this host" in proc.stderr


@pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd is not installed")
def test_the_test_client_speaks_to_qemu_nbd_too(tmp_path):
    """A negative control for the shared constants: were one wrong, our client and server could agree on it."""
    image = tmp_path / "q.raw"
    image.write_bytes(bytes(1 << 20))
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    qemu_nbd = subprocess.Popen(["qemu-nbd", "-f", "raw", "-b", HOST, "-p", str(port), "-x", "q", "-t", str(image)])

    async def scenario() -> None:
        for _ in range(500):
            try:
                client = await NBDClient.connect(HOST, port, "q")
                break
            except OSError:
                await asyncio.sleep(0.01)
        async with client:
            assert client.size == 1 << 20
            await client.write(4096, b"qemu" * 1024, fua=True)
            await client.write_zeroes(0, 4096, no_hole=True)
            await client.trim(8192, 4096)
            await client.flush()
            assert await client.read(0, 8192) == bytes(4096) + b"qemu" * 1024
            with pytest.raises(NBDReplyError) as refused:
                await client.read(1 << 20, 512)
            assert refused.value.errno == Err.EINVAL

    try:
        run(scenario(), timeout=30)
    finally:
        qemu_nbd.terminate()
        qemu_nbd.wait(10)


# -- handshake ----------------------------------------------------------------------------------------------------


def test_unknown_export_is_refused_with_err_unknown(nbd):
    with pytest.raises(NBDOptionError) as refused:
        run(nbd.connect("nope"))
    assert (refused.value.reply, refused.value.message) == (Rep.ERR_UNKNOWN, "no export named 'nope'")


def test_unavailable_export_is_refused_with_err_policy_and_its_reason(nbd):
    with pytest.raises(NBDOptionError) as refused:
        run(nbd.connect("down"))
    assert refused.value.reply == Rep.ERR_POLICY
    assert refused.value.message == "export 'down' is unavailable: not primary on this host"


def test_unsupported_options_are_answered_err_unsup_and_negotiation_goes_on(nbd):
    async def scenario() -> None:
        reader, writer = await handshake(HOST, nbd.port)
        for option in (Opt.STRUCTURED_REPLY, Opt.SET_META_CONTEXT, Opt.EXTENDED_HEADERS, Opt.STARTTLS, 99):
            with pytest.raises(NBDOptionError) as refused:
                await send_option(reader, writer, option)
            assert refused.value.reply == Rep.ERR_UNSUP
        with pytest.raises(NBDOptionError) as refused:
            await send_option(reader, writer, Opt.GO, b"\x00\x00")  # too short to hold a name length
        assert refused.value.reply == Rep.ERR_INVALID
        servers = await send_option(reader, writer, Opt.LIST)
        assert [(rep, data[4:]) for rep, data in servers] == [
            (Rep.SERVER, b"disk"), (Rep.SERVER, b"faulty"), (Rep.SERVER, b"gated"), (Rep.SERVER, b"gone")
        ]  # fmt: skip
        infos = await send_option(reader, writer, Opt.INFO, go_data("disk"))  # INFO does not end the handshake
        assert infos and await send_option(reader, writer, Opt.INFO, go_data("disk")) == infos
        assert await send_option(reader, writer, Opt.ABORT) == []
        assert await closed_by_server(reader)
        writer.close()

    run(scenario())


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_option_enters_transmission_with_or_without_the_zero_padding(nbd, no_zeroes):
    async def scenario() -> None:
        reader, writer = await asyncio.open_connection(HOST, nbd.port)
        assert GREETING.unpack(await reader.readexactly(GREETING.size)) == (
            NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES,
        )  # fmt: skip
        writer.write(CLIENT_FLAGS.pack(ClientFlag.FIXED_NEWSTYLE | (ClientFlag.NO_ZEROES if no_zeroes else 0)))
        writer.write(OPTION.pack(IHAVEOPT, Opt.EXPORT_NAME, 4) + b"disk")
        assert EXPORT_NAME_REPLY.unpack(await reader.readexactly(EXPORT_NAME_REPLY.size)) == (SIZE, EXPORT_FLAGS)
        if not no_zeroes:
            assert await reader.readexactly(EXPORT_NAME_PADDING) == bytes(EXPORT_NAME_PADDING)
        writer.write(REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 7, 0, 512))
        assert await reader.readexactly(16 + 512) == bytes.fromhex("67446698" "00000000" "0000000000000007") + bytes(
            512
        )
        writer.close()

    run(scenario())


def test_export_name_option_for_an_unknown_export_hangs_up(nbd):
    async def scenario() -> None:
        reader, writer = await handshake(HOST, nbd.port)
        writer.write(OPTION.pack(IHAVEOPT, Opt.EXPORT_NAME, 4) + b"nope")
        assert await closed_by_server(reader)
        writer.close()

    run(scenario())


# -- bad input ----------------------------------------------------------------------------------------------------


def test_garbage_instead_of_a_request_closes_the_connection_and_the_server_serves_the_next_client(nbd):
    async def scenario() -> None:
        reader, writer = await handshake(HOST, nbd.port)
        await send_option(reader, writer, Opt.GO, go_data("disk"))
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\0")  # 28 bytes: a request's worth of garbage
        assert await closed_by_server(reader)
        writer.close()
        async with await nbd.connect() as client:
            await client.write(0, b"still here")
            assert await client.read(0, 10) == b"still here"

    run(scenario())


def test_garbage_instead_of_an_option_closes_the_connection(nbd):
    async def scenario() -> None:
        reader, writer = await handshake(HOST, nbd.port)
        writer.write(b"\xde\xad\xbe\xef" * 4)
        assert await closed_by_server(reader)
        writer.close()

    run(scenario())


def test_unknown_client_flags_close_the_connection(nbd):
    async def scenario() -> None:
        reader, writer = await asyncio.open_connection(HOST, nbd.port)
        await reader.readexactly(GREETING.size)
        writer.write(CLIENT_FLAGS.pack(1 << 7))
        assert await closed_by_server(reader)
        writer.close()

    run(scenario())


def test_option_data_over_64_kib_closes_the_connection(nbd):
    async def scenario() -> None:
        reader, writer = await handshake(HOST, nbd.port)
        writer.write(OPTION.pack(IHAVEOPT, Opt.GO, MAX_OPTION_DATA + 1))  # the data itself never needs to arrive
        assert await closed_by_server(reader)
        writer.close()

    run(scenario())


def test_oversize_write_closes_the_connection(nbd):
    async def scenario() -> None:
        async with await nbd.connect() as client:
            with pytest.raises(ConnectionError):
                await client.request(Cmd.WRITE, 0, MAX_PAYLOAD + 1)  # header only: the server must not wait for it

    run(scenario())


def test_out_of_range_requests_are_refused_and_the_connection_goes_on(nbd):
    async def scenario() -> None:
        async with await nbd.connect() as client:
            for call, errno in [
                (client.read(SIZE - 4096, 8192), Err.EINVAL),
                (client.read(SIZE + 4096, 1), Err.EINVAL),
                (client.read(0, MAX_PAYLOAD + 1), Err.EINVAL),  # no simple reply can carry it
                (client.trim(SIZE - 1, 2), Err.EINVAL),
                (client.write(SIZE - 2, b"abc"), Err.ENOSPC),  # as the spec and qemu-nbd do for writes
                (client.write(2**64 - 2, b"abc"), Err.ENOSPC),
                (client.write_zeroes(SIZE, 1), Err.ENOSPC),
            ]:
                with pytest.raises(NBDReplyError) as refused:
                    await call
                assert refused.value.errno == errno
            # the refused write's payload was read and discarded: the stream is still in step
            await client.write(SIZE - 3, b"end")
            assert await client.read(SIZE - 3, 3) == b"end"

    run(scenario())
    assert nbd.image()[-4:] == b"\0end"


def test_unknown_commands_and_unadvertised_flags_are_einval(nbd):
    async def scenario() -> None:
        async with await nbd.connect() as client:
            for cmd, flags in [
                (Cmd.BLOCK_STATUS, 0), (42, 0), (Cmd.WRITE_ZEROES, CmdFlag.FAST_ZERO), (Cmd.READ, CmdFlag.DF),
                (Cmd.READ, 1 << 9),
            ]:  # fmt: skip
                with pytest.raises(NBDReplyError) as refused:
                    await client.request(cmd, 0, 4096, flags=flags)
                assert refused.value.errno == Err.EINVAL, (cmd, flags)
            assert await client.request(Cmd.CACHE, 0, 4096) == b""
            assert await client.request(Cmd.READ, 0, 4096, flags=CmdFlag.FUA) == bytes(4096)  # FUA is fine anywhere

    run(scenario())


def test_a_backend_bug_is_eio_and_the_server_keeps_serving(nbd, caplog):
    async def scenario() -> None:
        async with await nbd.connect("faulty") as client:
            with pytest.raises(NBDReplyError) as failed:
                await client.read(0, 4096)
            assert failed.value.errno == Err.EIO
            await client.write(0, b"x" * 4096)  # same connection, still served
        async with await nbd.connect() as client:
            await client.flush()

    run(scenario())
    assert "simulated backend bug" in caplog.text


def test_export_gone_drops_the_connection_without_a_reply(nbd):
    async def scenario() -> None:
        async with await nbd.connect("gone") as client:
            assert await client.read(0, 4) == bytes(4)
            with pytest.raises(ConnectionError):
                await client.write(0, b"data")
            with pytest.raises(ConnectionError):
                await client.read(0, 4)

    run(scenario())


# -- many requests in flight --------------------------------------------------------------------------------------


def test_two_hundred_concurrent_writes_of_unique_patterns_all_land(nbd):
    chunk = 64 << 10

    async def scenario() -> None:
        async with await nbd.connect() as client:
            await asyncio.gather(*(client.write(i * chunk, pattern(i, chunk), fua=i % 7 == 0) for i in range(200)))
            back = await asyncio.gather(*(client.read(i * chunk, chunk) for i in range(200)))
            assert [i for i, data in enumerate(back) if data != pattern(i, chunk)] == []

    run(scenario())
    image = nbd.image()
    assert [i for i in range(200) if image[i * chunk : (i + 1) * chunk] != pattern(i, chunk)] == []


def test_writes_reach_the_backend_in_arrival_order(nbd):
    async def scenario() -> None:
        async with await nbd.connect("gated") as client:
            await asyncio.gather(*(client.write(i * 4096, pattern(i, 4096)) for i in range(200)))

    run(scenario())
    assert nbd.exports["gated"].order == [i * 4096 for i in range(200)]


def test_requests_in_flight_are_capped_per_connection(nbd):
    gated = nbd.exports["gated"]
    nbd.on_loop(gated.gate.clear)

    async def scenario() -> None:
        async with await nbd.connect("gated") as client:
            writes = [asyncio.ensure_future(client.write(i * 4096, pattern(i, 4096))) for i in range(3 * MAX_IN_FLIGHT)]
            while len(gated.order) < MAX_IN_FLIGHT:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # time enough to take more, were it allowed to
            assert len(gated.order) == MAX_IN_FLIGHT
            assert not any(w.done() for w in writes)
            nbd.on_loop(gated.gate.set)
            await asyncio.gather(*writes)
            assert len(gated.order) == 3 * MAX_IN_FLIGHT

    run(scenario())


def test_payload_bytes_in_flight_are_capped_per_connection(nbd):
    gated, chunk = nbd.exports["gated"], 16 << 20
    admitted = MAX_IN_FLIGHT_BYTES // chunk
    nbd.on_loop(gated.gate.clear)

    async def scenario() -> None:
        async with await nbd.connect("gated") as client:
            writes = [asyncio.ensure_future(client.write(0, pattern(i, chunk))) for i in range(admitted + 2)]
            while len(gated.order) < admitted:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            assert len(gated.order) == admitted
            nbd.on_loop(gated.gate.set)
            await asyncio.gather(*writes)

    run(scenario())
    assert len(gated.order) == admitted + 2


def test_drop_clients_closes_only_that_exports_connections(nbd):
    async def scenario() -> None:
        first, second, other = await nbd.connect(), await nbd.connect(), await nbd.connect("faulty")
        assert nbd.on_loop(nbd.server.clients, "disk") == 2
        assert nbd.on_loop(nbd.server.drop_clients, "disk") == 2
        for client in (first, second):
            with pytest.raises(ConnectionError):
                await client.read(0, 4096)
        assert nbd.on_loop(nbd.server.clients, "disk") == 0
        await other.write(0, b"unaffected")
        assert nbd.on_loop(nbd.server.clients, "faulty") == 1
        for client in (first, second, other):
            await client.close()

    run(scenario())


def test_server_close_drops_clients_even_with_requests_held_by_the_backend(nbd):
    gated = nbd.exports["gated"]
    nbd.on_loop(gated.gate.clear)

    async def scenario() -> None:
        async with await nbd.connect("gated") as client:
            held = asyncio.ensure_future(client.write(0, b"held"))
            while not gated.order:
                await asyncio.sleep(0.01)
            await asyncio.get_running_loop().run_in_executor(None, lambda: nbd.call(nbd.server.close(grace=0.2)))
            with pytest.raises(ConnectionError):
                await held

    run(scenario())
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect((HOST, nbd.port))


def go_option(name: str) -> bytes:
    return OPTION.pack(IHAVEOPT, Opt.GO, len(go_data(name))) + go_data(name)


# -- the sans-I/O core --------------------------------------------------------------------------------------------


def test_core_parses_a_session_fed_one_byte_at_a_time(tmp_path):
    export = FileExport("disk", tmp_path / "disk.raw", 1 << 20)
    wire = (
        CLIENT_FLAGS.pack(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
        + go_option("disk")
        + REQUEST.pack(REQUEST_MAGIC, CmdFlag.FUA, Cmd.WRITE, 1, 512, 3) + b"abc"
        + REQUEST.pack(REQUEST_MAGIC, 0, Cmd.READ, 2, 0, 1 << 20)
        + REQUEST.pack(REQUEST_MAGIC, 0, Cmd.DISC, 3, 0, 0)
        + b"ignored after DISC"
    )  # fmt: skip
    core, events = ServerConnection("test"), []
    for byte in wire:
        core.receive_data(bytes([byte]))
        while (event := core.next_event()) is not None:
            events.append(event)
            if isinstance(event, Option):
                core.answer_option(event, {"disk": export}.get, lambda: ["disk"])
    assert events == [
        Option(Opt.GO, go_data("disk")),
        Request(CmdFlag.FUA, Cmd.WRITE, 1, 512, 3, b"abc"),
        Request(0, Cmd.READ, 2, 0, 1 << 20),
        Request(0, Cmd.DISC, 3, 0, 0),
    ]
    assert core.phase is Phase.CLOSED
    assert [core.check(e) for e in events[1:3]] == [0, 0]
    export.close()


def test_core_turns_a_bad_request_magic_into_a_violation(tmp_path):
    export = FileExport("disk", tmp_path / "disk.raw", 1 << 20)
    core = ServerConnection("test")
    core.receive_data(CLIENT_FLAGS.pack(ClientFlag.FIXED_NEWSTYLE) + go_option("disk"))
    core.answer_option(core.next_event(), {"disk": export}.get, lambda: ["disk"])
    assert core.phase is Phase.TRANSMISSION
    core.receive_data(REQUEST.pack(0x12560953, 0, Cmd.READ, 1, 0, 512))  # the historic magic is not accepted
    assert core.next_event() == Violation("bad request magic 0x12560953")
    assert core.phase is Phase.CLOSED
    assert core.next_event() is None
    export.close()


def test_file_export_trim_punches_a_hole_that_reads_as_zeros(tmp_path):
    export = FileExport("disk", tmp_path / "disk.raw", 4 << 20)

    async def scenario() -> None:
        await export.write(0, b"\xff" * (4 << 20), fua=True)
        allocated = os.stat(export.path).st_blocks
        await export.trim(0, 2 << 20, fua=False)
        assert await export.read(0, 4 << 20) == bytes(2 << 20) + b"\xff" * (2 << 20)
        assert os.stat(export.path).st_blocks < allocated  # a hole, where the filesystem can punch one

    run(scenario())
    export.close()
