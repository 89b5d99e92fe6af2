"""What the benchmark scripts share: the project on sys.path, Django and a database of their own,
subprocesses, timing, and a figure told against its budget.

Each script runs as ``python benchmarks/bench_<what>.py``: Python puts ``benchmarks/`` first on
sys.path, so ``import common`` finds this file, and importing it puts the project root there too,
so that the console's packages (and ``tests.support``) import after it.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The machine's PostgreSQL, as for the tests (DATABASE_URL overrides it).
DATABASE_SERVER = "postgres://postgres@127.0.0.1:5432"
DEFAULT_DATABASE_URL = f"{DATABASE_SERVER}/test"

T = TypeVar("T")


# -- command line -----------------------------------------------------------------------------------


def argument_parser(doc: str, *, hosts: int | None = None, vms: int | None = None) -> argparse.ArgumentParser:
    """The script's parser, described by the first line of its docstring; with ``--hosts`` and ``--vms``
    (the size of the pool) when their defaults are given."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if hosts is not None:
        parser.add_argument("--hosts", type=int, default=hosts)
    if vms is not None:
        parser.add_argument("--vms", type=int, default=vms)
    return parser


# -- Django and the database ------------------------------------------------------------------------


def django_setup(**defaults: str) -> None:
    """Set up Django with the test settings; ``defaults`` are environment variables set unless already set."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "eac.test_settings")
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    import django

    django.setup()


def bench_database(name: str, *, fresh: bool = False, channel_prefix: str | None = None) -> str:
    """Point Django at a PostgreSQL database of the benchmark's own (``name``, on the server of
    DATABASE_URL), created if missing (dropped first if ``fresh``) and migrated; returns the URL it
    was derived from (for ``drop_bench_database``). ``channel_prefix`` keeps the benchmark's
    channel-layer messages apart from a test run's."""
    import psycopg

    if channel_prefix:
        os.environ["EAC_CHANNEL_PREFIX"] = channel_prefix
    base = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
    with psycopg.connect(base, autocommit=True) as conn:
        if fresh:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if fresh or not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    os.environ["DATABASE_URL"] = f"{base.rpartition('/')[0]}/{name}"
    django_setup(LOG_LEVEL="WARNING")
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    return base


def drop_bench_database(base: str, name: str) -> None:
    """Close Django's connections and drop the benchmark's database ``name`` (on the server of ``base``)."""
    import psycopg
    from django.db import connections

    connections.close_all()
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- processes ----------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port of 127.0.0.1 nobody listens on now (for a server that cannot take port 0 and say)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait(predicate: Callable[[], T], timeout: float, what: str, *, interval: float = 0.05,
         error: type[BaseException] = TimeoutError) -> T:
    """Poll ``predicate`` every ``interval`` seconds until it returns something truthy, and return that;
    raise ``error`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise error(f"timed out after {timeout:.0f}s waiting for {what}")


def process_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds the process has used, (user, system), from /proc/PID/stat; (0, 0) once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


# -- timing and figures -------------------------------------------------------------------------------


def timed(fn: Callable[[], T], runs: int) -> tuple[T, list[float]]:
    """Call ``fn`` ``runs`` times; the last result and the wall time of each call, in seconds."""
    times = []
    result = None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, times


def median_and_worst(times: list[float]) -> tuple[float, float]:
    return statistics.median(times), max(times)


def pct(values: list[float], p: float) -> float:
    """The ``p``-th percentile by nearest rank: a value that was measured, never an interpolation."""
    ordered = sorted(values)
    # The rank is rounded up (round() would take 2.5 to 2: the 2nd of 5 values as their median).
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def verdict(ok: bool, missed: str = "OVER BUDGET") -> str:
    """How a figure compares with its budget, at the end of the line that prints it."""
    return "OK" if ok else missed


def print_overall(ok: bool) -> None:
    """The last line of a script whose figures each have a budget."""
    print("\nall within budget" if ok else "\nSOME TIMINGS OVER BUDGET")


# -- the live test bed ------------------------------------------------------------------------------

def live_bed_unavailable(*tools: str) -> str | None:
    """Why xapisim's live test bed cannot run here (it needs root, ``ip``, ``nft`` and any other ``tools``), or
    None."""
    if os.geteuid() != 0:
        return "the live test bed needs root (network namespaces, veths, nftables)"
    for tool in ("ip", "nft", *tools):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            return f"the live test bed needs {tool}"
    return None


def _interrupt(signum, frame):  # noqa: ARG001 - a signal handler's signature
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_termination() -> None:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does: a benchmark leaves through its cleanup (the
    bed's namespaces and processes stopped) whichever way it is stopped."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)


def print_spread(label: str, values: list[float], what: str, width: int = 8) -> None:
    """One figure over the runs: its median and its worst, and what it measures."""
    print(f"  {label:{width}s} p50 {statistics.median(values):6.3f} s  max {max(values):6.3f} s   {what}")


def conclude(ok: bool, failure: str | None, workdir: Path, *, keep: bool = False) -> None:
    """The end of a benchmark with a work folder: a failure said (the folder kept for its logs) or the folder
    removed (unless ``keep``), the overall verdict, and exit status 1 unless ``ok``."""
    if failure:
        print(f"\nFAILED: {failure}")
    elif keep:
        print(f"\nlogs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print_overall(ok)
    if not ok:
        sys.exit(1)


def start_xapisim(*args: str, op_delay: float | None = None):
    """``python -m xapisim`` on a free port with ``args``, started (its log in a temporary folder): the tests'
    XapisimCommand, with ``url``, ``control``, ``state`` and ``stop``."""
    import tempfile

    from tests.support import XapisimCommand

    extra = ["--op-delay", f"{op_delay:g}"] if op_delay is not None else []
    log = Path(tempfile.mkdtemp(prefix="bench-xapisim-")) / "xapisim.log"
    return XapisimCommand("--port", "0", *args, *extra, log=log).start()
