"""Two AM agents and a witness in the network-namespace test bed, driven from a client namespace.

``ClientLoop`` is a thread inside the client namespace running an asyncio loop: the management calls, the NBD
clients and the workload all run there, so everything the tests send crosses the bed's LAN like a console's or a
guest's traffic would.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import hashlib
import json
import os
import re
import secrets
import sys
import threading
import time
from pathlib import Path

import aiohttp

from am.nbd_client import NBDClient
from tests.am.netbed import NetBed

ROOT = Path(__file__).resolve().parents[2]
HOSTS = ("hosta", "hostb")
MGMT_PORT, NBD_PORT, LINK_PORT, WITNESS_PORT = 7480, 10809, 7481, 7490


class ClientLoop:
    def __init__(self, bed: NetBed, ns: str = "client") -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            with bed.in_ns(ns):
                asyncio.set_event_loop(self.loop)
                ready.set()
                self.loop.run_forever()

        self.thread = threading.Thread(target=run, name=f"loop-{ns}", daemon=True)
        self.thread.start()
        ready.wait(5)

    def run(self, coro, timeout: float = 60.0):
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise AssertionError(f"timed out after {timeout}s") from None

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_all(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Cluster:
    """The agents' configuration, processes and management API; ``fault_injection`` is on (disk failures)."""

    def __init__(self, bed: NetBed, workdir: Path, loop: ClientLoop) -> None:
        self.bed, self.workdir, self.loop = bed, workdir, loop
        self.token = secrets.token_hex(16)
        (workdir / "witness.token").write_text(secrets.token_hex(16))
        self.procs: dict[str, object] = {}
        self.kills: list[tuple[str, float]] = []  # (host, wall time): where a killed agent's log stops being true
        self._session: aiohttp.ClientSession | None = None
        for host in HOSTS:
            peer = HOSTS[1 - HOSTS.index(host)]
            (workdir / host).mkdir(parents=True, exist_ok=True)
            (workdir / f"{host}.toml").write_text(f"""
node = "{host}"
data_dir = "{host}"
[management]
listen = "{bed.addr(host, 'lan')}:{MGMT_PORT}"
token = "{self.token}"
[nbd]
listen = "{bed.addr(host, 'lan')}:{NBD_PORT}"
[links]
a = "{bed.addr(host, 'a')}:{LINK_PORT}"
b = "{bed.addr(host, 'b')}:{LINK_PORT}"
[peer]
name = "{peer}"
a = "{bed.addr(peer, 'a')}:{LINK_PORT}"
b = "{bed.addr(peer, 'b')}:{LINK_PORT}"
[witness]
url = "http://{bed.addr('witness', 'lan')}:{WITNESS_PORT}"
token_file = "witness.token"
[disk]
resync_rate_mib = 16
[disks]
sr_root = "{host}/srs"
[vm]
on_promote = {json.dumps(self.hook_argv(host))}
on_promote_timeout_s = 5
[testbed]
fault_injection = true
""")

    def hook_argv(self, host: str) -> list[str]:
        """``[vm] on_promote``: appends its environment's EAC_AM_* to ``<host>-promoted.jsonl``, or hangs for a
        VM whose uuid starts with ``dead``."""
        script = ("import json, os, sys, time\n"
                  "env = {k: v for k, v in os.environ.items() if k.startswith('EAC_AM_')}\n"
                  "open(sys.argv[1], 'a').write(json.dumps(env) + '\\n')\n"
                  "print('hook ran for', env.get('EAC_AM_VM'))\n"
                  "if env.get('EAC_AM_VM', '').startswith('dead'): time.sleep(3600)\n")
        return [sys.executable, "-c", script, str(self.workdir / f"{host}-promoted.jsonl")]

    def promoted(self, host: str) -> list[dict]:
        """What ``on_promote`` ran with on ``host`` (see ``hook_argv``)."""
        path = self.workdir / f"{host}-promoted.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    # -- processes ----------------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}

    def start_witness(self) -> None:
        log = self.workdir / "witness.log"
        self.procs["witness"] = self.bed.spawn("witness", [
            sys.executable, "-m", "am.witness", "--listen", f"{self.bed.addr('witness', 'lan')}:{WITNESS_PORT}",
            "--token-file", str(self.workdir / "witness.token"), "--state", str(self.workdir / "witness.json")],
            log_path=log, env=self._env())
        self._wait_log(log, "witness listening")

    def start(self, host: str) -> None:
        log = self.workdir / f"{host}.log"
        mark = log.stat().st_size if log.exists() else 0
        argv = [sys.executable, "-m", "am", "--config", str(self.workdir / f"{host}.toml"),
                "--log-level", os.environ.get("AM_LOG_LEVEL", "INFO")]
        self.procs[host] = self.bed.spawn(host, argv, log_path=log, env=self._env())
        self._wait_log(log, f"am {host} ready", after=mark)

    def crash(self, host: str) -> None:
        """Every process of the host's namespace killed at once."""
        self.bed.kill_namespace_processes(host)
        self.kills.append((host, time.time()))

    def _wait_log(self, log: Path, text: str, after: int = 0, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log.exists() and text in log.read_text(errors="replace")[after:]:
                return
            time.sleep(0.02)
        raise AssertionError(f"{log.name} never said {text!r}:\n{log.read_text(errors='replace')[-3000:]}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-6000:]}"
                         for p in sorted(self.workdir.glob("*.log")))

    # -- management API -----------------------------------------------------------------------------
    async def acall(self, host: str, method: str, path: str, body=None, token: str | None = None,
                    raw: bytes | None = None) -> tuple[int, object]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        url = f"http://{self.bed.addr(host, 'lan')}:{MGMT_PORT}{path}"
        headers = {"Authorization": f"Bearer {self.token if token is None else token}"}
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        async with self._session.request(method, url, data=data, headers=headers) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text) if text else None
            except ValueError:
                return resp.status, text

    def call(self, host: str, method: str, path: str, body=None, **kw) -> tuple[int, object]:
        return self.loop.run(self.acall(host, method, path, body, **kw))

    def status(self, host: str, resource: str) -> dict | None:
        try:
            code, body = self.call(host, "GET", f"/v1/resources/{resource}")
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None
        return body if code == 200 else None

    def wait(self, host: str, resource: str, predicate, timeout: float = 20.0, what: str = "condition") -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.status(host, resource)
            if last is not None and predicate(last):
                return last
            time.sleep(0.05)
        raise AssertionError(f"{host}/{resource}: timed out waiting for {what}; last status {last}\n{self.logs()}")

    def create_pair(self, name: str, size: int, primary: str = "hosta") -> None:
        secondary = HOSTS[1 - HOSTS.index(primary)]
        code, body = self.call(primary, "POST", "/v1/resources", {"name": name, "role": "primary", "size": size})
        assert code == 201, body
        code, body = self.call(secondary, "POST", "/v1/resources", {"name": name, "role": "secondary", "size": size})
        assert code == 201, body
        self.wait_in_sync(name)

    def wait_in_sync(self, name: str, timeout: float = 30.0) -> str:
        """Both replicas UpToDate and connected, one primary; returns the primary's host."""
        def ok(host: str) -> bool:
            s = self.status(host, name)
            return bool(s) and s["disk"] == "UpToDate" and s["connection"] == "Connected" and not s["in_flight"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(ok(h) for h in HOSTS):
                roles = {h: self.status(h, name)["role"] for h in HOSTS}
                primaries = [h for h, r in roles.items() if r == "Primary"]
                if len(primaries) == 1:
                    return primaries[0]
            time.sleep(0.05)
        raise AssertionError(f"{name} never got back in sync: "
                             f"{[self.status(h, name) for h in HOSTS]}\n{self.logs()}")

    def nbd(self, host: str) -> tuple[str, int]:
        return self.bed.addr(host, "lan"), NBD_PORT

    async def connect(self, host: str, name: str) -> NBDClient:
        addr, port = self.nbd(host)
        return await NBDClient.connect(addr, port, name)

    def image_digest(self, host: str, name: str) -> str:
        return hashlib.sha256((self.workdir / host / f"{name}.img").read_bytes()).hexdigest()

    def close(self) -> None:
        if self._session is not None:
            self.loop.run(self._session.close())


async def connect_primary(cluster: Cluster, name: str) -> NBDClient:
    """The export wherever it is served now (the secondary refuses it at NBD_OPT_GO)."""
    last: Exception | None = None
    for host in HOSTS:
        try:
            return await asyncio.wait_for(cluster.connect(host, name), 1.0)
        except Exception as exc:  # refused, unreachable, or the host is down
            last = exc
    raise ConnectionError(f"no primary serves {name}: {last}")


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ am\.(\w+): (.*)$")


def accepting_intervals(cluster: Cluster, host: str, resource: str) -> list[tuple[float, float]]:
    """When ``host`` acknowledged writes of ``resource`` as primary (role Primary and I/O Running), read from its
    log (which survives a crash); a crash ends an interval at the moment the test killed the agent."""
    intervals, start = [], None
    role, io = "Secondary", "Unavailable"
    kills = sorted(t for h, t in cluster.kills if h == host)
    log = (cluster.workdir / f"{host}.log").read_text(errors="replace")
    for line in log.splitlines():
        m = LOG_LINE.match(line)
        if not m:
            continue
        at = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        source, text = m.group(2), m.group(3)
        if source == "nbd" and text.startswith("NBD server listening"):  # a (re)start
            if start is not None:
                end = max([t for t in kills if t <= at], default=at)
                intervals.append((start, end))
            start, role, io = None, "Secondary", "Unavailable"
            continue
        if source != "states" or not text.startswith(f"{resource} "):
            continue
        change = re.search(r"(role|io): \w+ (\w+) -> (\w+)", text)
        if not change:
            continue
        if change.group(1) == "role":
            role = change.group(3)
        else:
            io = change.group(3)
        on = role == "Primary" and io == "Running"
        if on and start is None:
            start = at
        elif not on and start is not None:
            intervals.append((start, at))
            start = None
    if start is not None:
        later = [t for t in kills if t >= start]
        intervals.append((start, later[-1] if later else time.time()))
    return intervals


def overlaps(cluster: Cluster, resource: str) -> list[str]:
    """Times both hosts acknowledged writes of ``resource`` as primary: must be none."""
    a, b = (accepting_intervals(cluster, h, resource) for h in HOSTS)
    return [f"hosta {x} and hostb {y}" for x in a for y in b if x[0] < y[1] and y[0] < x[1]]
