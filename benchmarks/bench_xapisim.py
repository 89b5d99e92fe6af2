"""xapisim at 1,000 hosts / 10,000 VMs: VM.get_all_records on the wire and through XenAPI, and event.from throughput.

Run: .venv/bin/python benchmarks/bench_xapisim.py [--runs 3] [--duration 10] [--procs 2] [--threads 4]
                                                  [--rates 200,1000]

Starts ``python -m xapisim --hosts 1000 --vms 10000 --port 0 --op-delay 0 --seed 1`` and measures:

1. ``VM.get_all_records``: raw HTTP POSTs (http.client, one keep-alive connection)
   over XML-RPC and JSON-RPC, timed until the whole body is received (time to
   the response headers shown too: the simulator builds the whole answer before
   sending it); then end to end with the unmodified ``XenAPI`` client
   (``session.xenapi.VM.get_all_records()``, XML parsed into Python).  First
   call and median of ``--runs`` more.
2. event.from: writer processes (``--procs`` x ``--threads`` keep-alive JSON-RPC
   connections) rename guest VMs (``VM.set_name_label`` with a unique label)
   while one XenAPI client loops ``event.from(["vm"], token, 5.0)``.  First with
   writers as fast as they can, then paced at each of ``--rates`` calls/s in total.
   Reports calls/s made, events/s delivered, and the latency from a rename
   call returning to its event reaching the watcher (p50/p95/max; matched by
   the unique label, so an event coalesced into a later rename of the same VM
   is counted as coalesced, not timed).  Clocks: time.monotonic, which is
   system-wide on Linux, so writer processes and the watcher compare.

CPU: the simulator, the writers and the watcher share this machine's cores;
the figures are what one machine does with all three on it.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import socket
import statistics
import sys
import threading
import time
import xmlrpc.client
from dataclasses import dataclass, field
from typing import Any

import XenAPI
from common import argument_parser, start_xapisim

USER, PASSWORD = "root", "demo"
MB = 1_000_000


# -- raw HTTP --------------------------------------------------------------------


class Wire:
    """One keep-alive HTTP/1.1 connection speaking raw XML-RPC or JSON-RPC."""

    def __init__(self, url: str, timeout: float = 120.0) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        self.conn.connect()
        # Same reason as the simulator's: headers and body leave in two writes.
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def post(self, path: str, body: bytes, content_type: str) -> tuple[bytes, float, float]:
        """The answer's body, seconds until its headers and until its last byte."""
        start = time.perf_counter()
        self.conn.request("POST", path, body, {"Content-Type": content_type})
        resp = self.conn.getresponse()
        headers_at = time.perf_counter()
        data = resp.read()
        done_at = time.perf_counter()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status} from {path}: {data[:200]!r}")
        return data, headers_at - start, done_at - start

    def json_call(self, method: str, *params: Any) -> Any:
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": list(params), "id": 1}).encode()
        data, _, _ = self.post("/jsonrpc", body, "application/json")
        answer = json.loads(data)
        if answer.get("error"):
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def login(self) -> str:
        return self.json_call("session.login_with_password", USER, PASSWORD, "1.0", "bench_xapisim")

    def close(self) -> None:
        self.conn.close()


def first_and_median(fn, runs: int) -> tuple[Any, list[float], float, float]:
    """Calls fn once (cold) then ``runs`` times; fn returns (result, seconds).  Returns the
    last result, every timing, the first one and the median of the others."""
    results = [fn() for _ in range(runs + 1)]
    times = [t for _, t in results]
    return results[-1][0], times, times[0], statistics.median(times[1:])


# -- part 1: VM.get_all_records ------------------------------------------------------


def bench_get_all_records(url: str, runs: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Prints the figures; returns the guest VM refs (for the writers) and summary rows."""
    print(f"\n1. VM.get_all_records (raw: a first call, then the median of {runs} more; XenAPI: median of {runs})")
    wire = Wire(url)
    session = wire.login()
    rows: list[tuple[str, str]] = []

    xml_body = xmlrpc.client.dumps((session,), "VM.get_all_records").encode()
    stats: dict[str, tuple[int, float]] = {}  # wire -> (body bytes, seconds to headers) of the last call

    def xml_raw() -> tuple[Any, float]:
        data, headers, total = wire.post("/", xml_body, "text/xml")
        stats["xml_h"] = (len(data), headers)
        return data, total

    data, times, first, med = first_and_median(xml_raw, runs)
    if b"<name>Status</name><value>Success</value>" not in data[:200]:
        raise RuntimeError(f"XML-RPC VM.get_all_records failed: {data[:300]!r}")
    size, headers = stats["xml_h"]
    print(
        f"   raw XML-RPC  (http.client)     first {first:6.3f} s   median {med:6.3f} s   "
        f"headers after {headers:6.3f} s   body {size / MB:6.1f} MB"
    )
    rows.append(("get_all_records, XML-RPC on the wire", f"{med:.3f} s  ({size / MB:.1f} MB)"))

    json_body = json.dumps({"jsonrpc": "2.0", "method": "VM.get_all_records", "params": [session], "id": 1}).encode()

    def json_raw() -> tuple[Any, float]:
        data, headers, total = wire.post("/jsonrpc", json_body, "application/json")
        stats["json_h"] = (len(data), headers)
        return data, total

    data, times, first, med = first_and_median(json_raw, runs)
    size, headers = stats["json_h"]
    print(
        f"   raw JSON-RPC (http.client)     first {first:6.3f} s   median {med:6.3f} s   "
        f"headers after {headers:6.3f} s   body {size / MB:6.1f} MB"
    )
    rows.append(("get_all_records, JSON-RPC on the wire", f"{med:.3f} s  ({size / MB:.1f} MB)"))

    def json_decoded() -> tuple[Any, float]:
        start = time.perf_counter()
        data, _, _ = wire.post("/jsonrpc", json_body, "application/json")
        records = json.loads(data)["result"]
        return records, time.perf_counter() - start

    records, times, first, med = first_and_median(json_decoded, runs)
    print(f"   JSON-RPC + json.loads          first {first:6.3f} s   median {med:6.3f} s   {len(records)} records")
    rows.append(("get_all_records, JSON-RPC + json.loads", f"{med:.3f} s"))
    wire.close()

    xen = XenAPI.Session(url)
    xen.xenapi.login_with_password(USER, PASSWORD, "1.0", "bench_xapisim")
    try:

        def xenapi_call() -> tuple[Any, float]:
            start = time.perf_counter()
            result = xen.xenapi.VM.get_all_records()
            return result, time.perf_counter() - start

        # No separate cold call: the raw calls above already warmed the simulator, and each
        # of these takes seconds.
        timed = [xenapi_call() for _ in range(runs)]
    finally:
        xen.xenapi.session.logout()
    result, times = timed[-1][0], [t for _, t in timed]
    med = statistics.median(times)
    print(
        f"   XenAPI client, end to end                         median {med:6.3f} s   {len(result)} records"
        f"   (runs: {', '.join(f'{t:.2f}' for t in times)} s)"
    )
    rows.append(("get_all_records, XenAPI end to end", f"{med:.3f} s  ({len(result)} VM records)"))
    guests = [
        ref for ref, r in records.items() if not (r["is_a_template"] or r["is_control_domain"] or r["is_a_snapshot"])
    ]
    if len(records) != len(result):
        print(f"   NOTE: JSON-RPC gave {len(records)} records, XenAPI {len(result)}")
    return guests, rows


# -- part 2: event.from --------------------------------------------------------------


def writer_process(
    url: str,
    proc_id: int,
    slices: list[list[str]],
    rate_per_thread: float,
    duration: float,
    ready: Any,
    go: Any,
    out: Any,
) -> None:
    """Renames VMs from ``len(slices)`` threads (one keep-alive connection each) for
    ``duration`` seconds after ``go``; puts (proc_id, [(label, sent, returned)], errors) on ``out``."""
    wires = [Wire(url) for _ in slices]
    session = wires[0].login()
    results: list[list[tuple[str, float, float]]] = [[] for _ in slices]
    errors: list[str] = []

    def work(tid: int) -> None:
        wire, refs, mine = wires[tid], slices[tid], results[tid]
        go.wait()
        start = time.monotonic()
        end = start + duration
        interval = 1.0 / rate_per_thread if rate_per_thread > 0 else 0.0
        # Threads start their schedules staggered, so a paced stream is even.
        next_at = start + interval * tid / len(slices)
        seq = 0
        while True:
            if interval:
                pause = next_at - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                # Behind schedule: carry on from now rather than bursting to catch up.
                next_at = max(next_at + interval, time.monotonic())
            sent = time.monotonic()
            if sent >= end:
                break
            label = f"bench {proc_id}.{tid}.{seq}"
            try:
                wire.json_call("VM.set_name_label", session, refs[seq % len(refs)], label)
            except Exception as e:  # noqa: BLE001 - reported by the parent, not fatal to the run
                errors.append(f"{type(e).__name__}: {e}")
                if len(errors) > 100:
                    break
            else:
                mine.append((label, sent, time.monotonic()))
            seq += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(slices))]
    for t in threads:
        t.start()
    ready.put(proc_id)
    for t in threads:
        t.join()
    for w in wires:
        w.close()
    out.put((proc_id, [item for r in results for item in r], errors[:5]))


class TimedTransport(xmlrpc.client.Transport):
    """xmlrpc's own transport, noting when each answer's headers came (the simulator sends them once
    the whole answer is built) and when its body was received and parsed, to tell server from client."""

    def __init__(self) -> None:
        super().__init__()
        self.headers_at = self.parsed_at = 0.0

    def parse_response(self, response: Any) -> Any:
        self.headers_at = time.monotonic()
        try:
            return super().parse_response(response)
        finally:
            self.parsed_at = time.monotonic()


@dataclass
class Watch:
    """What the event.from loop saw: arrival time per label, calls and events."""

    url: str
    stop_label: str
    token: str = ""
    arrivals: dict[str, float] = field(default_factory=dict)
    event_times: list[float] = field(default_factory=list)
    calls: int = 0
    empty_calls: int = 0
    # Per event.from call that brought events: (seconds until the answer's headers, seconds to
    # receive and parse it, events).
    timings: list[tuple[float, float, int]] = field(default_factory=list)
    stop_seen_at: float = 0.0
    error: str = ""
    ready: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            transport = TimedTransport()
            xen = XenAPI.Session(self.url, transport=transport)
            xen.xenapi.login_with_password(USER, PASSWORD, "1.0", "bench_xapisim watcher")
            event_from = getattr(xen.xenapi.event, "from")
            # A token for "now" without downloading every VM: subscribe to the pool alone.
            self.token = event_from(["pool"], "", 0.0)["token"]
            self.ready.set()
            while not self.stop_seen_at:
                asked = time.monotonic()
                answer = event_from(["vm"], self.token, 5.0)
                arrived = time.monotonic()
                self.token = answer["token"]
                self.calls += 1
                if answer["events"]:
                    self.timings.append(
                        (
                            transport.headers_at - asked,
                            transport.parsed_at - transport.headers_at,
                            len(answer["events"]),
                        )
                    )
                else:
                    self.empty_calls += 1
                for ev in answer["events"]:
                    label = (ev.get("snapshot") or {}).get("name_label")
                    if label == self.stop_label:
                        self.stop_seen_at = arrived
                        continue
                    self.event_times.append(arrived)
                    if label is not None:
                        self.arrivals.setdefault(label, arrived)
            xen.xenapi.session.logout()
        except Exception as e:  # noqa: BLE001 - the main thread reports it
            self.error = f"{type(e).__name__}: {e}"
            self.ready.set()


def percentile(values: list[float], p: float) -> float:
    """The value at index p% of the way through (not common.pct's nearest rank): the figures stay
    comparable with the runs recorded before."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


def bench_event_from(
    url: str, guests: list[str], name: str, procs: int, threads: int, total_rate: float, duration: float
) -> list[tuple[str, str]]:
    """One phase: writers for ``duration`` s while a XenAPI client loops event.from."""
    pace = f"paced at {total_rate:.0f} calls/s in all" if total_rate else "as fast as they can"
    print(f"\n   {name}: {procs} processes x {threads} threads renaming VMs {pace}, {duration:.0f} s")
    marker_ref = guests[-1]
    pool = guests[:-1]
    writers = procs * threads
    # Disjoint slices: a VM renamed twice before the watcher looks gives one event (xapi coalesces).
    slices = [pool[i::writers] for i in range(writers)]
    stop_label = f"bench stop {name} {time.monotonic()}"
    watch = Watch(url, stop_label)
    watcher = threading.Thread(target=watch.run, daemon=True)
    watcher.start()
    if not watch.ready.wait(30) or watch.error:
        raise RuntimeError(f"watcher did not start: {watch.error}")

    ctx = multiprocessing.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    rate_per_thread = total_rate / writers if total_rate else 0.0
    children = [
        ctx.Process(
            target=writer_process,
            args=(url, p, slices[p * threads : (p + 1) * threads], rate_per_thread, duration, ready, go, out),
            daemon=True,
        )
        for p in range(procs)
    ]
    for c in children:
        c.start()
    try:
        for _ in children:
            ready.get(timeout=60)
        started = time.monotonic()
        go.set()
        outcomes = [out.get(timeout=duration + 60) for _ in children]
        writers_done = time.monotonic()
    finally:
        for c in children:
            c.join(10)
            if c.is_alive():
                c.terminate()
    # Every rename has returned; one more, seen by the watcher, means it has seen all before it.
    wire = Wire(url)
    wire.json_call("VM.set_name_label", wire.login(), marker_ref, stop_label)
    wire.close()
    watcher.join(30)
    if watch.error or not watch.stop_seen_at:
        raise RuntimeError(f"watcher failed: {watch.error or 'did not see the last change within 30 s'}")

    writes = [w for _, items, _ in outcomes for w in items]
    errors = [e for _, _, errs in outcomes for e in errs]
    elapsed = writers_done - started
    end = started + duration
    in_window = sum(1 for t in watch.event_times if started <= t <= end)
    delivering = watch.stop_seen_at - started
    delivered_rate = len(watch.event_times) / delivering
    lat_return = [watch.arrivals[label] - returned for label, _, returned in writes if label in watch.arrivals]
    lat_sent = [watch.arrivals[label] - sent for label, sent, _ in writes if label in watch.arrivals]
    coalesced = len(writes) - len(lat_return)
    calls_rate = len(writes) / duration
    print(
        f"   calls made        {len(writes):7d}   {calls_rate:8.0f} calls/s   "
        f"(writers ran {elapsed:.2f} s, {len(errors)} errors{': ' + errors[0] if errors else ''})"
    )
    print(
        f"   events delivered  {len(watch.event_times):7d}   {delivered_rate:8.0f} events/s from the first change"
        f" until the watcher caught up ({delivering:.2f} s; {in_window} events arrived within the {duration:.0f} s)"
    )
    print(
        f"   caught up         {watch.stop_seen_at - writers_done:7.3f} s after the writers stopped;"
        f" {coalesced} renames coalesced into a later one of the same VM"
    )
    if watch.timings:
        server = sum(t[0] for t in watch.timings)
        client = sum(t[1] for t in watch.timings)
        biggest = max(watch.timings, key=lambda t: t[2])
        per_call = len(watch.event_times) / max(1, watch.calls)
        print(
            f"   event.from calls  {watch.calls:7d}   {per_call:8.1f} events per call"
            f" ({watch.empty_calls} empty); {server:.2f} s waiting for answers, {client:.2f} s receiving and"
            f" parsing them in XenAPI; largest: {biggest[2]} events, {biggest[0]:.2f} s + {biggest[1]:.2f} s"
        )
    if lat_return:
        negative = sum(1 for v in lat_return if v < 0)
        print(
            f"   latency, call returned -> event at watcher: p50 {percentile(lat_return, 50) * 1000:7.1f} ms   "
            f"p95 {percentile(lat_return, 95) * 1000:7.1f} ms   max {max(lat_return) * 1000:7.1f} ms   "
            f"({len(lat_return)} timed; {negative} arrived before the call returned)"
        )
        print(
            f"   latency, call sent     -> event at watcher: p50 {percentile(lat_sent, 50) * 1000:7.1f} ms   "
            f"p95 {percentile(lat_sent, 95) * 1000:7.1f} ms   max {max(lat_sent) * 1000:7.1f} ms"
        )
    lag = watch.stop_seen_at - writers_done
    p50 = f"{percentile(lat_return, 50) * 1000:.1f}" if lat_return else "-"
    p95 = f"{percentile(lat_return, 95) * 1000:.1f}" if lat_return else "-"
    return [
        (f"event.from {name}: calls/s made", f"{calls_rate:.0f}"),
        (f"event.from {name}: events/s delivered", f"{delivered_rate:.0f}  (caught up {lag:.2f} s after the end)"),
        (f"event.from {name}: latency p50 / p95", f"{p50} / {p95} ms"),
    ]


# -- main ----------------------------------------------------------------------------


def main() -> int:
    parser = argument_parser(__doc__, hosts=1000, vms=10000)
    parser.add_argument("--runs", type=int, default=3, help="timed get_all_records calls after the first (median)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of changes per event.from phase")
    parser.add_argument("--procs", type=int, default=2, help="writer processes")
    parser.add_argument("--threads", type=int, default=4, help="keep-alive connections per writer process")
    parser.add_argument(
        "--rates", default="200,1000", help="comma-separated total calls/s of the paced phases ('' for none)"
    )
    args = parser.parse_args()

    began = time.perf_counter()
    print(
        f"bench_xapisim: python -m xapisim --hosts {args.hosts} --vms {args.vms} --port 0 --op-delay 0 --seed 1"
        f"   ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start)"
    )
    sim = start_xapisim("--hosts", str(args.hosts), "--vms", str(args.vms), "--seed", "1", op_delay=0)
    url = sim.url
    print(f"   simulator up in {time.perf_counter() - began:.1f} s at {url}")
    rows: list[tuple[str, str]] = []
    try:
        guests, part = bench_get_all_records(url, args.runs)
        rows += part
        print(f"\n2. event.from(['vm'], token, 5.0) with the XenAPI client, {len(guests)} guest VMs renamed")
        rows += bench_event_from(url, guests, "max", args.procs, args.threads, 0.0, args.duration)
        for rate in (float(r) for r in args.rates.split(",") if r.strip()):
            rows += bench_event_from(url, guests, f"{rate:.0f}/s", args.procs, args.threads, rate, args.duration)
    finally:
        sim.stop()

    width = max(len(label) for label, _ in rows)
    print(f"\nsummary ({args.hosts} hosts, {args.vms} VMs; {time.perf_counter() - began:.0f} s in all)")
    print(f"   {'measure':<{width}}   value")
    for label, value in rows:
        print(f"   {label:<{width}}   {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
