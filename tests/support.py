"""Helpers the tests share: a live xapisim in a subprocess, and its /sim/ control API."""
from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"xapisim listening on (http://[\d.]+:(\d+))")


@dataclass
class SimProcess:
    """A running ``python -m xapisim`` (the real CLI, over real HTTP)."""

    args: list[str]
    url: str = ""
    port: int = 0
    proc: subprocess.Popen | None = None
    password: str = "demo"
    user: str = "root"
    log: list[str] = field(default_factory=list)

    def start(self, timeout: float = 60.0) -> SimProcess:
        args = list(self.args)
        if self.port:  # a restart keeps the port the clients know
            args = _replace_flag(args, "--port", str(self.port))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "xapisim", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if not line and self.proc.poll() is not None:
                    break
                self.log.append(line)
                match = READY.search(line)
                if match:
                    self.url, self.port = match.group(1), int(match.group(2))
                    return self
            elif self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"xapisim did not start: {''.join(self.log)}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def host_url(self, address: str) -> str:
        return f"http://{address}:{self.port}"

    def control(self, method: str, path: str, body: dict | None = None, base: str | None = None) -> dict:
        """Call the simulator's /sim/ API (JSON); raises urllib.error.HTTPError on 4xx/5xx."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            (base or self.url) + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")

    def state(self) -> dict:
        return self.control("GET", "/sim/state")


def _replace_flag(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out


def start_xapisim(*extra: str, preset: str = "demo", op_delay: float = 0.01, password: str = "demo") -> SimProcess:
    args = ["--port", "0", "--op-delay", str(op_delay), "--user", "root", "--password", password]
    if "--hosts" not in extra:
        args += ["--preset", preset]
    return SimProcess(args=[*args, *extra], password=password).start()


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.05, message: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a console subprocess (watcher, worker, server) that shares the test database."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="eac.test_settings",
        DATABASE_URL=(
            f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
        ),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


__all__ = ["SimProcess", "start_xapisim", "wait_for", "subprocess_env", "urllib"]


def protection_states(vm_ids) -> dict:
    """{VM id: (level, health)} as the console shows them, health "candidate" for a candidate."""
    from inventory.models import VM
    from protection.selectors import vm_protection_states

    vms = VM.objects.filter(pk__in=list(vm_ids))
    return {pk: (s.level, "candidate" if s.status == "candidate" else s.health)
            for pk, s in vm_protection_states(vms).items()}
