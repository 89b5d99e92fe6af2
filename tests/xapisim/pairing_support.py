"""What tests/xapisim/test_live_pairing.py and benchmarks/bench_level2_nic.py share: a client holding ONE TCP
connection to a live guest and asking every ~20 ms, and a host's AM made to protect something (so it pairs).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from tests.support import wait_for
from tests.xapisim.level2_support import AM
from tests.xapisim.test_live import Live

PERIOD = 0.02


class Session(threading.Thread):
    """A client in the bed's client namespace with one TCP connection to ``ip``:7000, never made again. Every
    ``PERIOD`` it PUTs a numbered record and reads the answer, which must be ``OK <seq>`` with ``seq`` one more
    than the last. A reset, a close or a wrong answer ends it with an error (``errors``); a slow answer is only
    slow (TCP retransmits): ``gaps`` measures it."""

    def __init__(self, live: Live, ip: str) -> None:
        super().__init__(name="pairing-session", daemon=True)
        self.live, self.ip = live, ip
        self.answered: list[float] = []  # monotonic time of each answer
        self.errors: list[str] = []
        self.halt = threading.Event()
        self.ready = threading.Event()
        self.done = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        try:
            with self.live.ns.in_ns("client"):
                sock = socket.create_connection((self.ip, 7000), timeout=5)
            self._talk(sock)
        except Exception as exc:  # noqa: BLE001 - any end of the session is the test's failure, in words
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.done.set()
            self.ready.set()

    def _talk(self, sock: socket.socket) -> None:
        with sock:
            sock.settimeout(30)  # a stall is measured, not an error; only a session dead for 30 s is
            buffer, last, n = b"", None, 0
            self.ready.set()
            while not self.halt.is_set():
                n += 1
                sock.sendall(f"PUT pairing-{n}\n".encode())
                while b"\n" not in buffer:
                    data = sock.recv(4096)
                    if not data:
                        raise ConnectionError("the guest closed the connection")
                    buffer += data
                line, _, buffer = buffer.partition(b"\n")
                words = line.decode().split()
                if words[:1] != ["OK"] or len(words) != 2 or (last is not None and int(words[1]) != last + 1):
                    self.errors.append(f"request {n}: {line.decode()!r} after OK {last}")
                    return
                last = int(words[1])
                with self._lock:
                    self.answered.append(time.monotonic())
                self.halt.wait(PERIOD)

    def count(self) -> int:
        with self._lock:
            return len(self.answered)

    def answers_after(self, t: float) -> int:
        with self._lock:
            return sum(1 for a in self.answered if a > t)

    def longest_gap(self, start: float, end: float | None = None) -> float:
        """The longest time without an answer between ``start`` and ``end`` (now when None), in seconds."""
        end = time.monotonic() if end is None else end
        with self._lock:
            times = [start, *(a for a in self.answered if start < a < end), end]
        return max(b - a for a, b in zip(times, times[1:], strict=False))

    def stop(self) -> None:
        self.halt.set()
        self.join(35)


def am_of(live: Live, host: str) -> AM:
    """The AM of host ``host`` (a name), from the simulator's namespace."""
    info = live.live()
    token = (Path(info["workdir"]) / "am" / "mgmt.token").read_text().strip()
    entry = next(h for h in info["hosts"] if h["name"] == host)
    return AM(entry["am"]["api"], token)


def network(am: AM) -> dict | None:
    """The ``network`` object of an AM's status, None while the AM does not answer."""
    try:
        code, body = am.call("GET", "/v1/status")
    except OSError:
        return None
    return body.get("network") if code == 200 else None


def protect_something(am: AM, name: str = "pairing-probe") -> None:
    """A resource primary on this AM, alone: an AM pairs its host only while it runs a protected VM (Level 1 does
    not handle a NIC failure). Its disk path plays no part in the network path, so a small scratch image does."""
    wait_for(lambda: am.peer_state() == "connected", timeout=20, message="the AM to see its peer")
    code, body = am.call("POST", "/v1/resources", {"name": name, "role": "primary", "size": 1 << 20})
    assert code in (201, 409), body
