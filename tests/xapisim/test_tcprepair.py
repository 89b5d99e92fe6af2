"""xapisim/live/tcprepair.py on its own: an established connection taken with TCP_REPAIR, its socket closed in
repair mode (silently, as a crashed host's), and rebuilt from the state in a fresh socket, in a namespace of the
test's own (root). The client never notices: what the server had not read is still there, what it had queued
reaches the client, and the connection goes on both ways."""

from __future__ import annotations

import socket
import threading

import pytest

from tests.xapisim.test_live import pytestmark as pytestmark  # root, ip and nft
from xapisim.live import tcprepair
from xapisim.live.netns import Namespaces, free_prefix


@pytest.fixture
def ns():
    spaces = Namespaces(free_prefix("tr"))
    spaces.add_namespaces(["n"])
    spaces.ip_batch("n", ["link set lo up"])
    try:
        yield spaces
    finally:
        spaces.close()


def in_namespace(spaces: Namespaces, fn):
    out = {}

    def run():
        with spaces.in_ns("n"):
            out["value"] = fn()

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    return out["value"]


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the connection closed"
        data += chunk
    return data


def test_a_connection_moves_to_a_fresh_socket_with_its_queues_and_goes_on(ns):
    def setup():
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        return listener, client, server

    listener, client, server = in_namespace(ns, setup)
    client.settimeout(5)
    client.sendall(b"request 1\n")
    assert recv_exactly(server, 10) == b"request 1\n"
    client.sendall(b"unread by the server\n")  # in the server's receive queue at the capture
    # the client stops reading: what the server sends now stays in flight or in the server's send queue
    server.sendall(b"answer 1\n")
    state = tcprepair.capture(server)
    assert state.received == b"unread by the server\n"
    assert state.sack and state.timestamps and state.mss > 0
    server.setsockopt(socket.IPPROTO_TCP, tcprepair.TCP_REPAIR, 1)
    server.close()  # in repair mode: no FIN, no reset

    restored = in_namespace(ns, lambda: tcprepair.restore(state))
    restored.settimeout(5)
    assert recv_exactly(restored, 21) == b"unread by the server\n"
    assert recv_exactly(client, 9) == b"answer 1\n"
    restored.sendall(b"answer 2\n")
    assert recv_exactly(client, 9) == b"answer 2\n"
    client.sendall(b"request 3\n")
    assert recv_exactly(restored, 10) == b"request 3\n"
    for s in (client, restored, listener):
        s.close()


def test_only_an_established_connection_is_taken(ns):
    listener = in_namespace(ns, lambda: socket.create_server(("127.0.0.1", 0)))
    try:
        with pytest.raises(tcprepair.RepairError, match="not established"):
            tcprepair.capture(listener)
    finally:
        listener.close()
