"""Level 2 NIC failover through network pairing: the client-visible gap when a host's NIC fails and when it returns.

Run (as root: the live test bed builds network namespaces):
    .venv/bin/python benchmarks/bench_level2_nic.py [--runs 5]

Everything is real and runs on this machine: ``python -m xapisim --preset demo --live`` (each host a network
namespace with its bridge, its NIC to the LAN's switch, its AM, and a VXLAN pairing interface per availability
link). One bed for all runs. The AM of web-01's host is given a resource primary there (an AM pairs its host only
while it protects something). A client in the client namespace holds ONE TCP connection to web-01's guest for the
whole benchmark and PUTs a numbered record every 20 ms, each answer checked (the next sequence number).

Each run:
* NIC failure   ``POST /sim/hosts/<host>/nic {"up": false}`` (the NIC's switch-side end goes down: its carrier is
                lost); the clock starts just before that call. The AM sees the carrier go, takes the NIC out of its
                bridge, puts the pairing interface of link A in, and its peer puts its own in beside its NIC and
                announces the guests' MACs out of its NIC.
* failback      ``{"up": true}``: the pairing ports leave both bridges, the NIC rejoins, the MACs are announced.

Figures per change, from the call:
* acted         the AM's change feed says the new mode (borrowing / alone) is in force (the AM's wall clock, the
                same machine's)
* gap           the longest time without an answer, from the call until 1 s after the AM acted: the client-visible
                gap. A request sent in the moment the path changes is lost and TCP retransmits it after its
                retransmission timeout (200 ms at least), so a gap is either a few tens of ms or a little over 0.2 s.

A reset, a closed connection or a wrong answer fails the benchmark, whatever the figures.

p50 is the median of the runs (statistics.median), max the worst run.

Budget (../shared/ARCHITECTURE.md): Level 2 client-visible gap on a NIC failure ≤ 1 s, TCP session kept; the same
budget is applied to the failback.
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import argument_parser, conclude, interrupt_on_termination, live_bed_unavailable, verdict

BUDGET_S = 1.0
VM_NAME = "web-01"
SETTLE_S = 1.0  # the gap is measured until this long after the AM acted


class Failed(Exception):
    """The session broke or the pairing did not happen: the benchmark fails, whatever the figures."""


def acted_at(am, after_seq: int, mode: str, timeout: float = 10.0) -> tuple[float, int]:
    """The AM's wall-clock time of its first ``network`` event in ``mode`` after ``after_seq``, and its seq."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            code, events = am.call("GET", f"/v1/events?after={after_seq}&timeout=1")
            if code == 200:
                for event in events:
                    if event["kind"] == "network" and event["mode"] == mode:
                        return event["time"], event["seq"]
        time.sleep(0.01)
    raise Failed(f"the AM never said {mode!r} within {timeout:g} s")


def last_seq(am) -> int:
    code, events = am.call("GET", "/v1/events?after=0")
    return max((e["seq"] for e in events), default=0) if code == 200 else 0


def change(live, session, am, host: str, up: bool, mode: str) -> dict:
    from tests.support import wait_for

    seq = last_seq(am)
    wall, start = time.time(), time.monotonic()
    live.cmd.control("POST", f"/sim/hosts/{host}/nic", {"up": up})
    acted, _ = acted_at(am, seq, mode)
    acted_s = acted - wall
    wait_for(lambda: time.monotonic() > start + acted_s + SETTLE_S or session.done.is_set(),
             timeout=acted_s + SETTLE_S + 30, message="the settling time")
    if session.errors or session.done.is_set():
        raise Failed(f"the client's session broke: {session.errors}")
    return {"acted": acted_s, "gap": session.longest_gap(start, start + acted_s + SETTLE_S)}


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--runs", type=int, default=5, help="NIC failures and failbacks measured, on one bed")
    args = parser.parse_args()
    why = live_bed_unavailable("bridge")
    if why:
        print(f"bench_level2_nic: skipped: {why}")
        return
    interrupt_on_termination()

    from am.config import Timers
    from tests.support import wait_for
    from tests.xapisim.pairing_support import PERIOD, Session, am_of, network, protect_something
    from tests.xapisim.test_live import Live, start_live

    timers = Timers()
    top = Path(tempfile.mkdtemp(prefix="bench-level2-nic-"))
    cmd = start_live(top)
    results: dict[str, list[dict]] = {"NIC failure": [], "failback": []}
    failure = None
    session = None
    try:
        live = Live(cmd)
        guest = live.guest(VM_NAME)
        host = guest["host"]
        am = am_of(live, host)
        peer = next(h for h in live.live()["hosts"] if h["name"] == host)["am"]["peer"]
        print(f"Level 2 NIC failover: {args.runs} NIC failures and failbacks of {host} ({VM_NAME}'s host; its AM's "
              f"peer {peer}), one live bed (python -m xapisim --preset demo --live)")
        print(f"  AM timers: defaults (heartbeat {timers.heartbeat_ms} ms: the carrier is polled that often, and "
              "watched through netlink); pairing over link A (a VXLAN riding the link)")
        print(f"  client: ONE connection for the whole benchmark, a numbered PUT every {PERIOD * 1000:.0f} ms, each "
              "answer checked")
        print("  times in seconds from the /sim/ call")
        protect_something(am)
        wait_for(lambda: (network(am) or {}).get("mode") == "alone", timeout=20, message="the AM's network status")
        session = Session(live, guest["ip"])
        session.start()
        wait_for(lambda: session.count() >= 20 or session.done.is_set(), timeout=20, message="the client's answers")
        if session.errors:
            raise Failed(f"the client's session broke before the first run: {session.errors}")
        for run in range(1, args.runs + 1):
            down = change(live, session, am, host, False, "borrowing")
            if (network(am) or {}).get("peer_lends") is not True:
                raise Failed("the AM borrows but its peer does not lend")
            up = change(live, session, am, host, True, "alone")
            results["NIC failure"].append(down)
            results["failback"].append(up)
            print(f"  run {run}: NIC failure: acted {down['acted']:.3f}, gap {down['gap']:.3f} | failback: acted "
                  f"{up['acted']:.3f}, gap {up['gap']:.3f} ({session.count()} answers so far)", flush=True)
    except Failed as exc:
        failure = f"{exc} (logs: {top})"
    except KeyboardInterrupt:
        print("\ninterrupted: the bed is stopped (namespaces and processes removed)", file=sys.stderr)
        failure = "interrupted"
    finally:
        if session is not None:
            session.stop()
        cmd.stop()
    ok = failure is None and all(results.values())
    if all(results.values()):
        print(f"\nover {len(results['NIC failure'])} runs, client-visible gap (budget {BUDGET_S:g} s, session kept):")
        for what, runs in results.items():
            gaps = [r["gap"] for r in runs]
            good = max(gaps) <= BUDGET_S
            ok &= good
            print(f"  {what:12s} gap p50 {statistics.median(gaps):6.3f} s  max {max(gaps):6.3f} s   acted p50 "
                  f"{statistics.median(r['acted'] for r in runs):6.3f} s  {verdict(good)}")
    if session is not None and not session.errors and failure is None:
        print(f"  the session: one connection, {session.count()} answers, none wrong, never reset")
    conclude(ok, failure, top)


if __name__ == "__main__":
    main()
