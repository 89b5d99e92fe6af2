"""Bad input to the Availability Manager never crashes it and gets a clear answer.

Four doors: the management API (bearer token, JSON bodies, names, sizes, paths, actions in the wrong state, the
change feed's parameters), the NBD port (garbage, out-of-range requests, the secondary's export, oversized
writes), the peer links (garbage, huge frames, malformed frames, strangers' hellos) and the configuration file
(each error stops the agent with one line, no traceback).

The tests of the agents also check that both still answer afterwards, that their real links stayed up where it
matters, and (LogWatch) that nothing they logged meanwhile is a traceback or an ERROR.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import aiohttp
import msgspec
import pytest

from am import config, wire
from am.nbd import (
    GREETING,
    IHAVEOPT,
    MAX_PAYLOAD,
    NBDMAGIC,
    OPTION,
    REQUEST,
    REQUEST_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    Opt,
    Rep,
)
from am.nbd_client import NBDOptionError, NBDReplyError, go_data, handshake, send_option
from tests.am.cluster import HOSTS, LINK_PORT, MGMT_PORT, ROOT

SIZE = 4 << 20
HANGUP = 5.0  # seconds the agent has to close a connection it should refuse


# -- helpers ------------------------------------------------------------------------------------------------------


class LogWatch:
    """What the agents log from now on: ``check`` fails on a traceback or an internal error among it."""

    def __init__(self, c) -> None:
        self.c = c
        self.marks = {h: self._path(h).stat().st_size if self._path(h).exists() else 0 for h in HOSTS}

    def _path(self, host: str) -> Path:
        return self.c.workdir / f"{host}.log"

    def new(self, host: str) -> str:
        return self._path(host).read_text(errors="replace")[self.marks[host]:]

    def check(self) -> None:
        for host in HOSTS:
            text = self.new(host)
            assert "Traceback" not in text, f"{host} logged a traceback:\n{text[-6000:]}"
            assert " ERROR " not in text, f"{host} logged an error:\n{text[-6000:]}"


def assert_alive(c) -> None:
    for host in HOSTS:
        assert c.procs[host].poll() is None, f"the agent of {host} exited\n{c.logs()}"
        code, body = c.call(host, "GET", "/v1/status")
        assert code == 200 and body["node"] == host, (code, body)


def assert_error(code: int, body, status: int, *words: str) -> str:
    """``body`` is exactly {"error": a sentence} and the status is ``status``; returns the sentence."""
    assert code == status, (code, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    sentence = body["error"]
    assert isinstance(sentence, str) and len(sentence) >= 8, body
    for word in words:
        assert word.lower() in sentence.lower(), (word, sentence)
    return sentence


def drop_resource(c, name: str) -> None:
    """Demote it wherever it is primary, then delete it on both hosts (absent is fine)."""
    path = f"/v1/resources/{quote(name, safe='')}"
    for host in HOSTS:
        code, body = c.call(host, "POST", f"{path}/demote")
        assert code in (200, 404), (host, code, body)
    for host in HOSTS:
        code, body = c.call(host, "DELETE", path)
        assert code in (204, 404), (host, code, body)


@contextlib.contextmanager
def pair(c, name: str, size: int = SIZE):
    """A resource, primary on hosta and in sync on hostb, deleted afterwards (also when creating it failed)."""
    try:
        c.create_pair(name, size)
        yield name
    finally:
        drop_resource(c, name)


async def http(c, host: str, method: str, path: str, headers: dict | None = None,
               data: bytes | None = None) -> tuple[int, str, bytes]:
    """One request with exactly ``headers`` (no token unless given): status, content type, body."""
    url = f"http://{c.bed.addr(host, 'lan')}:{MGMT_PORT}{path}"
    timeout = aiohttp.ClientTimeout(total=10)
    async with (aiohttp.ClientSession(timeout=timeout) as session,
                session.request(method, url, headers=headers or {}, data=data) as resp):
        return resp.status, resp.headers.get("Content-Type", ""), await resp.read()


async def raw_http(c, host: str, request: bytes) -> tuple[int, bytes]:
    """Bytes straight to the management port (Connection: close): the status and the body."""
    reader, writer = await asyncio.open_connection(c.bed.addr(host, "lan"), MGMT_PORT)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def expect_hangup(reader: asyncio.StreamReader, timeout: float = HANGUP) -> bytes:
    """Everything the other side sends until it closes the connection; fails if it keeps it open."""
    data = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(1 << 16):
                data += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        raise AssertionError(f"the connection is still open after {timeout}s (got {data[:200]!r})") from None
    return data


async def send_quietly(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write ``data``; the agent may hang up half way, which is what the tests want."""
    writer.write(data)
    with contextlib.suppress(ConnectionError):
        await writer.drain()


def run_in_ns(bed, ns: str, coro_fn, timeout: float = 30.0):
    """``coro_fn()`` on a fresh asyncio loop in a fresh thread inside namespace ``ns``; its result or its error."""
    outcome: dict = {}

    def target() -> None:
        try:
            with bed.in_ns(ns):
                outcome["value"] = asyncio.run(asyncio.wait_for(coro_fn(), timeout))
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"probe-{ns}", daemon=True)
    thread.start()
    thread.join(timeout + 5)
    assert not thread.is_alive(), f"the probe thread in {ns} did not finish"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def last_seq(c, host: str) -> int:
    code, events = c.call(host, "GET", "/v1/events?after=0&timeout=0")
    assert code == 200, events
    return max((e["seq"] for e in events), default=0)


# -- management API -------------------------------------------------------------------------------------------------


def test_missing_or_wrong_token_gets_401_and_nothing_else(healthy):
    c = healthy
    watch = LogWatch(c)
    body = json.dumps({"name": "in-unauth", "role": "secondary", "size": SIZE}).encode()
    wrong = [
        None,  # no Authorization header at all
        "",
        "Bearer ",
        "Bearer wrong-token",
        f"Bearer {c.token[:-1]}",
        f"Bearer {c.token}x",
        c.token,  # the token without its scheme
        f"Basic {c.token}",
        f"Bearer  {c.token}",
    ]
    routes = [("GET", "/v1/status", None), ("GET", "/v1/resources", None), ("POST", "/v1/resources", body),
              ("GET", "/v1/resources/in-unauth", None), ("DELETE", "/v1/resources/in-unauth", None),
              ("POST", "/v1/resources/in-unauth/promote", None), ("GET", "/metrics", None),
              ("GET", "/v1/events", None), ("GET", "/v1/events?after=0&timeout=5", None),
              ("GET", "/v1/events/stream", None), ("GET", "/no/such/route", None)]

    async def probe():
        answers = []
        for auth in wrong:
            headers = {} if auth is None else {"Authorization": auth}
            for method, path, data in routes:
                answers.append((auth, method, path, *await http(c, "hosta", method, path, headers, data)))
        return answers

    started = time.monotonic()
    for auth, method, path, status, ctype, raw in c.loop.run(probe()):
        assert status == 401, (auth, method, path, status, raw)
        assert ctype.startswith("application/json"), (auth, method, path, ctype)
        assert_error(status, json.loads(raw), 401, "token")
    # none of them waited for anything (the long poll and the stream are behind the guard) ...
    assert time.monotonic() - started < 20
    # ... nor did anything: the POST created nothing
    assert c.call("hosta", "GET", "/v1/resources/in-unauth")[0] == 404
    assert_alive(c)
    watch.check()


@pytest.mark.parametrize("auth", [
    pytest.param(b"Bearer \xff\xfe", id="not-utf8"),
    pytest.param("Bearer é".encode(), id="utf8"),
    pytest.param(None, id="token-and-utf8"),
])
def test_non_ascii_authorization_header_gets_401(healthy, auth):
    c = healthy
    watch = LogWatch(c)
    if auth is None:
        auth = b"Bearer " + c.token.encode() + "é".encode()
    request = b"GET /v1/status HTTP/1.1\r\nHost: am\r\nAuthorization: " + auth + b"\r\nConnection: close\r\n\r\n"
    status, body = c.loop.run(raw_http(c, "hosta", request))
    assert status == 401, (status, body)
    assert_error(status, json.loads(body), 401, "token")
    assert_alive(c)
    watch.check()


@pytest.mark.parametrize("raw", [
    b"{", b"not json", b"\xff\xfe\x00", b'{"name": "in-json", "role": "secondary"', b"[]", b"null", b'"in-json"',
    b"42", b'{"name": "in-json", "role": "secondary", "size": 4194304}}',
], ids=["brace", "text", "binary", "truncated", "array", "null", "string", "number", "trailing"])
def test_bad_json_body_gets_400(healthy, raw):
    c = healthy
    code, body = c.call("hosta", "POST", "/v1/resources", raw=raw)
    assert_error(code, body, 400)
    assert c.call("hosta", "GET", "/v1/resources/in-json")[0] == 404


def test_oversized_body_is_refused_with_json(healthy):
    c = healthy
    raw = json.dumps({"name": "in-big", "role": "secondary", "size": SIZE, "image": "/" + "x" * (100 << 10)})
    code, body = c.call("hosta", "POST", "/v1/resources", raw=raw.encode())
    assert_error(code, body, 413)
    assert_alive(c)


@pytest.mark.parametrize("fields, words", [
    ({"name": "in-fields", "role": "secondary", "size": SIZE, "colour": "red"}, ["colour"]),
    ({"name": "in-fields", "role": "secondary", "size": SIZE, "Name": "x"}, ["Name"]),
    ({"name": 5, "role": "secondary", "size": SIZE}, ["name"]),
    ({"name": ["in-fields"], "role": "secondary", "size": SIZE}, ["name"]),
    ({"name": "in-fields", "role": 1, "size": SIZE}, ["role"]),
    ({"name": "in-fields", "role": None, "size": SIZE}, ["role"]),
    ({"name": "in-fields", "role": "secondary", "size": SIZE, "image": 7}, ["image"]),
    ({"name": "in-fields", "role": "secondary", "size": SIZE, "peer": ["hostb"]}, ["peer"]),
    ({"role": "secondary", "size": SIZE}, ["name"]),
    ({"name": "in-fields", "size": SIZE}, ["role"]),
    ({}, ["name"]),
    ({"name": "in-fields", "role": "primary-ish", "size": SIZE}, ["role"]),
    ({"name": "in-fields", "role": "Primary", "size": SIZE}, ["role"]),
], ids=["unknown", "unknown-case", "name-int", "name-list", "role-int", "role-null", "image-int", "peer-list",
        "no-name", "no-role", "empty", "role-bad", "role-case"])
def test_bad_fields_get_400_with_a_sentence(healthy, fields, words):
    c = healthy
    code, body = c.call("hosta", "POST", "/v1/resources", fields)
    assert_error(code, body, 400, *words)
    assert c.call("hosta", "GET", "/v1/resources/in-fields")[0] == 404


@pytest.mark.parametrize("name", [
    "../x", "", "a" * 65, "x/y", "/x", ".x", "-x", "_x", "x y", "x\x00y", "é", "x\ty", "x%2Fy", "x;rm", "..",
], ids=["dotdot", "empty", "65-chars", "slash", "abs", "dot-first", "dash-first", "underscore-first", "space",
        "nul", "non-ascii", "tab", "percent", "semicolon", "dotdot-only"])
def test_bad_names_get_400(healthy, name):
    c = healthy
    for role in ("secondary", "primary"):  # the name is checked before the witness is asked anything
        code, body = c.call("hosta", "POST", "/v1/resources", {"name": name, "role": role, "size": SIZE})
        assert_error(code, body, 400, "name")
    code, listed = c.call("hosta", "GET", "/v1/resources")
    assert code == 200 and name not in [r["name"] for r in listed]


def test_name_with_trailing_newline_gets_400(healthy):
    c = healthy
    name = "in-newline\n"
    try:
        code, body = c.call("hosta", "POST", "/v1/resources", {"name": name, "role": "secondary", "size": SIZE})
        assert_error(code, body, 400, "name")
    finally:
        drop_resource(c, name)


def test_name_of_64_characters_is_accepted(healthy):
    c = healthy
    name = "in-" + "n" * 61
    try:
        code, body = c.call("hosta", "POST", "/v1/resources", {"name": name, "role": "secondary", "size": SIZE})
        assert code == 201 and body["name"] == name, body
    finally:
        drop_resource(c, name)


@pytest.mark.parametrize("size", [0, -1, -512, 513, 4095, "1M", "4194304", True, False, 4194304.0, 1.5, [SIZE],
                                  {"bytes": SIZE}, (1 << 44) + 512, 1 << 45, 2**64, 2**70, -(2**64)],
                         ids=lambda v: repr(v)[:20])
def test_bad_sizes_get_400(healthy, size):
    c = healthy
    for role in ("secondary", "primary"):
        code, body = c.call("hosta", "POST", "/v1/resources", {"name": "in-size", "role": role, "size": size})
        assert_error(code, body, 400, "size")
    assert c.call("hosta", "GET", "/v1/resources/in-size")[0] == 404


def test_bad_image_paths_get_400(healthy):
    c = healthy
    watch = LogWatch(c)
    small = c.workdir / "in-small.img"
    small.write_bytes(bytes(4096))
    odd = c.workdir / "in-odd.img"
    odd.write_bytes(bytes(1000))
    cases = [
        ({"image": "in-rel.img", "size": SIZE}, "absolute"),
        ({"image": "./in-rel.img", "size": SIZE}, "absolute"),
        ({"image": "../in-rel.img", "size": SIZE}, "absolute"),
        ({"image": str(c.workdir), "size": SIZE}, "regular file"),
        ({"image": str(c.workdir) + "/", "size": SIZE}, "regular file"),
        ({"image": "/", "size": SIZE}, "regular file"),
        ({"image": "/dev/null", "size": SIZE}, "regular file"),
        ({"image": "/dev/zero"}, "regular file"),
        ({"image": str(small), "size": SIZE}, "less than"),
        ({"image": str(odd)}, "size"),  # its own size: not a multiple of 512
        ({"image": str(c.workdir / "in-absent.img")}, "size"),  # a new image without a size
        ({"image": str(c.workdir / "no-such-dir" / "in-x.img"), "size": SIZE}, "cannot create"),
        ({"image": str(small / "in-x.img"), "size": SIZE}, "cannot create"),  # a file as its directory
    ]
    for fields, words in cases:
        code, body = c.call("hosta", "POST", "/v1/resources", {"name": "in-image", "role": "secondary", **fields})
        assert_error(code, body, 400, words)
        assert c.call("hosta", "GET", "/v1/resources/in-image")[0] == 404
    assert small.stat().st_size == 4096 and odd.stat().st_size == 1000  # refused images were not touched
    assert not (c.workdir / "in-absent.img").exists()
    assert_alive(c)
    watch.check()


def test_refused_primary_create_leaves_the_name_free(healthy):
    c = healthy
    name = "in-leak"
    try:
        code, body = c.call("hosta", "POST", "/v1/resources", {
            "name": name, "role": "primary", "size": SIZE, "image": str(c.workdir / "no-such-dir" / "x.img")})
        assert_error(code, body, 400, "cannot create")
        deadline = time.monotonic() + 5
        while True:  # a lease given meanwhile would have expired by then
            code, body = c.call("hostb", "POST", "/v1/resources", {"name": name, "role": "primary", "size": SIZE})
            if code == 201 or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        assert code == 201, body
    finally:
        drop_resource(c, name)


def test_duplicate_name_gets_409(healthy):
    c = healthy
    try:
        code, body = c.call("hosta", "POST", "/v1/resources", {"name": "in-dup", "role": "secondary", "size": SIZE})
        assert code == 201, body
        for role, size in (("secondary", SIZE), ("primary", SIZE), ("secondary", 2 * SIZE)):
            code, body = c.call("hosta", "POST", "/v1/resources", {"name": "in-dup", "role": role, "size": size})
            assert_error(code, body, 409, "in-dup", "exists")
        code, body = c.call("hosta", "GET", "/v1/resources/in-dup")
        assert code == 200 and body["size"] == SIZE and body["role"] == "Secondary", body
    finally:
        drop_resource(c, "in-dup")


def test_unknown_resource_route_or_action_gets_404(healthy):
    c = healthy
    for method, path in [("GET", "/v1/resources/in-nothing"), ("DELETE", "/v1/resources/in-nothing"),
                         ("POST", "/v1/resources/in-nothing/promote"), ("POST", "/v1/resources/in-nothing/demote"),
                         ("POST", "/v1/resources/in-nothing/verify"), ("POST", "/v1/resources/in-nothing/x"),
                         ("GET", "/v1/resources/..%2F..%2Fetc"), ("GET", "/v2/status"), ("GET", "/")]:
        code, body = c.call("hosta", method, path)
        assert_error(code, body, 404)
    try:
        code, body = c.call("hosta", "POST", "/v1/resources", {"name": "in-action", "role": "secondary",
                                                               "size": SIZE})
        assert code == 201, body
        for verb in ("explode", "PROMOTE", "status", "..", "promote%20"):
            code, body = c.call("hosta", "POST", f"/v1/resources/in-action/{verb}")
            assert_error(code, body, 404)
        # a known path with the wrong method: 405, still JSON
        code, body = c.call("hosta", "PUT", "/v1/resources/in-action")
        assert_error(code, body, 405)
        code, body = c.call("hosta", "GET", "/v1/resources/in-action/promote")
        assert_error(code, body, 405)
    finally:
        drop_resource(c, "in-action")


def test_peer_naming_another_host_gets_400(healthy):
    c = healthy
    for peer in ("hostc", "hosta", "", "HOSTB", "hostb "):
        code, body = c.call("hosta", "POST", "/v1/resources", {"name": "in-peer", "role": "secondary",
                                                               "size": SIZE, "peer": peer})
        assert_error(code, body, 400, "hostb")
        assert c.call("hosta", "GET", "/v1/resources/in-peer")[0] == 404
    try:
        code, body = c.call("hosta", "POST", "/v1/resources", {"name": "in-peer", "role": "secondary",
                                                               "size": SIZE, "peer": "hostb"})
        assert code == 201, body
    finally:
        drop_resource(c, "in-peer")


def test_actions_in_the_wrong_role_or_state_get_409(healthy):
    c = healthy
    watch = LogWatch(c)
    with pair(c, "in-roles") as name:
        base = f"/v1/resources/{name}"
        # verify, resync and swap run on the primary only
        for verb in ("verify", "resync", "swap"):
            code, body = c.call("hostb", "POST", f"{base}/{verb}")
            assert_error(code, body, 409)
        # demoting a secondary changes nothing
        code, body = c.call("hostb", "POST", f"{base}/demote")
        assert code == 200 and body["role"] == "Secondary", body
        # promoting the secondary while the peer is primary and connected: refused, with the way out
        code, body = c.call("hostb", "POST", f"{base}/promote")
        assert_error(code, body, 409, "primary", "swap")
        # the primary cannot be deleted, nor can its data be discarded
        code, body = c.call("hosta", "DELETE", base)
        assert_error(code, body, 409, "primary", "demote")
        code, body = c.call("hosta", "POST", f"{base}/discard-my-data", {"confirm": name})
        assert_error(code, body, 409, "primary")
        # a healthy disk cannot be "repaired"
        code, body = c.call("hosta", "POST", f"{base}/disk-repaired")
        assert_error(code, body, 409, "UpToDate")
        # bodies of actions are checked like the others
        for verb, raw in (("discard-my-data", b"{"), ("discard-my-data", b'{"confirm": "in-other"}'),
                          ("discard-my-data", b"{}"), ("discard-my-data", b'{"confirm": 1}'),
                          ("fault", b'{"disk": "explode"}'), ("fault", b'{"disk": "fail", "x": 1}'),
                          ("fault", b'{"disk": "Stall"}'),
                          ("fault", b"[1]")):
            code, body = c.call("hostb", "POST", f"{base}/{verb}", raw=raw)
            assert_error(code, body, 400)
        # nothing of it changed the pair
        for host, role in (("hosta", "Primary"), ("hostb", "Secondary")):
            s = c.status(host, name)
            assert s["role"] == role and s["disk"] == "UpToDate" and s["connection"] == "Connected", (host, s)
        assert c.wait_in_sync(name) == "hosta"
    assert_alive(c)
    watch.check()


@pytest.mark.parametrize("query", ["after=abc", "after=1.5", "after=", "timeout=abc", "after=0&timeout=1s",
                                   "after=0x10"])
def test_bad_event_parameters_get_400(healthy, query):
    c = healthy
    code, body = c.call("hosta", "GET", f"/v1/events?{query}")
    assert_error(code, body, 400)


def test_bad_event_stream_parameters_get_400(healthy):
    c = healthy
    auth = {"Authorization": f"Bearer {c.token}"}

    async def probe():
        answers = []
        for path, extra in (("/v1/events/stream?after=abc", {}), ("/v1/events/stream", {"Last-Event-ID": "abc"}),
                            ("/v1/events/stream", {"Last-Event-ID": ""}),
                            ("/v1/events/stream?after=0", {"Last-Event-ID": "1.5"})):
            answers.append(await http(c, "hosta", "GET", path, {**auth, **extra}))
        return answers

    for status, _, raw in c.loop.run(probe()):
        assert_error(status, json.loads(raw), 400)


def test_odd_but_valid_event_parameters_answer_at_once(healthy):
    c = healthy
    started = time.monotonic()
    for query in ("after=-5&timeout=0", "after=0&timeout=-3", "after=0&timeout=nan", "after=99999999999999999999"
                  "&timeout=0", "after=0&timeout=inf&x=1"):
        code, body = c.call("hosta", "GET", f"/v1/events?{query}")
        assert code == 200 and isinstance(body, list), (query, code, body)
    assert time.monotonic() - started < 5


def test_agent_still_answers_status_after_bad_input(healthy):
    c = healthy
    assert_alive(c)
    for host in HOSTS:
        code, body = c.call(host, "GET", "/v1/status")
        assert body["peer"]["state"] == "connected", body
        leftovers = [r for r in body["resources"] if r.startswith("in-")]
        assert leftovers == [], f"{host} still has {leftovers}"


# -- metrics and the change feed ------------------------------------------------------------------------------------


METRIC_LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="[^"\\\n]*"'
                         r'(,[a-zA-Z_][a-zA-Z0-9_]*="[^"\\\n]*")*\})? -?(\d+(\.\d+)?([eE][-+]?\d+)?|NaN|[+-]Inf)$')


def test_metrics_are_prometheus_text_with_link_and_resource_gauges(healthy):
    c = healthy
    with pair(c, "in-metrics") as name:
        for host, primary in (("hosta", 1), ("hostb", 0)):
            status, ctype, raw = c.loop.run(http(c, host, "GET", "/metrics",
                                                 {"Authorization": f"Bearer {c.token}"}))
            assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
            text = raw.decode()
            assert text.endswith("\n")
            samples = {}
            for line in text.splitlines():
                if line.startswith("#"):
                    assert re.match(r"^# (HELP|TYPE) [a-z_]+ .+$", line), line
                    continue
                assert METRIC_LINE.match(line), f"not a Prometheus sample: {line!r}"
                key, value = line.rsplit(" ", 1)
                samples[key] = float(value)
            assert samples['eac_am_link_up{link="a"}'] == 1, text
            assert samples['eac_am_link_up{link="b"}'] == 1, text
            assert samples[f'eac_am_primary{{resource="{name}"}}'] == primary, text
            assert samples[f'eac_am_uptodate{{resource="{name}"}}'] == 1, text
            for gauge in ("eac_am_in_flight", "eac_am_dirty_regions", "eac_am_split_brain", "eac_am_nbd_clients",
                          "eac_am_replication_lag_seconds", "eac_am_resync_done_regions",
                          "eac_am_resync_total_regions"):
                assert f'{gauge}{{resource="{name}"}}' in samples, (gauge, text)
                assert f"# TYPE {gauge} gauge" in text


def test_events_list_state_changes(healthy):
    c = healthy
    with pair(c, "in-events") as name:
        code, events = c.call("hosta", "GET", "/v1/events?after=0&timeout=0")
        assert code == 200 and isinstance(events, list) and events, events
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
        for e in events:
            assert {"seq", "time", "node", "kind", "resource"} <= set(e), e
            assert e["node"] == "hosta", e
        mine = [e for e in events if e["kind"] == "state" and e["resource"] == name]
        changes = {(e["component"], e["old"], e["new"]) for e in mine}
        assert ("role", "Secondary", "Primary") in changes, mine
        assert ("io", "Unavailable", "Running") in changes, mine
        for e in mine:
            assert isinstance(e["why"], str) and e["why"], e
        assert any(e["kind"] == "resource" and e["resource"] == name and e["action"] == "created" for e in events)
        # nothing after the last one: an empty list at once, or after the long poll's timeout
        last = seqs[-1]
        code, after = c.call("hosta", "GET", f"/v1/events?after={last + 1000}&timeout=0")
        assert code == 200 and after == [], after
        started = time.monotonic()
        code, after = c.call("hosta", "GET", f"/v1/events?after={last_seq(c, 'hosta') + 1000}&timeout=0.3")
        assert code == 200 and after == [] and 0.2 < time.monotonic() - started < 5, after
        # and only the later ones after a sequence number
        code, later = c.call("hosta", "GET", f"/v1/events?after={seqs[len(seqs) // 2]}&timeout=0")
        assert [e["seq"] for e in later][: len(seqs) - len(seqs) // 2 - 1] == seqs[len(seqs) // 2 + 1:]


async def read_sse(resp: aiohttp.ClientResponse, want) -> list[dict]:
    """The events of an SSE stream up to the first one ``want`` accepts (each with its id and event fields)."""
    seen, fields = [], {}
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith(":"):
            continue
        if line:
            key, _, value = line.partition(": ")
            fields[key] = value
            continue
        if "data" in fields:
            event = json.loads(fields["data"])
            assert int(fields["id"]) == event["seq"] and fields["event"] == event["kind"], fields
            seen.append(event)
            if want(event):
                return seen
        fields = {}
    raise AssertionError(f"the stream ended; events seen: {seen}")


def test_event_stream_delivers_a_change_within_seconds(healthy):
    c = healthy
    name = "in-sse"
    url = f"http://{c.bed.addr('hosta', 'lan')}:{MGMT_PORT}/v1/events/stream"
    auth = {"Authorization": f"Bearer {c.token}"}
    start = last_seq(c, "hosta")

    def created(event: dict) -> bool:
        return event["kind"] == "resource" and event["resource"] == name and event.get("action") == "created"

    async def run():
        timeout = aiohttp.ClientTimeout(total=20)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(url, params={"after": str(start)}, headers=auth) as resp:
                assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
                code, body = await c.acall("hosta", "POST", "/v1/resources",
                                           {"name": name, "role": "secondary", "size": SIZE})
                assert code == 201, body
                posted = time.monotonic()
                seen = await asyncio.wait_for(read_sse(resp, created), 5)
                latency = time.monotonic() - posted
            # resuming with Last-Event-ID: the stream starts right after it
            target = seen[-1]["seq"]
            async with session.get(url, headers={**auth, "Last-Event-ID": str(target - 1)}) as resp:
                again = await asyncio.wait_for(read_sse(resp, lambda e: True), 5)
        return seen, latency, again, target

    try:
        seen, latency, again, target = c.loop.run(run(), timeout=40)
        assert latency < 3.0, latency
        assert all(e["seq"] > start for e in seen), seen
        assert again[0]["seq"] == target and created(again[0]), again
    finally:
        drop_resource(c, name)
    assert_alive(c)


# -- NBD ----------------------------------------------------------------------------------------------------------


async def nbd_raw(c, host: str, after_greeting: bytes) -> bytes:
    """Read the greeting, send ``after_greeting``, and return what the agent sends until it hangs up."""
    reader, writer = await asyncio.open_connection(*c.nbd(host))
    try:
        magic, opt_magic, _ = GREETING.unpack(await asyncio.wait_for(reader.readexactly(GREETING.size), 5))
        assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
        await send_quietly(writer, after_greeting)
        return await expect_hangup(reader)
    finally:
        writer.close()


async def nbd_transmission_raw(c, host: str, name: str, data: bytes) -> bytes:
    """Agree on an export with NBD_OPT_GO, send ``data`` as requests, return what comes back until the hang-up."""
    reader, writer = await handshake(*c.nbd(host))
    try:
        await send_option(reader, writer, Opt.GO, go_data(name))
        await send_quietly(writer, data)
        return await expect_hangup(reader)
    finally:
        writer.close()


async def still_serves(c, name: str) -> None:
    client = await c.connect("hosta", name)
    try:
        await client.write(8192, b"\x5a" * 4096)
        assert await client.read(8192, 4096) == b"\x5a" * 4096
    finally:
        await client.close()


def test_nbd_garbage_is_hung_up_on_and_the_agent_keeps_serving(healthy):
    c = healthy
    watch = LogWatch(c)
    flags = ClientFlag.FIXED_NEWSTYLE.to_bytes(4, "big")
    with pair(c, "in-nbd-garbage") as name:
        async def run():
            for junk in (b"GARBAGE!" * 64,  # unknown client flags
                         bytes(range(256)) * 4,
                         (0xFFFFFFFF).to_bytes(4, "big"),
                         flags + b"\xde\xad\xbe\xef" * 64,  # a bad option magic
                         flags + OPTION.pack(IHAVEOPT, Opt.GO, 1 << 30),  # an option of 1 GiB
                         flags + OPTION.pack(IHAVEOPT, 0xFFFFFFFF, 0xFFFFFFFF)):
                answer = await nbd_raw(c, "hosta", junk)
                assert answer == b"", (junk[:16], answer[:64])
            # garbage once in transmission: a bad request magic
            await nbd_transmission_raw(c, "hosta", name, b"\x00" * REQUEST.size * 4)
            await nbd_transmission_raw(c, "hosta", name, os.urandom(1 << 16))
            await still_serves(c, name)
        c.loop.run(run())
        assert c.wait_in_sync(name) == "hosta"
    assert_alive(c)
    watch.check()


def test_nbd_out_of_range_requests_get_errors_and_the_connection_lives(healthy):
    c = healthy
    watch = LogWatch(c)
    with pair(c, "in-nbd-range") as name:
        async def run():
            client = await c.connect("hosta", name)
            try:
                assert client.size == SIZE
                refusals = [
                    (client.read(SIZE - 512, 1024), {errno.EINVAL}),
                    (client.read(SIZE, 1), {errno.EINVAL}),
                    (client.read(2**64 - 512, 512), {errno.EINVAL}),
                    (client.read(0, MAX_PAYLOAD + 1), {errno.EINVAL, errno.EOVERFLOW}),
                    (client.trim(SIZE - 512, 1024), {errno.EINVAL}),
                    # a write past the end: ENOSPC, as the NBD spec asks ("SHOULD return NBD_ENOSPC")
                    (client.write(SIZE - 512, b"x" * 1024), {errno.ENOSPC}),
                    (client.write(2**64 - 512, b"x" * 512), {errno.ENOSPC}),
                    (client.write_zeroes(SIZE, 512), {errno.ENOSPC}),
                    (client.request(42, 0, 512), {errno.EINVAL}),  # no such command
                    (client.request(Cmd.BLOCK_STATUS, 0, 512), {errno.EINVAL}),  # not negotiated
                    (client.request(Cmd.WRITE_ZEROES, 0, 512, flags=CmdFlag.FAST_ZERO), {errno.EINVAL}),
                    (client.request(Cmd.READ, 0, 512, flags=0x8000), {errno.EINVAL}),
                ]
                for request, expected in refusals:
                    with pytest.raises(NBDReplyError) as err:
                        await request
                    assert err.value.errno in expected, (err.value, expected)
                # the largest write the agent takes, past the end of this export: its payload is read through,
                # refused, and the stream stays in step
                with pytest.raises(NBDReplyError) as err:
                    await client.write(0, bytes(MAX_PAYLOAD))
                assert err.value.errno == errno.ENOSPC
                # the same connection still works, and nothing was written out of range
                await client.write(0, b"\xa5" * 4096, fua=True)
                assert await client.read(0, 4096) == b"\xa5" * 4096
                assert await client.read(SIZE - 512, 512) == bytes(512)
                assert await client.read(SIZE, 0) == b""
            finally:
                await client.close()
        c.loop.run(run())
        assert c.wait_in_sync(name) == "hosta"
        assert c.image_digest("hosta", name) == c.image_digest("hostb", name)
    assert_alive(c)
    watch.check()


def test_nbd_export_on_the_secondary_is_refused_naming_the_primary(healthy):
    c = healthy
    with pair(c, "in-nbd-second") as name:
        async def run():
            with pytest.raises(NBDOptionError) as err:
                await c.connect("hostb", name)
            for opt in (Opt.INFO, Opt.GO):
                reader, writer = await handshake(*c.nbd("hostb"))
                try:
                    with pytest.raises(NBDOptionError) as info:
                        await send_option(reader, writer, opt, go_data(name))
                    assert info.value.reply == Rep.ERR_POLICY and "hosta" in info.value.message
                    # the refusal leaves the negotiation open: an unknown export, then a clean abort
                    with pytest.raises(NBDOptionError) as unknown:
                        await send_option(reader, writer, Opt.GO, go_data("in-no-such-export"))
                    assert unknown.value.reply == Rep.ERR_UNKNOWN
                    await send_option(reader, writer, Opt.ABORT)
                finally:
                    writer.close()
            # the old-style option cannot carry an error: the agent hangs up
            answer = await nbd_raw(c, "hostb", ClientFlag.FIXED_NEWSTYLE.to_bytes(4, "big")
                                   + OPTION.pack(IHAVEOPT, Opt.EXPORT_NAME, len(name)) + name.encode())
            assert answer == b""
            await still_serves(c, name)
            return err.value
        refusal = c.loop.run(run())
        assert refusal.reply == Rep.ERR_POLICY, refusal
        assert "hosta" in refusal.message and "primary" in refusal.message, refusal.message
    assert_alive(c)


def test_nbd_write_over_32_mib_drops_the_connection(healthy):
    c = healthy
    watch = LogWatch(c)
    with pair(c, "in-nbd-huge") as name:
        async def run():
            for length in (MAX_PAYLOAD + 1, 1 << 30, 0xFFFFFFFF):
                header = REQUEST.pack(REQUEST_MAGIC, 0, Cmd.WRITE, 1, 0, length)
                answer = await nbd_transmission_raw(c, "hosta", name, header + bytes(1 << 16))
                assert answer == b"", answer[:64]  # no reply: the connection is dropped
            await still_serves(c, name)
        c.loop.run(run())
        assert c.wait_in_sync(name) == "hosta"
    assert_alive(c)
    watch.check()


# -- peer links ---------------------------------------------------------------------------------------------------


def frame(body: bytes) -> bytes:
    return wire.FRAME.pack(len(body)) + body


def link_probes() -> list[tuple[str, bytes]]:
    encode = msgspec.msgpack.encode
    return [
        ("http", b"GET / HTTP/1.0\r\n\r\n" + b"x" * 64),
        ("random", os.urandom(4096)),
        ("zero-frame", frame(b"")),
        ("2-GiB-header", wire.FRAME.pack(2 << 30) + b"\x00" * 64),
        ("max-header", wire.FRAME.pack(0xFFFFFFFF)),
        ("just-over-the-limit", wire.FRAME.pack(wire.MAX_FRAME + 1) + b"\x00" * 64),
        ("msgpack-garbage", frame(b"\xc1" * 32)),
        ("msgpack-map", frame(encode({"type": "hello", "node": "hostb"}))),
        ("msgpack-int", frame(encode(12345))),
        ("hello-wrong-types", frame(encode({"type": "hello", "node": 1, "link": ["a"], "boot": None}))),
        ("torn-frame", wire.FRAME.pack(200) + b"\x00" * 10),  # then silence: closed after the link timeout
        ("heartbeat-first", wire.encode(wire.Heartbeat(sent=1.0))),
        ("rep-first", wire.encode(wire.Rep("in-links", 1, 1, int(wire.Op.WRITE), 0, 4, b"evil"))),
        ("hello-stranger", wire.encode(wire.Hello("hostc", "a", "stranger"))),
        ("hello-empty", wire.encode(wire.Hello("", "", ""))),
    ]


def self_hello(node: str) -> list[tuple[str, bytes]]:
    """Hellos a host's own peer could never send on link a: its own name, or the peer's on the wrong link."""
    other = "hostb" if node == "hosta" else "hosta"
    return [(f"hello-as-{node}", wire.encode(wire.Hello(node, "a", "myself"))),
            ("hello-wrong-link", wire.encode(wire.Hello(other, "b", "elsewhere"))),
            ("hello-unknown-link", wire.encode(wire.Hello(other, "c", "elsewhere")))]


async def probe_link(addr: str, data: bytes) -> tuple[bytes, float]:
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(addr, LINK_PORT)
    try:
        await send_quietly(writer, data)
        answer = await expect_hangup(reader)
    finally:
        writer.close()
    return answer, time.monotonic() - started


def test_garbage_on_a_peer_link_is_refused_and_the_real_link_stays_up(healthy):
    c = healthy
    watch = LogWatch(c)
    with pair(c, "in-links") as name:
        marks = {host: last_seq(c, host) for host in HOSTS}
        # hosta's link-a address from hostb's namespace (hosta dials, so this is a stranger at its listener), and
        # hostb's from hosta's (hostb accepts the real link there: the stranger must not replace it)
        for target, source in (("hosta", "hostb"), ("hostb", "hosta")):
            addr = c.bed.addr(target, "a")
            for what, data in [*link_probes(), *self_hello(target)]:
                answer, took = run_in_ns(c.bed, source, lambda a=addr, d=data: probe_link(a, d),
                                         timeout=HANGUP + 5)
                assert answer == b"", (target, what, answer[:64])  # not even a hello back
                assert took < 3.0, (target, what, took)
        # the real links never noticed
        for host in HOSTS:
            code, status = c.call(host, "GET", "/v1/status")
            assert code == 200, status
            assert status["peer"]["state"] == "connected", status
            assert {link: s["state"] for link, s in status["peer"]["links"].items()} == {"a": "Up", "b": "Up"}
            code, events = c.call(host, "GET", f"/v1/events?after={marks[host]}&timeout=0")
            downs = [e for e in events if e.get("state") == "lost" or e.get("new") == "Down"]
            assert downs == [], (host, downs)

        # a replicated write still completes on both replicas
        async def write():
            client = await c.connect("hosta", name)
            try:
                started = time.monotonic()
                await client.write(0, b"\x3c" * 65536, fua=True)
                await client.flush()
                return time.monotonic() - started
            finally:
                await client.close()
        assert c.loop.run(write()) < 2.0
        assert c.wait_in_sync(name) == "hosta"
        assert c.image_digest("hosta", name) == c.image_digest("hostb", name)
    assert_alive(c)
    for host in HOSTS:
        assert "refused" in watch.new(host)  # the agents said why they hung up
    watch.check()


# -- configuration ------------------------------------------------------------------------------------------------


TOKEN = "0123456789abcdef0123"
# TEST-NET-1 addresses (RFC 5737): were a bad configuration ever accepted, the agent could neither bind nor reach
# anything on this machine, and would stop at once with "am: cannot start"
BASE = f"""\
node = "n1"
data_dir = "data"
[management]
listen = "192.0.2.1:7480"
token = "{TOKEN}"
[nbd]
listen = "192.0.2.1:10809"
[links]
a = "192.0.2.1:7481"
b = "192.0.2.2:7481"
[peer]
name = "n2"
a = "192.0.2.3:7481"
b = "192.0.2.4:7481"
[witness]
url = "http://192.0.2.9:7490"
token = "{TOKEN}"
"""


def _without_peer(text: str) -> str:
    return re.sub(r"\[peer\]\n(?:[^\[].*\n)*", "", text)


CONFIG_CASES = [
    pytest.param("missing", None, "cannot read", id="missing-file"),
    pytest.param("directory", None, "cannot read", id="config-is-a-directory"),
    pytest.param("text", 'node = "n1\n[peer\n', "not valid TOML", id="invalid-toml"),
    pytest.param("text", "", "missing required field", id="empty-file"),
    pytest.param("text", _without_peer(BASE), "peer", id="missing-peer"),
    pytest.param("text", 'colour = "red"\n' + BASE, "colour", id="unknown-key"),
    pytest.param("text", BASE + "[timers]\nheartbeat = 100\n", "heartbeat", id="unknown-key-in-timers"),
    pytest.param("text", BASE + "[nbd2]\nlisten = 1\n", "nbd2", id="unknown-table"),
    pytest.param("text", BASE.replace('node = "n1"', "node = 5"), "node", id="wrong-type"),
    pytest.param("text", BASE.replace('name = "n2"', 'name = "n1"'), "peer", id="peer-is-node"),
    pytest.param("text", BASE.replace(f'token = "{TOKEN}"', 'token = "short-token"', 1), "16 characters",
                 id="short-token"),
    pytest.param("text", BASE.replace(f'token = "{TOKEN}"', 'token_file = "absent.token"', 1), "absent.token",
                 id="token-file-missing"),
    pytest.param("text", BASE.replace(f'token = "{TOKEN}"', f'token = "{TOKEN}"\ntoken_file = "x"', 1), "either",
                 id="token-twice"),
    pytest.param("text", BASE + "[timers]\nheartbeat_ms = 100\nlink_timeout_ms = 150\n", "link_timeout_ms",
                 id="link-timeout-below-2x-heartbeat"),
    pytest.param("text", BASE + "[timers]\nheartbeat_ms = 0\nlink_timeout_ms = 150\n", "heartbeat",
                 id="heartbeat-zero"),
    pytest.param("text", BASE + "[disk]\nbitmap_region_kib = 3\n", "bitmap_region_kib", id="bitmap-region-3"),
    pytest.param("text", BASE + "[disk]\nbitmap_region_kib = 0\n", "bitmap_region_kib", id="bitmap-region-0"),
    pytest.param("text", BASE + "[checkpoint]\nlease_ms = 100\n", "checkpoint.lease_ms", id="checkpoint-lease-short"),
    pytest.param("text", BASE + "[checkpoint]\nlease_ms = \"400\"\n", "lease_ms", id="checkpoint-lease-text"),
    pytest.param("text", BASE.replace('"192.0.2.1:7480"', '"localhost"'), "management.listen", id="no-port"),
    pytest.param("text", BASE.replace('"192.0.2.1:10809"', '"192.0.2.1:70000"'), "nbd.listen",
                 id="port-out-of-range"),
    pytest.param("text", BASE.replace('"192.0.2.1:7481"', '":7481"'), "links.a", id="no-host"),
    pytest.param("bytes", BASE.encode() + b'# caf\xe9\n', "utf-8", id="config-not-utf8"),
    pytest.param("token-bytes", b"\xff" * 32, "token", id="token-file-not-utf8"),
    pytest.param("text", BASE.replace('"192.0.2.1:7480"', '"192.0.2.1:\u00b9\u00b2"'), "management.listen",
                 id="port-superscript-digits"),
]


def test_the_base_configuration_is_valid(tmp_path):
    path = tmp_path / "am.toml"
    path.write_text(BASE)
    cfg = config.load(path)  # so every case below fails for its one change
    assert cfg.node == "n1" and cfg.peer == "n2"


@pytest.mark.parametrize("kind, content, words", CONFIG_CASES)
def test_config_error_exits_with_one_line(tmp_path, kind, content, words):
    path = tmp_path / "am.toml"
    if kind == "text":
        path.write_text(content)
    elif kind == "bytes":
        path.write_bytes(content)
    elif kind == "token-bytes":
        (tmp_path / "bad.token").write_bytes(content)
        path.write_text(BASE.replace(f'token = "{TOKEN}"', 'token_file = "bad.token"', 1))
    elif kind == "directory":
        path.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "am", "--config", str(path)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the agent started instead of refusing its configuration: {exc.stderr}") from None
    took = time.monotonic() - started
    assert proc.returncode != 0, proc
    assert took < 10, took
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("am: "), proc.stderr
    assert words.lower() in lines[0].lower(), lines[0]
    assert proc.stdout == "", proc.stdout
    assert not (tmp_path / "data").exists()  # refused before touching anything
