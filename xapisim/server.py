"""HTTP front end: one listener per simulated host, and the ``Simulator`` API.

Each host listens on its own address (127.0.0.1, .2, …) on the same port,
so a client can fail over between hosts as with a real pool.  XML-RPC is
answered on every path but ``/jsonrpc`` (JSON-RPC) and ``/sim/`` (the control
API); xapi matches handlers by longest prefix, so Xen Orchestra's ``/xmlrpc``
works.  HTTP/1.1 keep-alive.  Bad input never takes the server down:
unparsable bodies get xapi's HTTP 500 page, a bad call a Failure.

For tests::

    sim = Simulator(preset="demo", port=0, op_delay=0.0)
    sim.start()
    XenAPI.Session(sim.url) ...
    sim.stop()
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from . import faults, presets
from .engine import Config, Engine
from .errors import XapiError
from .methods import register_all
from .wire import (
    INTERNAL_ERROR_HTML,
    ParseError,
    json_failure,
    json_success,
    parse_json_call,
    parse_xml_call,
    warm,
    xml_bare,
    xml_failure,
    xml_success,
)

log = logging.getLogger("xapisim")

# Cap request bodies like xapi does (its limit is in the same range): a
# runaway client must not exhaust memory.
MAX_BODY = 64 << 20


class _HostServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], engine: Engine, host: str | None) -> None:
        self.engine = engine
        # None: an extra address that answers as the pool's master, whichever host that is (the live bed's
        # uplink, where the hosts' own tools reach XAPI as a real host reaches its pool's).
        self.fixed_host = host
        self.connections: set[socket.socket] = set()
        # Connections carrying a /sim/ request: a host crashed through its own
        # control API must still answer that request.
        self.control: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    @property
    def host(self) -> str:
        return self.fixed_host if self.fixed_host is not None else self.engine.master()

    def drop_connections(self) -> None:
        """A crashed host's open connections die with it."""
        with self.connections_lock:
            conns = list(self.connections - self.control)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HostServer
    server_version = "xapisim"
    sys_version = ""
    # An answer's headers and body are buffered and leave in one write when the request is done (a send is
    # most of the cost of a small call); a body larger than the buffer is written straight after the headers.
    wbufsize = 1 << 16

    def setup(self) -> None:
        super().setup()
        # A large answer still goes out in several writes: without this, Nagle's algorithm
        # and the client's delayed ACK add 40 ms to it.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    # -- plumbing ---------------------------------------------------------

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY:
                    return None
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return None
        if length < 0 or length > MAX_BODY:
            return None
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status, "Internal Error" if status == 500 else None)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "X-Requested-With")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        if status >= 500:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _internal_error(self, detail: str) -> None:
        html = INTERNAL_ERROR_HTML.format(detail.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;"))
        self._send(500, html.encode(), "text/html", {"Cache-Control": "no-cache, no-store"})

    # -- verbs ------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        if self.path.startswith("/sim/"):
            self._sim(b"")
        else:
            self._send(404, b"<html><body><h1>HTTP 404 not found</h1></body></html>", "text/html")

    def do_OPTIONS(self) -> None:  # noqa: N802
        self._send(200, b"", "text/plain", {"Access-Control-Allow-Methods": "POST, GET, OPTIONS"})

    def do_POST(self) -> None:  # noqa: N802
        body = self._read_body()
        if body is None:
            self._internal_error("bad or too large request body")
            return
        path = self.path
        if path.startswith("/sim/") or path == "/sim":
            self._sim(body)
        elif path.startswith("/jsonrpc"):
            self._jsonrpc(body)
        else:
            self._xmlrpc(body)

    def _sim(self, body: bytes) -> None:
        server = self.server
        with server.connections_lock:
            server.control.add(self.connection)
        try:
            status, payload = faults.handle(server.engine, self.command, self.path, body)
        finally:
            with server.connections_lock:
                server.control.discard(self.connection)
        if not server.engine.is_up(server.host):
            self.close_connection = True  # this host just went down
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _call(self, method: str, params: list[Any]) -> tuple[Any, XapiError | None]:
        start = time.monotonic()
        try:
            host = self.server.host
            if self.server.fixed_host is None and not self.server.engine.is_up(host):
                # the master crashed and no new one is elected yet: nobody answers for the pool
                raise XapiError("HOST_OFFLINE", host)
            value = self.server.engine.call(host, method, params)
            error = None
        except XapiError as e:
            value, error = None, e
        except Exception as e:  # never let a bug in a handler take the server down
            log.exception("call %s failed", method)
            value, error = None, XapiError("INTERNAL_ERROR", repr(e))
        if log.isEnabledFor(logging.DEBUG):
            outcome = "ok" if error is None else " ".join(error.description)
            log.debug(
                "%s %s -> %s (%.1f ms)",
                self.server.engine.addresses.get(self.server.host, "?"),
                method,
                outcome,
                (time.monotonic() - start) * 1000,
            )
        return value, error

    def _xmlrpc(self, body: bytes) -> None:
        try:
            method, params = parse_xml_call(body)
        except ParseError as e:
            self._internal_error(str(e))
            return
        value, error = self._call(method, params)
        if error is not None:
            out = xml_failure(error.description)
        elif method == "system.listMethods":
            out = xml_bare(value)  # xapi answers this one without the Status struct
        else:
            out = xml_success(value)
        self._send(200, out, "text/xml")

    def _jsonrpc(self, body: bytes) -> None:
        try:
            version, rid, method, params = parse_json_call(body)
        except ParseError as e:
            self._internal_error(str(e))
            return
        value, error = self._call(method, params)
        out = json_failure(version, rid, error.description) if error else json_success(version, rid, value)
        self._send(200, out, "application/json")


class Simulator:
    """A simulated pool served over HTTP, in background threads."""

    def __init__(
        self,
        preset: str = "demo",
        *,
        hosts: int | None = None,
        vms: int | None = None,
        seed: int = 1,
        port: int = 8086,
        bind: str = "127.0.0.1",
        user: str = "root",
        password: str = "demo",  # noqa: S107 - the documented demo password
        op_delay: float = 0.05,
        ha_timeout: float = 10.0,
        vm_restart_delay: float = 1.0,
        boot_delay: float = 0.5,
        listen_hosts: int = 16,
        advertise: str | None = None,
    ) -> None:
        if hosts is not None or vms is not None:
            preset = "generated"
        if preset not in ("demo", "generated"):
            raise ValueError(f"unknown preset {preset!r}")
        self.preset = preset
        self.n_hosts = hosts if hosts is not None else 16
        self.n_vms = vms if vms is not None else 100
        self.seed = seed
        self.port = port
        self.bind = bind
        # In a container the 127.0.0.x addresses of the other hosts are out of reach: with
        # ``advertise``, host 0 alone listens, on every interface, under that name.
        self.advertise = advertise
        self.listen_hosts = 1 if advertise else listen_hosts
        config = Config(
            user=user,
            password=password,
            op_delay=op_delay,
            ha_timeout=ha_timeout,
            vm_restart_delay=vm_restart_delay,
            boot_delay=boot_delay,
        )
        self.engine = Engine(config, seed)
        register_all(self.engine.registry)
        self._servers: dict[str, _HostServer] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._started = False

    # -- build and serve --------------------------------------------------

    def build(self) -> None:
        if self.engine.hosts:
            return
        if self.preset == "demo":
            presets.build_demo(self.engine, self.seed, self.bind)
        else:
            if self.n_hosts < 1:
                raise ValueError("a pool needs at least one host")
            presets.build_generated(self.engine, self.seed, self.bind, self.n_hosts, max(0, self.n_vms))
        if self.advertise:
            first = self.engine.hosts[0]
            self.engine.addresses[first] = self.advertise
            self.engine.store.update(first, {"address": self.advertise, "hostname": self.advertise})
        with self.engine.lock:
            for table in self.engine.store.tables.values():
                warm(list(table.values()))

    def start(self) -> Simulator:
        self.build()
        self.engine.power_hook = self._power
        first = self.engine.hosts[0]
        self._listen(first)
        # --port 0: the first host got a free port; every host uses the same one.
        self.port = self._servers[first].server_address[1]
        for host in self.engine.hosts[1 : self.listen_hosts]:
            self._listen(host)
        self._started = True
        return self

    def _listen(self, host: str) -> None:
        with self._lock:
            if host in self._servers:
                return
            address = self.engine.addresses[host]
            listen_on = "0.0.0.0" if self.advertise and host == self.engine.hosts[0] else address  # noqa: S104
            server = _HostServer((listen_on, self.port), self.engine, host)
            t = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"xapisim-{address}", daemon=True
            )
            self._servers[host] = server
            self._threads[host] = t
        t.start()

    def listen_as_master(self, address: str) -> None:
        """Serve XAPI on one more address, answering as the pool's current master (``--live``: the bed's
        uplink, so that a host's tools reach XAPI from the host's namespace)."""
        with self._lock:
            if address in self._servers:
                return
            server = _HostServer((address, self.port), self.engine, None)
            t = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"xapisim-{address}", daemon=True
            )
            self._servers[address] = server
            self._threads[address] = t
        t.start()

    def _unlisten(self, host: str) -> None:
        with self._lock:
            server = self._servers.pop(host, None)
            self._threads.pop(host, None)
        if server is not None:
            server.shutdown()
            server.server_close()
            server.drop_connections()

    def _power(self, host: str, up: bool) -> None:
        if not self._started or self.engine.host_index(host) >= self.listen_hosts:
            return
        if up:
            self._listen(host)
        else:
            self._unlisten(host)

    def stop(self) -> None:
        self.engine.stop()
        for host in list(self._servers):
            self._unlisten(host)
        self._started = False

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses --------------------------------------------------------

    def url_of(self, host: int | str) -> str:
        """URL of a host, by index, name or ref."""
        engine = self.engine
        if isinstance(host, int):
            ref = engine.hosts[host]
        elif host in engine.addresses:
            ref = host
        else:
            ref = next(r for r in engine.hosts if engine.store.tables["host"][r]["name_label"] == host)
        return f"http://{engine.addresses[ref]}:{self.port}"

    @property
    def url(self) -> str:
        """URL of the host that was master at start-up (host 0)."""
        return self.url_of(0)

    @property
    def master_url(self) -> str:
        return f"http://{self.engine.master_address()}:{self.port}"
