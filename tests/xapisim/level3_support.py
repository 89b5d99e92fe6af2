"""A client of a Level 3 guest for the live bed's tests and benchmarks: one TCP connection held for the whole run,
a numbered request every few milliseconds without waiting for the answers, and every answer checked against what
the guest's state must say at that point."""

from __future__ import annotations

import collections
import contextlib
import random
import socket
import threading
import time
from dataclasses import dataclass, field

import XenAPI

from tests.support import wait_for
from tests.xapisim.level2_support import master_session
from tests.xapisim.test_live import Live


@dataclass
class Sent:
    number: int
    line: str
    at: float


@dataclass
class LedgerRun:
    answers: int = 0
    wrong: list[str] = field(default_factory=list)  # answers that contradict the guest's state
    resets: int = 0
    ended: str = ""  # why the connection ended ("" while it runs)
    acked: dict[int, str] = field(default_factory=dict)  # PUT: record number -> payload, as acknowledged
    times: list[float] = field(default_factory=list)  # monotonic time of each answer


class Ledger:
    """``ADD n`` requests (every ``put_every``-th a ``PUT``) on one connection to ``ip``. The first ``ADD 0``
    tells the ledger's state before the run; then the j-th ADD must be answered ``SUM k0+j total0+sum``. An answer
    from a state that was lost (a reply released before its checkpoint committed, then the guest restored from an
    older one) shows as a repeated or skipped count; a lost answer as a hang; a reset as a reset."""

    def __init__(self, live: Live, ip: str, *, interval: float = 0.005, put_every: int = 5,
                 stall: float = 15.0) -> None:
        self.live, self.ip, self.interval, self.put_every, self.stall = live, ip, interval, put_every, stall
        self.run = LedgerRun()
        self.halt = threading.Event()
        self._pending: collections.deque[Sent] = collections.deque()
        self._lock = threading.Lock()
        self._adds = 0
        self._sum = 0
        self._k0 = self._total0 = 0
        self._last_put = 0
        self.sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> Ledger:
        self.sock = self.live.in_client(lambda: socket.create_connection((self.ip, 7000), timeout=5))
        self.sock.settimeout(self.stall)
        self._reader = self.sock.makefile("rb")
        self.sock.sendall(b"ADD 0\n")
        words = self._reader.readline().decode().split()
        assert words[:1] == ["SUM"], f"the guest answered {words} to ADD 0"
        self._k0, self._total0 = int(words[1]), int(words[2])
        self._threads = [threading.Thread(target=self._send, daemon=True, name="ledger-send"),
                         threading.Thread(target=self._read, daemon=True, name="ledger-read")]
        for t in self._threads:
            t.start()
        return self

    def _send(self) -> None:
        n = 0
        while not self.halt.is_set() and not self.run.ended:
            n += 1
            line = f"PUT rec-{n}" if self.put_every and n % self.put_every == 0 else f"ADD {n}"
            with self._lock:
                self._pending.append(Sent(n, line, time.monotonic()))
            try:
                self.sock.sendall(line.encode() + b"\n")
            except OSError as exc:
                self._end(exc)
                return
            time.sleep(self.interval)

    def _end(self, exc: BaseException | str) -> None:
        if isinstance(exc, ConnectionResetError):
            self.run.resets += 1
        if not self.run.ended:
            self.run.ended = str(exc) or type(exc).__name__

    def _read(self) -> None:
        while not self.run.ended:
            try:
                raw = self._reader.readline()
            except OSError as exc:  # a reset, or no answer for ``stall`` seconds
                if not self.halt.is_set() or not isinstance(exc, TimeoutError):
                    self._end(exc)
                return
            if not raw:
                if not self.halt.is_set():
                    self._end("the guest closed the connection")
                return
            now = time.monotonic()
            with self._lock:
                sent = self._pending.popleft() if self._pending else None
            self.run.answers += 1
            self.run.times.append(now)
            self._check(sent, raw.decode(errors="replace").strip())

    def _check(self, sent: Sent | None, answer: str) -> None:
        if sent is None:
            self.run.wrong.append(f"an answer to no request: {answer!r}")
            return
        words = answer.split()
        verb = sent.line.split()[0]
        if verb == "ADD":
            self._adds += 1
            self._sum += int(sent.line.split()[1])
            want = f"SUM {self._k0 + self._adds} {self._total0 + self._sum}"
            if answer != want:
                self.run.wrong.append(f"{sent.line} answered {answer!r}, not {want!r}")
        elif words[:1] == ["OK"] and len(words) == 2 and words[1].isdigit():
            seq = int(words[1])
            if self._last_put and seq != self._last_put + 1:
                self.run.wrong.append(f"{sent.line} stored as record {seq} after record {self._last_put}")
            self._last_put = seq
            self.run.acked[seq] = sent.line.split(maxsplit=1)[1]
        else:
            self.run.wrong.append(f"{sent.line} answered {answer!r}")

    def answered(self) -> int:
        return self.run.answers

    def gap_after(self, moment: float) -> float:
        """The longest silence between two answers (or ``moment`` and the first answer) since ``moment``."""
        times = [moment] + [t for t in self.run.times if t > moment]
        return max(b - a for a, b in zip(times, times[1:], strict=False)) if len(times) > 1 else 0.0

    def stop(self, drain: float = 5.0) -> LedgerRun:
        """Stop sending, wait up to ``drain`` seconds for the answers still due, then close."""
        self.halt.set()
        self._threads[0].join(5)
        deadline = time.monotonic() + drain
        while self._pending and not self.run.ended and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._pending and not self.run.ended:
            self._end(f"{len(self._pending)} requests never answered")
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self._threads[1].join(5)
            self.sock.close()
        return self.run


def checkpoint(am, name: str) -> dict:
    return (am.resource(name) or {}).get("checkpoint") or {}


def crash_and_return(live: Live, ledger: Ledger, p: dict, running_on: str, other: str, crash: int,
                     rng: random.Random, epoch_ms: int) -> float:
    """Crash ``running_on`` at a random moment of an epoch, wait for the client's answers to go on, bring the host
    back as the secondary (its replica resynced, its VM started paused there). Returns the client's gap."""
    name, ams, hosts = p["resource"], p["ams"], p["hosts"]
    vms = {"xcp-host-1": p["vm"], p["secondary"]: p["copy"]}
    wait_for(lambda: checkpoint(ams[running_on], name).get("state") == "Checkpointing"
             and checkpoint(ams[other], name).get("state") == "Standby", timeout=60,
             message=f"crash {crash}: both sides checkpointing")
    before = ledger.answered()
    wait_for(lambda: ledger.answered() >= before + 20, timeout=20, message=f"crash {crash}: answers before it")
    _, url = wait_for(lambda: master_session(live), timeout=30, message="a pool master")
    time.sleep(rng.uniform(0, epoch_ms / 1000 * 2))  # anywhere in an epoch
    crashed_at = time.monotonic()
    live.cmd.control("POST", f"/sim/hosts/{running_on}/crash", base=url)
    at_crash = ledger.answered()
    wait_for(lambda: ledger.answered() >= at_crash + 100 or ledger.run.ended, timeout=30,  # half a second's
             message=f"crash {crash}: answers after it")
    assert not ledger.run.ended, f"crash {crash}: the connection ended: {ledger.run.ended}"
    gap = ledger.gap_after(crashed_at)
    session, url = wait_for(lambda: master_session(live), timeout=30, message="a pool master")
    api = session.xenapi
    try:
        live.cmd.control("POST", f"/sim/hosts/{running_on}/power-on", base=url)
        wait_for(lambda: (r := ams[running_on].resource(name) or {}).get("disk") == "UpToDate"
                 and r.get("role") == "Secondary", timeout=60,
                 message=f"crash {crash}: the returning host's replica resynced")
        wait_for(lambda: api.VM.get_power_state(vms[running_on]) == "Halted", timeout=20,
                 message="the crashed host's VM halted")
        start_paused(api, vms[running_on], hosts[running_on])
    finally:
        session.xenapi.session.logout()
    return gap


def start_paused(api, vm: str, host: str) -> None:
    """``VM.start_on`` paused on ``host`` once XAPI counts the host live again (it was just powered on)."""
    def attempt() -> bool:
        try:
            api.VM.start_on(vm, host, True, False)
            return True
        except XenAPI.Failure as exc:
            if exc.details[0] != "HOST_NOT_LIVE":
                raise
            return False

    wait_for(attempt, timeout=30, message="the host live again to start the VM paused there")
