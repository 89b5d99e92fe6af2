"""Many pools, several watchers: 20 pools totalling 50,000 VMs, shared by 3 ``watch_pools`` processes (issue 13).

Run: .venv/bin/python benchmarks/bench_pools.py [--pools 20] [--vms 50000] [--watchers 3] [--vms-per-host 100]
                                                [--load 200] [--events 40] [--idle-events 20]
     a quick run: .venv/bin/python benchmarks/bench_pools.py --pools 5 --vms 2000
     (DATABASE_URL / REDIS_URL as for the tests; the defaults are the machine's services)

Everything is real and runs on this machine: one ``python -m xapisim`` per pool (the VMs split evenly, a host per
``--vms-per-host`` VMs, seeds 1..N so that each pool has uuids of its own, only the master listening: the watcher
talks to nobody else), each pool registered with ``inventory.services.pool_create`` in a PostgreSQL database of the
benchmark's own (``eac_bench_pools`` on the DATABASE_URL server of eac.test_settings, made afresh and dropped at
the end), ``--watchers`` processes of ``manage.py watch_pools --poll 1`` spawned together on it (they share the
pools: ``inventory/watch_lock.py``), daphne serving console.asgi, Redis as the channel layer (db 13 unless
REDIS_URL says otherwise, and a channel prefix of its own whose keys are deleted at the end), and Debian's
Chromium driven by Playwright (bench_live's flags) with one tab on the VM table of the first pool.

1. Initial sync. The clock starts just before the first watcher is spawned; a pool is synced at the first poll of
   the database (every 0.2 s) that shows it CONNECTED with all its VMs in rows (guests: templates and dom0s left
   out); the figure is the last pool's. Budget: the architecture's initial sync of a pool of 1,000 hosts / 10,000
   VMs in 10 s, scaled linearly by VMs (50 s for 50,000 VMs in all). Figures only: when the pools' locks are evenly
   shared (pg_locks), and per watcher, from its log, the pools it holds then, when its last full sync of them
   finished (same clock) and the full syncs it did (the processes start together, so the first to reconcile may
   take every pool and hand the others' shares over a second later: those count).
2. Event to DOM under load. One tab on ``/vms/?pool=<the first pool>`` (a superuser's, who may see every pool: its
   socket follows the first pool in detail and the others by their throttled summaries, console.consumers). Each
   sample changes one VM of the table's first page through that pool's simulator: a crash through /sim/, then a
   start through the XAPI (``VM.start``), alternately; the clock starts just before the call and
   stops when htmx has swapped in the VM's row with the new power state (bench_live's probe, wall clock of the
   same machine; only a row swapped in after the change counts, not one left showing that state by an update the
   page missed). First ``--idle-events`` samples with nothing else happening, then ``--events`` while every
   other pool takes ``--load`` VM power operations a second in all (a thread per pool with a XAPI session of its
   own: ``VM.hard_shutdown`` then ``VM.start`` of its running VMs in turn, paced). Budget: p95 <= 250 ms under
   load, none missed (an update not seen within 10 s). Also printed: the part up to the watcher's message on the
   channel layer (a listener on the pool's group, as bench_live), the socket messages the tab got, and the
   channel-layer messages the watchers could not deliver meanwhile because the receiving channel was full
   (channels_redis logs each at INFO; the watchers run at LOG_LEVEL=INFO for it).
3. Memory of each watcher process: VmRSS and VmHWM (peak) from /proc/PID/status once every pool has been synced
   by the process holding it, and again after the load. Figure only.
4. Takeover. While the load runs, the watcher holding most pools is SIGKILLed; the clock starts just before the
   kill, and right after it a running VM of each of its pools is crashed through /sim/. A pool is taken over at
   the first poll (every 0.1 s) that shows its lock held by another live watcher (pg_locks, read as watch_lock
   reads it), the pool CONNECTED and that VM Halted in its row: a full sync by the new holder, the dead process
   wrote nothing after the kill (it left its pools CONNECTED, so the state alone proves nothing). Figure only (the
   issue: "within seconds").

CPU: the simulators, the watchers, daphne, Chromium, PostgreSQL, Redis and the load share this machine's cores.
Each phase of part 2 prints the cores each part used and how many threads were runnable (sampled every 0.2 s): once
that exceeds the cores, every hop of a change's way (the simulator, the watcher's reader and writer, PostgreSQL,
Redis, daphne, Chromium) waits for a core. In a deployment the nineteen loaded pools' masters and whoever starts and
stops their VMs are other machines: their simulators and the load's threads run at ``--remote-nice`` (19 unless
told: they take the cores the console leaves; 0 runs everything alike, as one machine with all of them on it).
The shown pool's simulator, Chromium and the console's processes keep the default priority.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import common
from bench_live import BUDGET_P95_MS, CHROMIUM, CHROMIUM_ARGS, PASSWORD, LayerProbe
from bench_live import PROBE as LIVE_PROBE
from common import (
    ROOT,
    argument_parser,
    bench_database,
    cpu_times,
    drop_bench_database,
    free_port,
    pct,
    process_cpu,
    stop_process,
    verdict,
)

BENCH_DB = "eac_bench_pools"
CHANNEL_PREFIX = "eacbenchpools"
# A Redis database of its own (the tests use 1, the demo 0): the cache and the channel layer stay apart from theirs.
REDIS_URL = "redis://127.0.0.1:6379/13"
SYNC_BUDGET_S = 10.0  # per 10,000 VMs: docs/architecture.md, bench_sync's pool of 1,000 hosts / 10,000 VMs
SYNC_BUDGET_VMS = 10_000
USER, SIM_PASSWORD = "root", "demo"
TABLE_PAGE = 50  # the VM table's rows per page (console.table.DEFAULT_PER_PAGE)
DOM_TIMEOUT_S = 10.0

# bench_live's probe, counting only a row swapped in after the change: the row there was is marked first (bench_live
# skips a marked row; it marks none itself). A change whose
# update never reached the page (a message dropped) leaves its row showing the state the next change brings back,
# and that row must not count as the next change's update.
PROBE = LIVE_PROBE + """
window.__eacExpect = function (w) {
  var row = document.getElementById('row-vm-' + w.uuid);
  if (row) row.__eacBefore = true;
  window.__eacWait = w;
  return row ? row.querySelector('td.c-power').textContent.trim() : null;
};
"""

# In the tab: how many socket messages it got, and how many told it to resync or fetch its table again (an
# update then reaches the row by a request instead of the socket).
COUNTS = """
window.__eacCounts = {messages: 0, resync: 0, refresh: 0};
document.addEventListener('htmx:wsBeforeMessage', function (e) {
  var c = window.__eacCounts, m = (e.detail && e.detail.message) || '';
  c.messages++;
  if (m.indexOf('data-action="resync"') >= 0) c.resync++;
  if (m.indexOf('data-action="refresh-table"') >= 0) c.refresh++;
});
"""

# A setup step that never ends stops the benchmark with its message (no figure to print).
wait = functools.partial(common.wait, interval=0.2, error=SystemExit)


# -- the simulated pools --------------------------------------------------------------------------------


@dataclass
class SimPool:
    """One ``python -m xapisim`` serving one pool, and what the benchmark knows of it."""

    name: str
    hosts: int
    vms: int
    seed: int
    log: Path
    proc: subprocess.Popen | None = None
    url: str = ""
    pk: int = 0
    uuid: str = ""

    READY = re.compile(r"xapisim listening on (http://[\d.]+:\d+)")

    def start(self, nice: int = 0) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                ["nice", "-n", str(nice), sys.executable, "-m", "xapisim", "--hosts", str(self.hosts),
                 "--vms", str(self.vms), "--seed", str(self.seed), "--port", "0", "--op-delay", "0",
                 "--listen-hosts", "1", "--log-level", "WARNING"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise SystemExit(f"xapisim of {self.name} exited:\n{self.log.read_text(errors='replace')[-2000:]}")
        found = self.READY.search(self.log.read_text(errors="replace"))
        if found:
            self.url = found.group(1)
        return bool(found)

    def sim(self, method: str, path: str) -> dict:
        """Call the simulator's /sim/ API."""
        request = urllib.request.Request(self.url + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` shares that differ by one at most."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# -- the watchers -----------------------------------------------------------------------------------------


@dataclass
class Watcher:
    """One ``manage.py watch_pools`` process and its log."""

    proc: subprocess.Popen
    log: Path
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def name(self) -> str:
        """Its lock session's application_name (``eac-watcher <host>:<pid>``, inventory.watch_lock)."""
        from inventory.watch_lock import PREFIX, process_ident

        return PREFIX + process_ident(pid=self.pid)

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM in kB, from /proc."""
        found = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
        return found


# "2025-01-02 10:11:12,345 INFO inventory.watcher pool bench-01: full sync from ...: ... in 1.23 s (read ..."
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ (\S+) (.*)$")
POOL_LINE = re.compile(r"pool (\S+): (.*)$")
FULL_SYNC = re.compile(r"full sync from .* in ([\d.]+) s \(read ([\d.]+) s, write ([\d.]+) s\)$")
# channels_redis' group_send, at INFO: a message it did not deliver, the receiver's channel being full (its capacity,
# 100 messages by default, waiting to be read).
OVER_CAPACITY = re.compile(r"^(\d+) of \d+ channels over capacity in group (\S+)$")


@dataclass
class LogSummary:
    """What a watcher's log says of its pools: full syncs done, pools started and let go of."""

    syncs: list[tuple[float, str, float, float, float]] = field(default_factory=list)  # (at, pool, total, read, write)
    last: dict[str, tuple[str, float]] = field(default_factory=dict)  # pool -> ("watching" | "synced" | "let go", at)
    let_go: int = 0
    started: float | None = None  # its Supervisor's start (after Django's)
    dropped: list[tuple[float, int, str]] = field(default_factory=list)  # (at, messages not delivered, group)

    def dropped_between(self, since: float, until: float, group: str | None = None) -> int:
        return sum(n for at, n, g in self.dropped if since <= at <= until and group in (None, g))


def read_log(path: Path) -> LogSummary:
    summary = LogSummary()
    for line in path.read_text(errors="replace").splitlines():
        found = LOG_LINE.match(line)
        if not found:
            continue
        at = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        logger, message = found.group(2), found.group(3)
        if logger == "channels_redis.core" and (over := OVER_CAPACITY.match(message)):
            summary.dropped.append((at, int(over.group(1)), over.group(2)))
            continue
        if logger != "inventory.watcher":
            continue
        if message.startswith("watcher: started as") and summary.started is None:
            summary.started = at
        if not (about := POOL_LINE.match(message)):
            continue
        pool, what = about.groups()
        if what.startswith("watching "):
            summary.last[pool] = ("watching", at)
        elif sync := FULL_SYNC.match(what):
            summary.syncs.append((at, pool, *(float(x) for x in sync.groups())))
            summary.last[pool] = ("synced", at)
        elif what == "let go of it":
            summary.last[pool] = ("let go", at)
            summary.let_go += 1
    return summary


def lock_holders() -> dict[int, str]:
    """{lock key: application_name of its holder's session} of the pools' advisory locks, as watch_lock reads them."""
    from django.db import connection

    from inventory.watch_lock import NAMESPACE

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT l.objid, coalesce(a.application_name, '') FROM pg_locks l LEFT JOIN pg_stat_activity a"
            " ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objsubid = 2"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            [NAMESPACE])  # fmt: skip
        return {int(key): name for key, name in cursor.fetchall()}


def holder_of(holders: dict[int, str], pk: int) -> str | None:
    from inventory.watch_lock import _key

    return holders.get(_key(pk))


def evenly_shared(pools: list[SimPool], watchers: list[Watcher]) -> bool:
    """Every pool held by a live watcher, each of them holding its share (the counts differ by one at most)."""
    live = {w.name for w in watchers if not w.killed}
    holders = lock_holders()
    held = Counter(holder_of(holders, p.pk) for p in pools)
    if set(held) - live:
        return False
    counts = [held.get(name, 0) for name in live]
    return max(counts) - min(counts) <= 1


def check_alive(watchers: list[Watcher]) -> None:
    for w in watchers:
        if not w.killed and w.proc.poll() is not None:
            tail = w.log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"watcher {w.pid} exited ({w.proc.returncode}):\n{tail}")


# -- load on the other pools ------------------------------------------------------------------------------


class PowerLoad:
    """VM power operations on some pools, ``rate`` calls a second in all: a thread per pool, with a XAPI session
    of its own, shuts a running VM down (``VM.hard_shutdown``), starts it again (``VM.start``), and so on through
    its VMs, paced; a thread that falls behind does not burst to catch up."""

    def __init__(self, targets: list[tuple[str, list[str]]], rate: float, nice: int = 0) -> None:
        self.targets = targets  # (simulator URL, refs of running VMs)
        self.rate = rate
        self.nice = nice
        self.stopping = threading.Event()
        self.made = [0] * len(targets)
        self.failed = [0] * len(targets)
        self.errors: list[str] = []
        self.threads: list[threading.Thread] = []
        self.started_at = 0.0

    def start(self) -> None:
        self.started_at = time.monotonic()
        for i, (url, refs) in enumerate(self.targets):
            thread = threading.Thread(target=self._run, args=(i, url, refs), name=f"load-{i}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def calls(self) -> int:
        return sum(self.made) + sum(self.failed)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)

    def _run(self, i: int, url: str, refs: list[str]) -> None:
        from inventory.xapi import XapiError, connect

        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)  # this thread only (Linux)
        try:
            client = connect(url, USER, SIM_PASSWORD, verify_tls=False)
        except XapiError as exc:
            self.errors.append(f"{url}: {exc.describe()}")
            return
        interval = len(self.targets) / self.rate
        next_at = time.monotonic()
        n = 0
        try:
            while not self.stopping.is_set():
                ref = refs[(n // 2) % len(refs)]
                try:
                    if n % 2 == 0:
                        client.call("VM.hard_shutdown", ref)
                    else:
                        client.call("VM.start", ref, False, False)
                    self.made[i] += 1
                except XapiError as exc:
                    self.failed[i] += 1
                    if len(self.errors) < 20:
                        self.errors.append(f"{url}: {exc.describe()}")
                n += 1
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    self.stopping.wait(delay)
                elif delay < -1.0:
                    next_at = time.monotonic()
        finally:
            client.logout()


# -- event to DOM -----------------------------------------------------------------------------------------


@dataclass
class DomSamples:
    latencies: list[float] = field(default_factory=list)  # ms, change made -> row swapped in the tab
    to_layer: list[float] = field(default_factory=list)  # ms, change made -> the watcher's message on the layer
    in_tab: list[float] = field(default_factory=list)  # ms, the last message's arrival in the tab -> row swapped
    missed: int = 0
    missed_sent: int = 0  # of which the watcher's message reached the channel layer (the listener got it)
    stale: int = 0  # changes made while the row still showed the state they bring (an earlier update lost)
    messages: int = 0  # socket messages the tab got meanwhile
    resyncs: int = 0
    refreshes: int = 0
    since: float = 0.0  # wall clock of the first and last change
    until: float = 0.0


class DomProbe:
    """Changes VMs of the watched pool and times their rows in the open tab (bench_live's loop, one tab)."""

    def __init__(self, page, pool: SimPool, targets: list[tuple[str, str]], layer: LayerProbe) -> None:
        from inventory.xapi import connect

        self.page = page
        self.pool = pool
        self.targets = targets  # (uuid, name) of running VMs on the table's page
        self.layer = layer
        self.xapi = connect(pool.url, USER, SIM_PASSWORD, verify_tls=False)
        self.count = 0  # samples made: crash on even ones, start on odd ones, so a VM comes back before the next

    def close(self) -> None:
        self.xapi.logout()

    def run(self, events: int, label: str) -> DomSamples:
        samples = DomSamples(since=time.time())
        before = self.page.evaluate("window.__eacCounts")
        for _ in range(events):
            i = self.count
            self.count += 1
            uuid, name = self.targets[(i // 2) % len(self.targets)]
            crash = i % 2 == 0
            power = "Halted" if crash else "Running"
            key = str(i)
            shown = self.page.evaluate("window.__eacExpect", {"uuid": uuid, "power": power, "key": key})
            samples.stale += shown == power
            self.layer.arrivals.pop(uuid, None)
            t0 = time.time() * 1000
            if crash:
                self.pool.sim("POST", f"/sim/vms/{name}/crash")
            else:
                self.xapi.call("VM.start", self.xapi.call("VM.get_by_uuid", uuid), False, False)
            deadline = time.monotonic() + DOM_TIMEOUT_S
            done = None
            while done is None and time.monotonic() < deadline:
                time.sleep(0.02)
                done = self.page.evaluate(f"window.__eacDone[{json.dumps(key)}]")
            if done is None:
                samples.missed += 1
                samples.missed_sent += bool(self.layer.arrivals.get(uuid))
                kind = "crash" if crash else "start"
                print(f"    {label} {i + 1:3d} {kind} {name}: not seen in {DOM_TIMEOUT_S:.0f} s")
            else:
                samples.latencies.append(done[1] - t0)
                if done[0]:
                    samples.in_tab.append(done[1] - done[0])
            if self.layer.arrivals.get(uuid):
                samples.to_layer.append(self.layer.arrivals[uuid][0] - t0)
            time.sleep(0.3)
        samples.until = time.time()
        after = self.page.evaluate("window.__eacCounts")
        samples.messages = after["messages"] - before["messages"]
        samples.resyncs = after["resync"] - before["resync"]
        samples.refreshes = after["refresh"] - before["refresh"]
        return samples


def dom_report(label: str, s: DomSamples, watchers: list[Watcher], group: str) -> tuple[str, float | None]:
    seconds = s.until - s.since
    dropped = watched = 0
    for w in watchers:
        summary = read_log(w.log)
        dropped += summary.dropped_between(s.since, s.until + DOM_TIMEOUT_S)
        watched += summary.dropped_between(s.since, s.until + DOM_TIMEOUT_S, group)
    missed = f"{s.missed} missed" + (f" ({s.missed_sent} of them sent by the watcher: its message reached the "
                                      f"channel layer)" if s.missed else "")
    p95 = pct(s.latencies, 95) if s.latencies else None
    if p95 is None:
        lines = [f"  {label}: no update seen, {missed}"]
    else:
        lines = [f"  {label}: p50 {pct(s.latencies, 50):.0f} ms, p95 {p95:.0f} ms, max {max(s.latencies):.0f} ms "
                 f"over {len(s.latencies)} updates, {missed}"]
    if s.to_layer:
        lines.append(f"    change -> the watcher's message on the channel layer (a listener of its own): "
                     f"p50 {pct(s.to_layer, 50):.0f} ms, p95 {pct(s.to_layer, 95):.0f} ms")
    if s.in_tab:
        lines.append(f"    of which the message's arrival in the tab -> row swapped: p50 {pct(s.in_tab, 50):.1f} ms, "
                     f"p95 {pct(s.in_tab, 95):.1f} ms")
    if s.stale:
        lines.append(f"    {s.stale} changes were made while their row still showed the state they bring back "
                     f"(the page had missed the change before)")
    lines.append(f"    the tab got {s.messages} socket messages ({s.messages / seconds:.0f}/s), {s.resyncs} resyncs, "
                 f"{s.refreshes} table refreshes")
    lines.append(f"    channel-layer messages the watchers could not deliver (a receiver's channel full): {dropped}, "
                 f"{watched} of them to the shown pool's group")
    return "\n".join(lines), p95


# -- CPU -------------------------------------------------------------------------------------------------------


class CpuMeter:
    """Cores used by named groups of processes, and by the whole machine, from now until ``report()``; and how many
    threads were runnable meanwhile (``procs_running`` of /proc/stat, every 0.2 s): past the number of cores, each
    wake-up of the path of a change (the simulator, the watcher's threads, PostgreSQL, Redis, daphne) waits its turn."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.start = self._read()
        self.runnable: list[int] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _read(self) -> tuple[float, tuple[int, int], dict[str, float]]:
        used = {name: sum(sum(process_cpu(pid)) for pid in pids) for name, pids in self.groups.items()}
        return time.monotonic(), cpu_times(), used

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            for line in Path("/proc/stat").read_text().splitlines():
                if line.startswith("procs_running "):
                    self.runnable.append(int(line.split()[1]) - 1)  # less the sampler itself
                    break

    def report(self) -> str:
        self._stop.set()
        self._sampler.join()
        (t0, (busy0, total0), used0), (t1, (busy1, total1), used1) = self.start, self._read()
        seconds = t1 - t0
        parts = ", ".join(f"{name} {(used1[name] - used0[name]) / seconds:.2f}" for name in self.groups)
        machine = (busy1 - busy0) / max(total1 - total0, 1) * os.cpu_count()
        runnable = (f"; runnable threads p50 {statistics.median(self.runnable):.0f}, "
                    f"p95 {pct(self.runnable, 95):.0f}") if self.runnable else ""
        return (f"    CPU meanwhile, in cores: {parts}; the whole machine {machine:.1f} of {os.cpu_count()} "
                f"(the rest: PostgreSQL, Redis, Chromium){runnable}")


# -- setup and teardown ---------------------------------------------------------------------------------


def redis_forget(prefix: str) -> None:
    """Delete the channel layer's keys of the benchmark (its groups outlive it by a day otherwise)."""
    import redis
    from django.conf import settings

    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start:start + 1000])
    finally:
        client.close()


def main() -> int:
    parser = argument_parser(__doc__, vms=50_000)
    parser.add_argument("--pools", type=int, default=20, help="simulated pools, a xapisim process each")
    parser.add_argument("--watchers", type=int, default=3, help="manage.py watch_pools processes")
    parser.add_argument("--vms-per-host", type=int, default=100, help="a pool's hosts: its VMs / this")
    parser.add_argument("--load", type=float, default=200.0, help="VM power operations a second on the other pools")
    parser.add_argument("--events", type=int, default=40, help="changes timed to the DOM under load")
    parser.add_argument("--idle-events", type=int, default=20, help="changes timed to the DOM before the load")
    parser.add_argument("--remote-nice", type=int, default=19, choices=range(20), metavar="0..19",
                        help="niceness of the loaded pools' simulators and of the load (other machines when "
                             "deployed)")
    args = parser.parse_args()
    if args.pools < 1 or args.watchers < 1 or args.vms < args.pools:
        parser.error("give at least one pool, one watcher and a VM per pool")
    # SIGTERM (a timeout, kill) ends it as Ctrl-C does: through the ``finally`` that stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    os.environ.setdefault("REDIS_URL", REDIS_URL)
    base = bench_database(BENCH_DB, fresh=True, channel_prefix=CHANNEL_PREFIX)
    redis_forget(CHANNEL_PREFIX)
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.db.models import Count

    from eac.realtime import pool_group
    from inventory.choices import ConnectionState
    from inventory.models import VM, Pool
    from inventory.services import pool_create

    env = dict(os.environ, PYTHONUNBUFFERED="1", CONN_MAX_AGE="60")
    logs = Path(tempfile.mkdtemp(prefix="bench-pools-"))
    static = tempfile.mkdtemp(prefix="bench-static-")
    pools = [SimPool(f"bench-{i + 1:02d}", max(1, vms // args.vms_per_host), vms, seed=i + 1,
                     log=logs / f"xapisim-{i + 1:02d}.log") for i, vms in enumerate(split(args.vms, args.pools))]
    watchers: list[Watcher] = []
    others: list[subprocess.Popen] = []
    load: PowerLoad | None = None
    ok = True
    print(f"bench_pools: {args.pools} pools, {args.vms:,} VMs ({pools[0].vms:,} and {pools[0].hosts} hosts in the "
          f"first), {args.watchers} watcher processes, database {BENCH_DB!r}, logs in {logs}")
    # What else the machine runs shows here: every figure below shares its cores.
    print(f"  machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (1 min) at the start")
    print(f"  the other pools' simulators and the load on them at nice {args.remote_nice}"
          + (" (other machines in a deployment: they take the cores the console leaves)" if args.remote_nice
             else " (as the console: one machine with all of them on it)"))
    try:
        # -- the pools --
        t = time.monotonic()
        for p in pools:
            p.start(0 if p is pools[0] else args.remote_nice)
        wait(lambda: all(p.ready() for p in pools), 300, "the simulators")
        print(f"  {args.pools} simulators up in {time.monotonic() - t:.1f} s")
        t = time.monotonic()
        for p in pools:
            pool = pool_create(name=p.name, url=p.url, username=USER, password=SIM_PASSWORD, verify_tls=False)
            p.pk, p.uuid = pool.pk, pool.uuid
        print(f"  {args.pools} pools registered (pool_create, each probed) in {time.monotonic() - t:.1f} s")

        # -- 1. initial sync --
        expected = {p.pk: p.vms for p in pools}
        t_wall, t_start = time.time(), time.monotonic()
        for i in range(args.watchers):
            path = logs / f"watcher-{i + 1}.log"
            with path.open("wb") as out:
                proc = subprocess.Popen([sys.executable, "manage.py", "watch_pools", "--poll", "1"], cwd=ROOT,
                                        env={**env, "LOG_LEVEL": "INFO"}, stdout=out,
                                        stderr=subprocess.STDOUT)  # fmt: skip
            watchers.append(Watcher(proc, path))
        synced: dict[int, float] = {}
        deadline = t_start + max(300.0, args.vms / 50)
        while len(synced) < len(pools):
            check_alive(watchers)
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(synced)} of {len(pools)} pools synced after {deadline - t_start:.0f} s")
            connected = [pk for pk, state in Pool.objects.values_list("pk", "connection_state")
                         if state == ConnectionState.CONNECTED and pk not in synced]  # fmt: skip
            if connected:
                counts = dict(VM.objects.ordinary().filter(pool_id__in=connected).order_by().values("pool_id")
                              .annotate(n=Count("pk")).values_list("pool_id", "n"))  # fmt: skip
                now = time.monotonic() - t_start
                synced.update({pk: now for pk in connected if counts.get(pk, 0) >= expected[pk]})
            time.sleep(0.2)
        total_sync = max(synced.values())
        wait(lambda: check_alive(watchers) or evenly_shared(pools, watchers), 300, "the pools' locks evenly shared")
        settled = time.monotonic() - t_start
        by_name = {w.name: w for w in watchers}

        def synced_by_holders() -> bool:
            holders = lock_holders()
            summaries = {w.name: read_log(w.log) for w in watchers}
            return all((summary := summaries.get(holder_of(holders, p.pk))) is not None
                       and summary.last.get(p.name, ("",))[0] == "synced" for p in pools)

        wait(synced_by_holders, 300, "every pool synced by the process holding it")
        holders = lock_holders()
        budget = SYNC_BUDGET_S * args.vms / SYNC_BUDGET_VMS
        print(f"\n1. initial sync, from the watchers' spawn (budget: {SYNC_BUDGET_S:.0f} s per "
              f"{SYNC_BUDGET_VMS:,} VMs, the architecture's pool of 1,000 hosts / 10,000 VMs, scaled by VMs)")
        print(f"  every pool CONNECTED with all its VMs in rows: {total_sync:.1f} s for {args.vms:,} VMs in "
              f"{args.pools} pools (budget {budget:.0f} s) {verdict(total_sync <= budget)}")
        ok &= total_sync <= budget
        starts = [s - t_wall for w in watchers if (s := read_log(w.log).started) is not None]
        print(f"  of which the processes' start-up (Python and Django, spawn to the Supervisor's start): "
              f"{min(starts):.1f} to {max(starts):.1f} s")
        print(f"  first pool synced at {min(synced.values()):.1f} s, median pool at "
              f"{statistics.median(synced.values()):.1f} s; locks evenly shared at {settled:.1f} s")
        handed = 0
        memory_synced = {}
        for w in watchers:
            summary = read_log(w.log)
            handed += summary.let_go
            mine = [p for p in pools if holder_of(holders, p.pk) == w.name]
            last = max((summary.last[p.name][1] for p in mine), default=t_wall) - t_wall
            reads, writes = sum(s[3] for s in summary.syncs), sum(s[4] for s in summary.syncs)
            memory_synced[w.pid] = w.memory()
            print(f"  watcher {w.pid}: {plural(len(mine), 'pool')}, {sum(p.vms for p in mine):,} VMs, its last full "
                  f"sync of them done at {last:.1f} s; {plural(len(summary.syncs), 'full sync')} in all (XAPI reads "
                  f"{reads:.1f} s, writes {writes:.1f} s, summed over its threads), "
                  f"{plural(summary.let_go, 'pool')} handed over")
        if handed:
            print(f"  {plural(handed, 'pool')} handed over between the watchers while they started (the first to "
                  f"reconcile took more than its share)")

        # -- 2. event to DOM, one pool shown, the others under load --
        watched = pools[0]
        subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"], cwd=ROOT,
                       env={**env, "STATIC_ROOT": static}, check=True)  # fmt: skip
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with (logs / "daphne.log").open("wb") as out:
            others.append(subprocess.Popen(
                [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "console.asgi:application"],
                cwd=ROOT, env={**env, "STATIC_ROOT": static}, stdout=out, stderr=subprocess.STDOUT))  # fmt: skip

        def answers() -> bool:
            try:
                with urllib.request.urlopen(url + "/login/", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait(answers, 60, "daphne")
        get_user_model().objects.create_superuser("bench", password=PASSWORD)
        rows = VM.objects.ordinary().filter(pool_id=watched.pk).order_by("name_label", "uuid")
        shown = list(rows.values_list("uuid", "name_label", "power_state")[:TABLE_PAGE])
        targets = [(u, n) for u, n, state in shown if state == "Running"]
        # A running VM per pool kept out of the load and of the samples: crashed after the kill (4.).
        markers = {}
        load_targets = []
        for p in pools:
            running = list(VM.objects.ordinary().filter(pool_id=p.pk, power_state="Running")
                           .order_by("name_label").values_list("uuid", "name_label", "ref"))  # fmt: skip
            markers[p.pk] = running[-1]
            if p is not watched and len(running) > 1:
                load_targets.append((p.url, [ref for _, _, ref in running[:-1]]))
        if not targets:
            raise SystemExit(f"no running VM on the first page of {watched.name}'s table")

        from playwright.sync_api import sync_playwright

        print(f"\n2. XAPI event -> updated DOM in one tab on {watched.name}'s VM table ({len(shown)} rows, "
              f"{len(targets)} running VMs cycled), {len(pools) - 1} other pools under load "
              f"(budget p95 <= {BUDGET_P95_MS:.0f} ms under load, none missed)")
        layer = LayerProbe(pool_group(watched.uuid))
        layer.start()
        layer.ready.wait(10)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                context = browser.new_context(viewport={"width": 1280, "height": 800})
                context.add_init_script(PROBE)
                context.add_init_script(COUNTS)
                page = context.new_page()
                page.goto(url + "/login/")
                page.fill("#id_username", "bench")
                page.fill("#id_password", PASSWORD)
                page.click("button[type=submit]")
                page.wait_for_selector("#live-status[data-state=live]")
                page.goto(f"{url}/vms/?pool={watched.pk}")
                page.wait_for_selector("#live-status[data-state=live]")
                time.sleep(1.0)
                probe = DomProbe(page, watched, targets, layer)
                groups = {"daphne": [others[0].pid], **{f"watcher {w.pid}": [w.pid] for w in watchers},
                          "simulators": [p.proc.pid for p in pools], "this process (load, probe)": [os.getpid()]}
                try:
                    meter = CpuMeter(groups)
                    idle = probe.run(args.idle_events + args.idle_events % 2, "idle")
                    print(dom_report("idle (no load)", idle, watchers, pool_group(watched.uuid))[0])
                    print(meter.report())
                    if load_targets and args.load > 0:
                        load = PowerLoad(load_targets, args.load, args.remote_nice)
                        load.start()
                        time.sleep(3.0)  # the load established before the samples
                    calls = load.calls() if load else 0
                    meter = CpuMeter(groups)
                    busy = probe.run(args.events + args.events % 2, "load")
                    cpu = meter.report()
                    rate = ((load.calls() - calls) / (busy.until - busy.since)) if load else 0.0
                    busy_text, p95 = dom_report(f"under load ({rate:.0f} power operations/s achieved on "
                                                f"{len(load_targets)} pools)", busy, watchers, pool_group(watched.uuid))
                    print(busy_text)
                    print(cpu)
                    within = p95 is not None and p95 <= BUDGET_P95_MS and not busy.missed
                    print(f"  budget p95 <= {BUDGET_P95_MS:.0f} ms under load, none missed: {verdict(within)}")
                    ok &= within
                    if load and load.errors:
                        print(f"  load: {sum(load.failed)} calls failed, e.g. {load.errors[0]}")
                finally:
                    probe.close()
            finally:
                browser.close()

        # -- 3. memory --
        print("\n3. memory per watcher process, from /proc (figure only)")
        for w in watchers:
            after, loaded = memory_synced[w.pid], w.memory()
            print(f"  watcher {w.pid}: after the initial sync VmRSS {after['VmRSS'] / 1024:.0f} MiB (peak VmHWM "
                  f"{after['VmHWM'] / 1024:.0f} MiB); after the load VmRSS {loaded['VmRSS'] / 1024:.0f} MiB "
                  f"(peak VmHWM {loaded['VmHWM'] / 1024:.0f} MiB)")

        # -- 4. takeover --
        print("\n4. takeover after a watcher is SIGKILLed, under load (figure only; the issue: \"within seconds\")")
        if len(watchers) < 2:
            print("  not measured: one watcher, nobody to take over")
        else:
            holders = lock_holders()
            held = Counter(holder_of(holders, p.pk) for p in pools)
            victim = max(watchers, key=lambda w: (held.get(w.name, 0), -w.pid))
            theirs = [p for p in pools if holder_of(holders, p.pk) == victim.name]
            print(f"  killing watcher {victim.pid}, which holds {plural(len(theirs), 'pool')} "
                  f"({sum(p.vms for p in theirs):,} VMs)")
            t_kill = time.monotonic()
            victim.killed = True
            os.kill(victim.pid, signal.SIGKILL)
            for p in theirs:
                p.sim("POST", f"/sim/vms/{markers[p.pk][1]}/crash")
            victim.proc.wait()
            new_holder: dict[int, float] = {}
            mirrored: dict[int, float] = {}
            session_gone = None
            deadline = t_kill + 120
            marker_uuids = {p.pk: markers[p.pk][0] for p in theirs}
            while len(mirrored) < len(theirs) and time.monotonic() < deadline:
                check_alive(watchers)
                now = time.monotonic() - t_kill
                holders = lock_holders()
                if session_gone is None:
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                                       [victim.name])
                        if not cursor.fetchone()[0]:
                            session_gone = now
                states = dict(Pool.objects.filter(pk__in=marker_uuids).values_list("pk", "connection_state"))
                halted = set(VM.objects.filter(pool_id__in=marker_uuids, power_state="Halted",
                                               uuid__in=marker_uuids.values()).values_list("pool_id", flat=True))
                for p in theirs:
                    holder = holder_of(holders, p.pk)
                    taken = holder in by_name and holder != victim.name
                    if taken and p.pk not in new_holder:
                        new_holder[p.pk] = now
                    if taken and states.get(p.pk) == ConnectionState.CONNECTED and p.pk in halted \
                            and p.pk not in mirrored:
                        mirrored[p.pk] = now
                time.sleep(0.1)
            if session_gone is not None:
                print(f"  its database session gone (so its locks) after {session_gone:.2f} s")
            if len(new_holder) == len(theirs):
                print(f"  a new lock holder: first pool after {min(new_holder.values()):.2f} s, every pool after "
                      f"{max(new_holder.values()):.2f} s")
            else:
                print(f"  a new lock holder for only {len(new_holder)} of {len(theirs)} pools after 120 s")
            if len(mirrored) == len(theirs):
                print(f"  taken over (new holder, CONNECTED, the change made after the kill mirrored): median pool "
                      f"{statistics.median(mirrored.values()):.2f} s, every pool {max(mirrored.values()):.2f} s")
            else:
                print(f"  only {len(mirrored)} of {len(theirs)} pools taken over and mirrored after 120 s")
                ok = False
            holders = lock_holders()
            held = Counter(holder_of(holders, p.pk) for p in pools)
            print("  shares now: " + ", ".join(f"watcher {w.pid} {held.get(w.name, 0)} pools"
                                               for w in watchers if not w.killed))
        if load is not None:
            load.stop()
            elapsed = time.monotonic() - load.started_at
            print(f"\n  load in all: {load.calls():,} power operations in {elapsed:.0f} s "
                  f"({load.calls() / elapsed:.0f}/s, {sum(load.failed)} failed)")
            load = None
    finally:
        if load is not None:
            load.stop()
        for proc in reversed(others):
            stop_process(proc)
        for w in watchers:
            stop_process(w.proc)
        for p in pools:
            p.stop()
        with contextlib.suppress(Exception):
            redis_forget(CHANNEL_PREFIX)
        drop_bench_database(base, BENCH_DB)
        shutil.rmtree(static, ignore_errors=True)
    common.print_overall(ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
