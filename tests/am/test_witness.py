"""The witness as a process (``python -m am.witness``) over HTTP on loopback: authentication, request checking,
the lease flow through ``WitnessClient``, requests kept in the order their node sent them, its state across a
``kill -9``, and its refusal of a corrupt state file."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

from am.witness_client import WitnessClient, WitnessRejected, WitnessUnreachable
from am.witness_core import Answer
from tests.support import Proc, free_port, wait_for

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-witness-token"
LEASE_MS = 600
R = "vdi-1"


class WitnessProc(Proc):
    """One witness on a port of its own, with its token and state files in a temporary directory."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = tmp / "state.json"
        token_file = tmp / "token"
        token_file.write_text(TOKEN + "\n")
        super().__init__("witness", [sys.executable, "-m", "am.witness", "--listen", f"127.0.0.1:{self.port}",
                                     "--token-file", str(token_file), "--state", str(self.state),
                                     "--lease-ms", str(LEASE_MS)],
                         log=tmp / "witness.log", ready="witness listening on")

    def wait_out_the_start(self) -> WitnessProc:
        """A witness grants nothing new for one lease after it starts (a first start looks like a lost state
        file); the tests that are not about that wait it out here."""
        time.sleep(LEASE_MS / 1000)
        return self

    def client(self, node: str, token: str = TOKEN) -> WitnessClient:
        return WitnessClient(self.url, token, node, timeout_s=2.0)  # generous: a loaded test machine is slow


@pytest.fixture
def witness(tmp_path: Path) -> Iterator[WitnessProc]:
    """A witness just started: it still refuses to grant anything new (see ``wait_out_the_start``)."""
    proc = WitnessProc(tmp_path)
    try:
        yield proc.start(timeout=20)
    finally:
        proc.stop()


@pytest.fixture
def granting(witness: WitnessProc) -> WitnessProc:
    """A witness whose start-up wait is over."""
    return witness.wait_out_the_start()


def http(url: str, method: str = "GET", body: bytes | dict[str, Any] | None = None,
         token: str | None = TOKEN) -> tuple[int, Any, dict[str, str]]:
    """``(status, decoded JSON body, headers)`` of one request, error statuses included."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read()), dict(exc.headers)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- the HTTP surface ---------------------------------------------------------------------------------------------


def test_health_needs_no_token(witness: WitnessProc):
    assert http(witness.url + "/v1/health", token=None)[:2] == (200, {"ok": True})


def test_wrong_or_missing_token_is_401_with_only_an_error(witness: WitnessProc):
    for token in (None, "wrong", TOKEN + "x", TOKEN[:-1], ""):
        for method, path, body in (("POST", "/v1/acquire", {"resource": R, "node": "hostA", "rseq": 1}),
                                   ("GET", "/v1/resources", None),
                                   ("DELETE", f"/v1/resources/{R}?node=hostA&rseq=1", None),
                                   ("GET", "/v1/no-such-route", None)):
            status, answer, headers = http(witness.url + path, method, body, token=token)
            assert status == 401, (token, path)
            assert list(answer) == ["error"] and answer["error"]
            assert headers["WWW-Authenticate"] == "Bearer"
    assert not witness.state.exists()  # nothing was granted
    assert TOKEN not in witness.output()


def test_bad_requests_are_400_with_a_sentence(witness: WitnessProc):
    acquire = witness.url + "/v1/acquire"
    cases = {
        "not JSON": (acquire, b"{resource: vdi-1"),
        "not an object": (acquire, b"[1, 2]"),
        "missing node": (acquire, {"resource": R, "rseq": 1}),
        "wrong type": (witness.url + "/v1/renew", {"resource": R, "node": "hostA", "epoch": "1", "rseq": 1}),
        "unknown field": (witness.url + "/v1/release", {"resource": R, "node": "hostA", "epoch": 1, "rseq": 1,
                                                        "handover": "hostB"}),
        "epoch 0": (witness.url + "/v1/renew", {"resource": R, "node": "hostA", "epoch": 0, "rseq": 1}),
        "name with a slash": (acquire, {"resource": "a/b", "node": "hostA", "rseq": 1}),
        "empty name": (acquire, {"resource": R, "node": "", "rseq": 1}),
        "no peer": (witness.url + "/v1/outdate", {"resource": R, "node": "hostA", "epoch": 1, "rseq": 1}),
        "rseq 0": (acquire, {"resource": R, "node": "hostA", "rseq": 0}),
        "rseq as text": (acquire, {"resource": R, "node": "hostA", "rseq": "1"}),
        "lease too short": (acquire, {"resource": R, "node": "hostA", "rseq": 1, "lease_ms": 50}),
        "lease as text": (witness.url + "/v1/renew", {"resource": R, "node": "hostA", "epoch": 1, "rseq": 1,
                                                      "lease_ms": "400"}),
    }
    for case, (url, body) in cases.items():
        status, answer, _ = http(url, "POST", body)
        assert status == 400, case
        assert list(answer) == ["error"] and answer["error"].startswith("The request ") \
            and answer["error"].endswith("."), (case, answer)
    status, answer, _ = http(witness.url + f"/v1/resources/{R}?rseq=1", "DELETE")  # no node=
    assert status == 400 and "?node=" in answer["error"]
    status, answer, _ = http(witness.url + f"/v1/resources/{R}?node=hostA&rseq=x", "DELETE")
    assert status == 400 and "rseq" in answer["error"]
    status, answer, _ = http(witness.url + "/v1/nothing-here", "POST", {})
    assert (status, list(answer)) == (404, ["error"])
    assert witness.proc is not None and witness.proc.poll() is None
    assert "Traceback" not in witness.output()


def test_a_request_without_rseq_is_400_with_a_sentence(witness: WitnessProc):
    """A client older than the witness sends no request numbers: it cannot be kept in order, and is told so."""
    for method, path, body in (
            ("POST", "/v1/acquire", {"resource": R, "node": "hostA"}),
            ("POST", "/v1/renew", {"resource": R, "node": "hostA", "epoch": 1}),
            ("POST", "/v1/release", {"resource": R, "node": "hostA", "epoch": 1, "handover_to": None}),
            ("POST", "/v1/outdate", {"resource": R, "node": "hostA", "epoch": 1, "peer": "hostB"}),
            ("POST", "/v1/current", {"resource": R, "node": "hostA", "epoch": 1, "peer": "hostB"}),
            ("DELETE", f"/v1/resources/{R}?node=hostA", None)):
        status, answer, _ = http(witness.url + path, method, body)
        assert status == 400, path
        assert answer["error"].startswith("The request carries no rseq") and answer["error"].endswith("."), answer
    assert not witness.state.exists()


def test_a_request_overtaken_by_a_later_one_is_refused_and_changes_nothing(granting: WitnessProc):
    witness = granting

    def post(path: str, **body: Any) -> Any:
        status, answer, _ = http(witness.url + path, "POST", {"resource": R, **body})
        assert status == 200, answer
        return answer

    assert post("/v1/acquire", node="hostA", rseq=100)["ok"]
    assert post("/v1/current", node="hostA", epoch=1, peer="hostB", rseq=101)["current"] == ["hostA", "hostB"]
    assert post("/v1/outdate", node="hostA", epoch=1, peer="hostB", rseq=103)["current"] == ["hostA"]
    saved = witness.state.read_bytes()
    late = post("/v1/current", node="hostA", epoch=1, peer="hostB", rseq=102)  # sent before the outdate
    assert not late["ok"] and late["reason"].startswith("stale request: ") and late["rseq_floor"] == 103
    assert late["current"] == ["hostA"]
    assert not post("/v1/release", node="hostA", epoch=1, rseq=102)["ok"]
    status, forgot, _ = http(witness.url + f"/v1/resources/{R}?node=hostA&rseq=103", "DELETE")
    assert status == 200 and not forgot["ok"] and forgot["reason"].startswith("stale request: ")
    assert witness.state.read_bytes() == saved
    assert json.loads(saved)["resources"][R]["rseq"] == {"hostA": 103}
    assert post("/v1/renew", node="hostA", epoch=1, rseq=104)["ok"]
    status, forgot, _ = http(witness.url + f"/v1/resources/{R}?node=hostA&rseq=105", "DELETE")
    assert status == 200 and forgot["ok"]


def test_acquire_renew_outdate_flow(granting: WitnessProc):
    witness = granting
    async def flow() -> None:
        async with witness.client("hostA") as a, witness.client("hostB") as b:
            granted = await a.acquire(R)
            assert (granted.ok, granted.epoch, granted.current) == (True, 1, ["hostA"])
            assert granted.lease_s == LEASE_MS / 1000
            refused = await b.acquire(R)
            assert not refused.ok and refused.holder == "hostA" and 0 < refused.retry_s <= LEASE_MS / 1000
            assert (await a.mark_current(R, 1, "hostB")).current == ["hostA", "hostB"]
            assert (await a.renew(R, 1)).ok
            assert not (await a.renew(R, 2)).ok
            assert (await a.outdate(R, 1, "hostB")).current == ["hostA"]
            await asyncio.sleep(LEASE_MS / 1000 + 0.1)  # hostA falls silent and its lease lapses...
            outdated = await b.acquire(R)
            assert not outdated.ok and outdated.retry_s == 0  # ...but hostB missed writes: no promotion
            assert outdated.reason.startswith("hostB's replica of vdi-1 is outdated")
            assert (await a.acquire(R)).epoch == 1  # hostA comes back: nobody took it

    run(flow())


def test_planned_handover_then_forget(granting: WitnessProc):
    witness = granting
    async def flow() -> None:
        async with witness.client("hostA") as a, witness.client("hostB") as b:
            await a.acquire(R)
            await a.mark_current(R, 1, "hostB")
            assert (await a.release(R, 1, handover_to="hostB")).ok
            swapped = await b.acquire(R)
            assert (swapped.ok, swapped.epoch, swapped.current) == (True, 2, ["hostA", "hostB"])
            assert not (await a.forget(R)).ok  # hostB holds a valid lease
            assert (await b.forget(R)).ok

    run(flow())
    assert http(witness.url + "/v1/resources")[:2] == (200, {"resources": []})


def test_resources_lists_every_record(granting: WitnessProc):
    witness = granting
    run(_acquire("hostA", witness))
    status, body, _ = http(witness.url + "/v1/resources")
    assert status == 200
    (record,) = body["resources"]
    assert {k: record[k] for k in ("resource", "lease", "epoch", "holder", "current", "handover")} == {
        "resource": R, "lease": "Held", "epoch": 1, "holder": "hostA", "current": ["hostA"], "handover": None}
    assert 0 < record["lease_remaining_s"] <= LEASE_MS / 1000


async def _acquire(node: str, witness: WitnessProc, resource: str = R) -> Any:
    async with witness.client(node) as c:
        return await c.acquire(resource)


def test_the_answer_leaves_only_once_the_state_is_on_disk(granting: WitnessProc):
    witness = granting
    assert run(_acquire("hostA", witness)).ok
    saved = json.loads(witness.state.read_text())  # read at once: no waiting for a background save
    record = saved["resources"][R]
    assert {k: v for k, v in record.items() if k != "rseq"} == {
        "epoch": 1, "holder": "hostA", "current": ["hostA"], "handover": None}
    assert list(record["rseq"]) == ["hostA"] and record["rseq"]["hostA"] >= time.time_ns() - 60 * 10**9


# -- restarts -----------------------------------------------------------------------------------------------------


def test_state_survives_kill_9_and_a_second_node_waits_one_lease(granting: WitnessProc):
    witness = granting
    async def before() -> None:
        async with witness.client("hostA") as a:
            await a.acquire(R)
            await a.mark_current(R, 1, "hostB")
            await a.release(R, 1)
            await a.acquire(R)  # epoch 2: a takeover, hostB outdated...
            await a.mark_current(R, 2, "hostB")  # ...and resynced

    run(before())
    witness.kill()
    witness.start(timeout=20)

    async def after() -> None:
        async with witness.client("hostA") as a, witness.client("hostB") as b:
            refused = await b.acquire(R)
            assert not refused.ok and refused.retry_s > 0 and refused.epoch == 2
            assert refused.current == ["hostA", "hostB"]
            renewed_at = time.monotonic()
            assert (await a.renew(R, 2)).ok  # hostA still believes in its lease: it renews at once
            while not (granted := await b.acquire(R)).ok:  # then falls silent
                await asyncio.sleep(0.05)
            assert time.monotonic() - renewed_at >= LEASE_MS / 1000
            assert (granted.epoch, granted.current) == (3, ["hostB"])

    run(after())


def test_restarted_witness_grants_nothing_new_for_one_lease(granting: WitnessProc):
    witness = granting
    assert run(_acquire("hostA", witness)).ok
    witness.stop()
    witness.start(timeout=20)
    started = time.monotonic()
    refused = run(_acquire("hostB", witness, resource="vdi-2"))  # even a resource nobody held
    assert not refused.ok and "restarted" in refused.reason
    wait_for(lambda: run(_acquire("hostB", witness, resource="vdi-2")).ok, timeout=5, message="vdi-2 granted")
    assert time.monotonic() - started >= LEASE_MS / 1000 - 0.2  # the wait runs from the start, not our request


def test_sigterm_stops_the_witness_cleanly(witness: WitnessProc):
    assert witness.stop() == 0


@pytest.mark.parametrize("content", [b"{not json", b"", json.dumps(
    {"format": 1, "resources": {R: {"epoch": 1, "holder": "hostA", "current": ["hostB"]}}}).encode()],
    ids=["not-json", "empty", "holder-not-current"])
def test_corrupt_state_file_exits_2_with_a_one_line_message(tmp_path: Path, content: bytes):
    proc = WitnessProc(tmp_path)
    proc.state.write_bytes(content)
    done = subprocess.run(proc.args, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"witness: state file {proc.state} is corrupt")
    assert proc.state.read_bytes() == content  # left as found, for the operator


# -- the client's request numbers ---------------------------------------------------------------------------------


def test_client_requests_side_by_side_are_kept_in_order(granting: WitnessProc):
    """The client sends one request per resource at a time, numbered when it goes: however its callers interleave,
    the witness never refuses as stale a request its caller still waits for."""
    witness = granting

    async def flow() -> None:
        async with witness.client("hostA") as a:
            assert (await a.acquire(R)).ok
            for _ in range(20):
                answers = await asyncio.gather(a.renew(R, 1), a.outdate(R, 1, "hostB"), a.renew(R, 1),
                                               a.mark_current(R, 1, "hostB"), a.acquire(R), a.acquire("vdi-2"))
                assert all(answer.ok for answer in answers), [answer.reason for answer in answers]

    run(flow())


def test_client_sends_one_request_per_resource_at_a_time_in_number_order():
    """Against a witness that takes 50 ms per answer: requests for one resource go one after another, lowest
    number first, while other resources do not wait; and the time spent waiting for the turn counts in the
    timeout."""
    async def call() -> list[tuple[str, str, int]]:
        seen: list[tuple[str, str, int]] = []
        hold = asyncio.Event()  # set: answer at once (after 50 ms for R); clear: answer when the test ends
        hold.set()
        ended = asyncio.Event()

        async def answer(request: web.Request) -> web.Response:
            body = await request.json()
            seen.append(("in", body["resource"], body["rseq"]))
            if not hold.is_set():
                await ended.wait()
            await asyncio.sleep(0.05 if body["resource"] == R else 0.0)
            seen.append(("out", body["resource"], body["rseq"]))
            return web.Response(body=msgspec.json.encode(Answer(
                ok=True, epoch=1, lease_s=0.6, reason="", retry_s=0.0, holder="hostA", current=["hostA"])),
                content_type="application/json")

        app = web.Application()
        for path in ("/v1/renew", "/v1/outdate", "/v1/current", "/v1/acquire"):
            app.router.add_post(path, answer)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with WitnessClient(url, TOKEN, "hostA", timeout_s=2.0) as c:
                answers = await asyncio.gather(c.renew(R, 1), c.outdate(R, 1, "hostB"),
                                               c.mark_current(R, 1, "hostB"), c.acquire("vdi-2"))
                assert all(a.ok for a in answers)
            hold.clear()
            async with WitnessClient(url, TOKEN, "hostA", timeout_s=0.2) as c:
                started = time.monotonic()
                outcomes = await asyncio.gather(c.renew(R, 1), c.renew(R, 1), c.renew(R, 1),
                                                return_exceptions=True)
                assert time.monotonic() - started < 0.45  # one timeout for all three, not one after another
                assert all(isinstance(o, WitnessUnreachable) for o in outcomes), outcomes
        finally:
            ended.set()
            await runner.cleanup()
        return seen

    seen = run(call())
    mine = [(event, rseq) for event, resource, rseq in seen if resource == R][:6]
    assert [event for event, _ in mine] == ["in", "out"] * 3  # never two in flight
    numbers = [rseq for _, rseq in mine[::2]]
    assert numbers == sorted(numbers) and len(set(numbers)) == 3
    other = seen.index(next(e for e in seen if e[1] == "vdi-2"))
    assert other < seen.index(("out", R, numbers[0]))  # vdi-2 did not wait for vdi-1
    assert [e[:2] for e in seen[8:] if e[0] == "in"] == [("in", R)]  # the two that waited were never sent


def test_client_numbers_on_above_an_earlier_process(granting: WitnessProc):
    """A restarted AM's client numbers from the wall clock: above the numbers of the process before it. If that
    one's clock ran ahead (the clock was set back since), the first request is refused as stale, and the client
    numbers on from the witness's number."""
    witness = granting

    async def flow() -> None:
        async with witness.client("hostA") as before:
            assert (await before.acquire(R)).ok
            assert (await before.mark_current(R, 1, "hostB")).ok
        async with witness.client("hostA") as after:
            assert (await after.renew(R, 1)).ok
            assert (await after.outdate(R, 1, "hostB")).ok
        async with witness.client("hostA") as ahead:
            ahead._rseq = time.time_ns() + 3600 * 10**9  # its clock an hour ahead
            assert (await ahead.mark_current(R, 1, "hostB")).ok
        async with witness.client("hostA") as behind:
            refused = await behind.renew(R, 1)
            assert not refused.ok and refused.reason.startswith("stale request: ")
            assert refused.rseq_floor > time.time_ns()
            assert (await behind.renew(R, 1)).ok
            assert (await behind.outdate(R, 1, "hostB")).current == ["hostA"]

    run(flow())


# -- the client's failures ----------------------------------------------------------------------------------------


def test_client_raises_unreachable_when_nobody_listens():
    async def call() -> None:
        async with WitnessClient(f"http://127.0.0.1:{free_port()}", TOKEN, "hostA") as c:
            await c.acquire(R)

    with pytest.raises(WitnessUnreachable):
        run(call())


def test_client_raises_unreachable_when_the_witness_hangs():
    async def call() -> float:
        async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(10)

        server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        started = time.monotonic()
        try:
            async with WitnessClient(f"http://127.0.0.1:{port}", TOKEN, "hostA", timeout_s=0.3) as c:
                with pytest.raises(WitnessUnreachable):
                    await c.renew(R, 1)
        finally:
            server.close()
        return time.monotonic() - started

    assert run(call()) < 2.0


def test_client_raises_rejected_on_a_wrong_token(witness: WitnessProc):
    async def call() -> None:
        async with witness.client("hostA", token="wrong") as c:
            await c.acquire(R)

    with pytest.raises(WitnessRejected) as caught:
        run(call())
    assert caught.value.status == 401
