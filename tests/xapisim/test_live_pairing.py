"""Level 2 NIC failover through network pairing on the live bed: a host's NIC fails and its guests' traffic goes
through the peer host's NIC over an availability link, then comes back when the NIC does; a client's TCP session
to a guest rides it all out. Root only; no console: the /sim/ API, the AMs' HTTP API and ``ip`` on the machines.

One bed for the module. A client in the bed's client namespace holds ONE connection to web-01's guest and PUTs a
numbered record every 20 ms: it is never reset and every answer is the next sequence number. The longest time
without an answer around each change is printed (``-s`` shows it), not asserted: budgets are measured by
benchmarks/bench_level2_nic.py. Conditions are waited on with deadlines.
"""

from __future__ import annotations

import time

import pytest

from tests.support import wait_for
from tests.xapisim.pairing_support import Session, am_of, network, protect_something
from tests.xapisim.test_live import Live, bridge_ports, running_bed
from tests.xapisim.test_live import pytestmark as pytestmark  # root, ip and nft, as the live bed's tests


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    with running_bed(tmp_path_factory.mktemp("pairing")) as live:
        yield live


def bridged(live: Live, host: str) -> set[str]:
    """The ports of ``host``'s xenbr0 that are its NIC or a pairing interface."""
    return set(bridge_ports(live, host)) & {"eth0", "pa", "pb"}


def mode_is(am, mode: str, paired: str | None = None):
    def check():
        net = network(am)
        return net is not None and net["mode"] == mode and (paired is None or net["paired"] == paired) and net
    return check


def test_a_failed_nic_is_replaced_by_the_peers_nic_and_the_clients_session_survives(bed):
    live = bed
    guest = live.guest("web-01")
    host = guest["host"]
    info = live.live()
    peer = next(h for h in info["hosts"] if h["name"] == host)["am"]["peer"]
    am, am_peer = am_of(live, host), am_of(live, peer)
    for each in (am, am_peer):
        net = wait_for(lambda each=each: network(each), timeout=20, message="the AMs' network status")
        assert (net["bridge"], net["nic"], net["pairing"]) == ("xenbr0", "eth0", {"a": "pa", "b": "pb"})
        assert (net["carrier"], net["mode"], net["paired"]) == (True, "alone", None)
    assert bridged(live, host) == {"eth0"} and bridged(live, peer) == {"eth0"}
    protect_something(am)

    session = Session(live, guest["ip"])
    session.start()
    try:
        session.ready.wait(10)
        wait_for(lambda: session.count() >= 20 or session.done.is_set(), timeout=20, message="answers before")
        assert session.errors == []

        # The NIC fails: the host borrows its peer's NIC over link A, the peer lends it.
        failed = time.monotonic()
        live.cmd.control("POST", f"/sim/hosts/{host}/nic", {"up": False})
        wait_for(mode_is(am_peer, "lending", "a"), timeout=10, message="the peer lending its NIC over link A")
        wait_for(mode_is(am, "borrowing", "a"), timeout=10, message="the host borrowing over link A")
        # The host learns that the peer lends from the peer's next message: its status may say so a beat later.
        net = wait_for(lambda: (n := network(am)) and n["peer_lends"] and n, timeout=10,
                       message="the host hearing that the peer lends")
        assert (net["mode"], net["paired"]) == ("borrowing", "a")
        assert net["carrier"] is False and net["peer_carrier"] is True
        assert bridged(live, host) == {"pa"} and bridged(live, peer) == {"eth0", "pa"}
        wait_for(lambda: session.answers_after(failed + 1.0) >= 25 or session.done.is_set(), timeout=20,
                 message="answers through the peer's NIC")
        assert session.errors == [], session.errors
        gap = session.longest_gap(failed - 0.1)
        print(f"\nNIC failure of {host}: longest gap {gap * 1000:.0f} ms")

        # Link A goes down at the host: the pairing moves to link B on both sides.
        cut = time.monotonic()
        live.cmd.control("POST", f"/sim/hosts/{host}/links/a", {"up": False})
        wait_for(mode_is(am_peer, "lending", "b"), timeout=10, message="the peer lending over link B")
        wait_for(mode_is(am, "borrowing", "b"), timeout=10, message="the host borrowing over link B")
        assert bridged(live, host) == {"pb"} and bridged(live, peer) == {"eth0", "pb"}
        moved = time.monotonic()
        wait_for(lambda: session.answers_after(moved) >= 25 or session.done.is_set(), timeout=20,
                 message="answers over link B")
        assert session.errors == [], session.errors
        print(f"link A cut during the pairing: longest gap {session.longest_gap(cut - 0.1) * 1000:.0f} ms")
        live.cmd.control("POST", f"/sim/hosts/{host}/links/a", {"up": True})

        # The NIC comes back: the pairing ports leave both bridges, the NIC rejoins, the MACs are announced.
        repaired = time.monotonic()
        live.cmd.control("POST", f"/sim/hosts/{host}/nic", {"up": True})
        net = wait_for(mode_is(am, "alone"), timeout=10, message="the host's failback")
        assert net["carrier"] is True and net["paired"] is None
        wait_for(mode_is(am_peer, "alone"), timeout=10, message="the peer to stop lending")
        assert bridged(live, host) == {"eth0"} and bridged(live, peer) == {"eth0"}
        back = time.monotonic()
        wait_for(lambda: session.answers_after(back) >= 25 or session.done.is_set(), timeout=20,
                 message="answers through the host's own NIC again")
        assert session.errors == [], session.errors
        print(f"failback of {host}: longest gap {session.longest_gap(repaired - 0.1) * 1000:.0f} ms")
    finally:
        session.stop()
    assert session.errors == [] and not session.is_alive()

    # The change feed told it all.
    code, events = am.call("GET", "/v1/events?after=0")
    modes = [(e["mode"], e["paired"]) for e in events if e["kind"] == "network" and e["mode"] != "alone"]
    assert ("borrowing", "a") in modes and ("borrowing", "b") in modes
    assert [e for e in events if e["kind"] == "network"][-1]["mode"] == "alone"
