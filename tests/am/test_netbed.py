"""The network-namespace test bed of the Availability Manager's end-to-end tests (tests/am/netbed.py): the
topology, silent cuts, host crashes, entering a namespace from a thread, and a teardown that leaves nothing."""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.am.netbed import NAMESPACES, NetBed, netns_names
from tests.support import ROOT, wait_for

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the network-namespace test bed needs root (ip netns, nft)"),
    pytest.mark.timeout(30),
]

SILENT = 0.3  # a connect that gets no answer within this is "silent"


@pytest.fixture(scope="module")
def netbed():
    with NetBed() as bed:
        print(f"\nnetbed {bed.prefix}: 10.{bed.octet}.0.0/24, created in {bed.setup_seconds * 1000:.0f} ms")
        yield bed


@pytest.fixture
def bed(netbed):
    """The module's bed, healed and emptied of processes after each test."""
    yield netbed
    netbed.heal()
    for ns in NAMESPACES:
        netbed.kill_namespace_processes(ns)


def listen(bed: NetBed, host: str, net: str) -> socket.socket:
    with bed.in_ns(host):
        return socket.create_server((bed.addr(host, net), 0))


def connect(bed: NetBed, src: str, server: socket.socket, timeout: float = 2.0) -> str:
    """Connect from namespace ``src`` to ``server`` (a listener of ``listen``): "connected" once the server has
    accepted, "timeout" when nothing answers, else the error's name."""
    address = server.getsockname()
    with bed.in_ns(src):
        try:
            client = socket.create_connection(address, timeout=timeout)
        except TimeoutError:
            return "timeout"
        except OSError as exc:
            return type(exc).__name__
    with client:
        server.settimeout(timeout)
        conn, peer = server.accept()
        with conn:
            assert peer[0] == client.getsockname()[0]
    return "connected"


def reach(bed: NetBed, src: str, dst: str, net: str, timeout: float = 2.0) -> str:
    with listen(bed, dst, net) as server:
        return connect(bed, src, server, timeout)


# -- the topology ---------------------------------------------------------------------------------------


def test_the_addresses_and_the_names(bed):
    x = bed.octet
    assert bed.addr("hosta", "lan") == f"10.{x}.0.1"
    assert bed.addr("hostb", "lan") == f"10.{x}.0.2"
    assert bed.addr("witness", "lan") == f"10.{x}.0.9"
    assert bed.addr("client", "lan") == f"10.{x}.0.20"
    assert (bed.addr("hosta", "a"), bed.addr("hostb", "a")) == (f"10.{x}.1.1", f"10.{x}.1.2")
    assert (bed.addr("hosta", "b"), bed.addr("hostb", "b")) == (f"10.{x}.2.1", f"10.{x}.2.2")
    with pytest.raises(ValueError):
        bed.addr("witness", "a")
    with pytest.raises(ValueError):
        bed.addr("hosta", "c")
    assert sorted(netns_names(bed.prefix)) == sorted(f"{bed.prefix}-{ns}" for ns in NAMESPACES)

    shown = bed.run("hosta", ["ip", "-4", "-o", "addr", "show"], timeout=5)
    assert shown.returncode == 0, shown.stderr
    for net in ("lan", "a", "b"):
        assert f"{bed.ifname('hosta', net)}    inet {bed.addr('hosta', net)}/24" in shown.stdout
    assert "inet 127.0.0.1/8" in shown.stdout
    for ns in NAMESPACES:
        lo = bed.run(ns, ["ip", "-o", "link", "show", "lo"], timeout=5).stdout
        assert "UP" in lo.split(">")[0], f"lo is down in {ns}: {lo}"
    for name in (bed.netns(ns) for ns in NAMESPACES):
        assert len(name) <= 15
    assert all(len(bed.ifname(h, n)) <= 15 for h in ("hosta", "hostb") for n in ("lan", "a", "b"))
    assert len(f"{bed.prefix}-witness") <= 15


def test_the_hosts_reach_each_other_on_the_lan_and_on_both_links(bed):
    for net in ("lan", "a", "b"):
        assert reach(bed, "hosta", "hostb", net) == "connected", net
        assert reach(bed, "hostb", "hosta", net) == "connected", net


def test_the_witness_and_the_client_are_on_the_lan(bed):
    for host in ("hosta", "hostb", "client"):
        assert reach(bed, host, "witness", "lan") == "connected", host
        assert reach(bed, "witness", host, "lan") == "connected", host
    for host in ("hosta", "hostb"):
        assert reach(bed, "client", host, "lan") == "connected", host


def test_the_links_are_not_on_the_lan(bed):
    # the witness and the client have no route to the availability links
    with listen(bed, "hostb", "a") as server:
        assert connect(bed, "client", server) == "OSError"  # ENETUNREACH
        assert connect(bed, "witness", server) == "OSError"


# -- processes ------------------------------------------------------------------------------------------


def test_spawn_runs_inside_the_namespace_and_logs_there(bed, tmp_path):
    log = tmp_path / "server.log"
    host, port = bed.addr("hostb", "lan"), 7001
    code = (
        "import socket\n"
        f"s = socket.create_server(({host!r}, {port}))\n"
        "print('ready', flush=True)\n"
        "c, _ = s.accept(); c.sendall(b'hello from hostb'); c.close()\n"
    )
    proc = bed.spawn("hostb", [sys.executable, "-c", code], log_path=log)
    wait_for(lambda: "ready" in log.read_text() or proc.poll() is not None, timeout=10, message="the server")
    assert proc.poll() is None, log.read_text()
    assert proc.pid in bed.pids("hostb")
    assert os.getpgid(proc.pid) == proc.pid  # a session of its own: killable as a group
    with bed.in_ns("hosta"), socket.create_connection((host, port), timeout=2) as c:
        assert c.recv(100) == b"hello from hostb"
    assert proc.wait(timeout=5) == 0

    result = bed.run("client", [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr)"],
                     timeout=10)
    assert (result.returncode, result.stdout, result.stderr) == (0, "out\n", "err\n")


def test_kill_namespace_processes_is_a_host_crash(bed, tmp_path):
    log = tmp_path / "b.log"
    # a spawned process and a child of it the bed does not know about
    b = bed.spawn("hostb", ["sh", "-c", "sleep 100 & echo $!; exec sleep 100"], log_path=log)
    a = bed.spawn("hosta", ["sleep", "100"], log_path=tmp_path / "a.log")
    child = int(wait_for(lambda: log.read_text().strip(), timeout=5, message="the child's pid"))
    assert set(bed.pids("hostb")) == {b.pid, child}

    started = time.monotonic()
    killed = bed.kill_namespace_processes("hostb")
    assert time.monotonic() - started < 5
    assert set(killed) == {b.pid, child}
    assert bed.pids("hostb") == []
    assert b.returncode == -9
    assert gone(child)
    assert a.poll() is None and bed.pids("hosta") == [a.pid]  # the other host runs on


def test_the_test_process_is_never_killed(bed):
    with bed.in_ns("client"):
        assert os.getpid() in bed.pids("client")  # the main thread is inside
        assert bed.kill_namespace_processes("client") == []


def gone(pid: int) -> bool:
    """No such process, or only a zombie (it holds nothing: its parent, init, has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


# -- cuts -----------------------------------------------------------------------------------------------


def test_a_cut_link_is_silent_while_the_other_works_and_restore_brings_it_back(bed):
    bed.cut_link("a")
    with listen(bed, "hostb", "a") as server_a, listen(bed, "hosta", "a") as server_a_back:
        started = time.monotonic()
        assert connect(bed, "hosta", server_a, timeout=SILENT) == "timeout"  # silence: no refusal, no error
        assert time.monotonic() - started >= SILENT * 0.9
        assert connect(bed, "hostb", server_a_back, timeout=SILENT) == "timeout"
        assert reach(bed, "hosta", "hostb", "b") == "connected"
        assert reach(bed, "hostb", "hosta", "b") == "connected"
        assert reach(bed, "hosta", "hostb", "lan") == "connected"

        # the cable is pulled but the carriers stay up, and sending reports nothing
        for host in ("hosta", "hostb"):
            link = bed.run(host, ["ip", "-o", "link", "show", bed.ifname(host, "a")], timeout=5).stdout
            assert "LOWER_UP" in link and "NO-CARRIER" not in link, link
        with bed.in_ns("hosta"), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"anyone?", (bed.addr("hostb", "a"), 9))

        bed.cut_link("a")  # twice is the same as once
        bed.restore_link("a")
        assert connect(bed, "hosta", server_a) == "connected"
        assert connect(bed, "hostb", server_a_back) == "connected"
    bed.restore_link("a")  # restoring a whole link is a no-op

    bed.cut_link("b")
    assert reach(bed, "hosta", "hostb", "b", timeout=SILENT) == "timeout"
    assert reach(bed, "hosta", "hostb", "a") == "connected"
    bed.heal()
    assert reach(bed, "hosta", "hostb", "b") == "connected"


def test_an_established_connection_goes_silent_when_its_link_is_cut(bed):
    with listen(bed, "hostb", "a") as server:
        with bed.in_ns("hosta"):
            client = socket.create_connection(server.getsockname(), timeout=2)
        conn, _ = server.accept()
        with client, conn:
            client.sendall(b"1")
            assert conn.recv(1) == b"1"
            bed.cut_link("a")
            client.sendall(b"2")  # no error: it just never arrives
            conn.settimeout(SILENT)
            with pytest.raises(TimeoutError):
                conn.recv(1)
            bed.restore_link("a")
            conn.settimeout(5)
            assert conn.recv(1) == b"2"  # TCP's retransmission gets through once the cable is back


def test_cut_witness_silences_only_that_host_and_the_witness(bed):
    bed.cut_witness("hosta")
    assert reach(bed, "hosta", "witness", "lan", timeout=SILENT) == "timeout"
    assert reach(bed, "witness", "hosta", "lan", timeout=SILENT) == "timeout"
    assert reach(bed, "hostb", "witness", "lan") == "connected"
    assert reach(bed, "hosta", "hostb", "lan") == "connected"
    assert reach(bed, "client", "hosta", "lan") == "connected"
    assert reach(bed, "hosta", "hostb", "a") == "connected"

    bed.cut_witness("hostb")
    assert reach(bed, "hostb", "witness", "lan", timeout=SILENT) == "timeout"
    bed.restore_witness("hosta")
    assert reach(bed, "hosta", "witness", "lan") == "connected"
    assert reach(bed, "witness", "hosta", "lan") == "connected"
    assert reach(bed, "hostb", "witness", "lan", timeout=SILENT) == "timeout"
    bed.restore_witness("hostb")
    assert reach(bed, "hostb", "witness", "lan") == "connected"


# -- entering a namespace from a thread -----------------------------------------------------------------


def test_in_ns_moves_only_the_calling_thread_and_restores_it(bed):
    def netns_of_this_thread():
        return os.readlink("/proc/thread-self/ns/net")

    before = netns_of_this_thread()
    with listen(bed, "hosta", "lan") as server:
        result = {}

        def client_thread():
            async def main():
                reader, writer = await asyncio.wait_for(asyncio.open_connection(*server.getsockname()), 2)
                writer.write(b"ping")
                await writer.drain()
                writer.close()
                await writer.wait_closed()

            with bed.in_ns("client"):
                result["inside"] = netns_of_this_thread()
                asyncio.run(main())
            result["after"] = netns_of_this_thread()

        thread = threading.Thread(target=client_thread)
        thread.start()
        server.settimeout(5)
        conn, peer = server.accept()
        with conn:
            assert peer[0] == bed.addr("client", "lan")
            assert conn.recv(4) == b"ping"
        thread.join(5)
        assert not thread.is_alive()
    assert result["inside"] != before
    assert result["after"] == before
    assert netns_of_this_thread() == before  # the main thread never moved


# -- teardown -------------------------------------------------------------------------------------------


def test_close_leaves_no_namespace_and_no_process(tmp_path):
    bed = NetBed().up()
    try:
        procs = [bed.spawn(ns, ["sleep", "100"], log_path=tmp_path / f"{ns}.log") for ns in NAMESPACES]
        log = tmp_path / "orphan.log"
        procs.append(bed.spawn("witness", ["sh", "-c", "sleep 100 & echo $!; exec sleep 100"], log_path=log))
        orphan = int(wait_for(lambda: log.read_text().strip(), timeout=5, message="the child's pid"))
        with bed.in_ns("hostb"):
            held = socket.create_server((bed.addr("hostb", "lan"), 0))  # the bed closes even so
        assert len(netns_names(bed.prefix)) == len(NAMESPACES)
    finally:
        bed.close()
    held.close()
    print(f"\nnetbed {bed.prefix}: setup {bed.setup_seconds * 1000:.0f} ms, "
          f"teardown {bed.teardown_seconds * 1000:.0f} ms")
    assert netns_names(bed.prefix) == []
    assert all(p.returncode is not None for p in procs)
    assert all(gone(p.pid) for p in procs) and gone(orphan)
    bed.close()  # twice is fine


def test_a_failing_test_still_cleans_up():
    with pytest.raises(RuntimeError, match="the test failed"), NetBed() as bed:
        bed.spawn("hosta", ["sleep", "100"], log_path=os.devnull)
        raise RuntimeError("the test failed")
    assert netns_names(bed.prefix) == []
    assert all(p.poll() is not None for p in bed.procs)


def test_the_prefixes_of_two_beds_differ_and_their_creation_is_fast():
    timings = []
    with NetBed() as one, NetBed() as two:
        assert one.prefix != two.prefix
        assert reach(one, "hosta", "hostb", "a") == "connected"
        assert reach(two, "hosta", "hostb", "a") == "connected"
        timings.append(one.setup_seconds)
        timings.append(two.setup_seconds)
    timings += [one.teardown_seconds, two.teardown_seconds]
    assert max(timings) < 5, timings


def test_a_process_that_forgets_close_leaves_nothing_at_exit():
    code = (
        "from tests.am.netbed import NetBed\n"
        "bed = NetBed().up()\n"
        "bed.spawn('hosta', ['sleep', '100'], log_path='/dev/null')\n"
        "print(bed.prefix, bed.procs[0].pid, flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    prefix, pid = done.stdout.split()
    assert netns_names(prefix) == []
    assert gone(int(pid))
