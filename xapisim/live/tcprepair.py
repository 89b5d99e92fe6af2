"""An established TCP connection's kernel state, taken and put back with Linux's ``TCP_REPAIR`` socket options.

This is the mechanism CRIU uses to move a live connection: the live guest's checkpoint (``xapisim.live.guest``)
holds one ``TcpState`` per client connection, and a guest restored on another host rebuilds each socket from it
with the same sequence numbers, queues, options and window, so the client's TCP stack carries on (it retransmits
what the restored side never received). The order of the restore steps and their pitfalls were checked on these
machines: a socket in repair mode sends nothing when it is closed, ``SO_REUSEADDR`` must come before repair mode,
the timestamp must be restored (else the client drops every segment as old), and the window after the receive
queue is refilled.

Python 3.11 has none of these constants; u32 values are packed as bytes (values above 2**31 do not pass as ints).
"""

from __future__ import annotations

import fcntl
import socket
import struct

import msgspec

TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
TCP_REPAIR_ON, TCP_REPAIR_OFF, TCP_REPAIR_OFF_NO_WP = 1, 0, -1
RECV_QUEUE, SEND_QUEUE, NO_QUEUE = 1, 2, 0
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = 0x541B, 0x5411, 0x894B
TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
TCP_ESTABLISHED = 1
WINDOW = struct.Struct("=5I")  # snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup
U32 = struct.Struct("=I")
INT = struct.Struct("=i")
QUEUE_LIMIT = 16 << 20


class RepairError(OSError):
    """A socket that cannot be taken or restored (not established, a queue that moved under the capture...)."""


class TcpState(msgspec.Struct, frozen=True):
    local: tuple[str, int]
    peer: tuple[str, int]
    send_seq: int  # the sequence number after the last byte the application wrote
    recv_seq: int  # the sequence number after the last byte received
    sent: bytes  # the send queue's part already transmitted (unacknowledged)
    unsent: bytes  # the send queue's tail never transmitted
    received: bytes  # received, not read by the application
    mss: int
    snd_wscale: int
    rcv_wscale: int
    sack: bool
    timestamps: bool
    timestamp: int
    window: tuple[int, int, int, int, int]


def _ioctl_int(sock: socket.socket, request: int) -> int:
    return INT.unpack(fcntl.ioctl(sock.fileno(), request, b"\0" * INT.size))[0]


def _get_u32(sock: socket.socket, option: int) -> int:
    return U32.unpack(sock.getsockopt(socket.IPPROTO_TCP, option, U32.size))[0]


def _set_u32(sock: socket.socket, option: int, value: int) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, option, U32.pack(value & 0xFFFFFFFF))


def _set_int(sock: socket.socket, option: int, value: int) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, option, INT.pack(value))


def _queue(sock: socket.socket, which: int, length: int) -> tuple[int, bytes]:
    """(the queue's sequence number, its bytes), read so that both describe the same moment: a segment that
    arrives between the two reads moves the sequence number, and the read is made again."""
    _set_int(sock, TCP_REPAIR_QUEUE, which)
    for _ in range(100):
        before = _get_u32(sock, TCP_QUEUE_SEQ)
        data = sock.recv(max(length, 1) + 65536, socket.MSG_PEEK | socket.MSG_DONTWAIT) if length else b""
        if _get_u32(sock, TCP_QUEUE_SEQ) == before:
            return before, data
        length = max(length, len(data)) * 2
    raise RepairError("the receive queue kept moving during the capture")


def capture(sock: socket.socket) -> TcpState:
    """The state of an established connection. The socket stays usable: it leaves repair mode silently."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    if info[0] != TCP_ESTABLISHED:
        raise RepairError(f"the connection is not established (TCP state {info[0]})")
    options, wscale = info[5], info[6]
    local, peer = sock.getsockname()[:2], sock.getpeername()[:2]
    _set_int(sock, TCP_REPAIR, TCP_REPAIR_ON)
    try:
        inq, outq, notsent = (_ioctl_int(sock, r) for r in (SIOCINQ, SIOCOUTQ, SIOCOUTQNSD))
        if max(inq, outq) > QUEUE_LIMIT:
            raise RepairError(f"queues of {inq}/{outq} bytes are over the {QUEUE_LIMIT} limit")
        recv_seq, received = _queue(sock, RECV_QUEUE, inq)
        _set_int(sock, TCP_REPAIR_QUEUE, SEND_QUEUE)
        send_seq = _get_u32(sock, TCP_QUEUE_SEQ)
        queued = sock.recv(outq + 65536, socket.MSG_PEEK | socket.MSG_DONTWAIT) if outq else b""
        _set_int(sock, TCP_REPAIR_QUEUE, NO_QUEUE)
        notsent = min(notsent, len(queued))
        mss = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
        timestamp = _get_u32(sock, TCP_TIMESTAMP)
        window = WINDOW.unpack(sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, WINDOW.size))
    finally:
        _set_int(sock, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
    cut = len(queued) - notsent
    return TcpState(
        local=(local[0], local[1]), peer=(peer[0], peer[1]), send_seq=send_seq, recv_seq=recv_seq,
        sent=queued[:cut], unsent=queued[cut:], received=received, mss=mss,
        snd_wscale=wscale & 0xF if options & TCPI_OPT_WSCALE else 0,
        rcv_wscale=wscale >> 4 if options & TCPI_OPT_WSCALE else 0,
        sack=bool(options & TCPI_OPT_SACK), timestamps=bool(options & TCPI_OPT_TIMESTAMPS),
        timestamp=timestamp, window=window)


def _fill(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[sock.send(view) :]


def restore(state: TcpState) -> socket.socket:
    """A socket in the same state, bound to the same address (which must be this namespace's) and connected to
    the same peer, without a packet sent. It leaves repair mode with a window probe, then sends the tail the
    original never transmitted. Raises OSError."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # before repair mode: beside the listener
        _set_int(sock, TCP_REPAIR, TCP_REPAIR_ON)
        sock.bind(state.local)
        _set_int(sock, TCP_REPAIR_QUEUE, RECV_QUEUE)
        _set_u32(sock, TCP_QUEUE_SEQ, state.recv_seq - len(state.received))
        _set_int(sock, TCP_REPAIR_QUEUE, SEND_QUEUE)
        _set_u32(sock, TCP_QUEUE_SEQ, state.send_seq - len(state.sent) - len(state.unsent))
        _set_int(sock, TCP_REPAIR_QUEUE, NO_QUEUE)
        sock.connect(state.peer)  # in repair mode: no SYN, the socket is established at once
        opts = [(TCPOPT_MAXSEG, state.mss)]
        if state.snd_wscale or state.rcv_wscale:
            opts.append((TCPOPT_WINDOW, state.snd_wscale | state.rcv_wscale << 16))
        if state.sack:
            opts.append((TCPOPT_SACK_PERM, 0))
        if state.timestamps:
            opts.append((TCPOPT_TIMESTAMP, 0))
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_OPTIONS, b"".join(struct.pack("=II", *o) for o in opts))
        _set_u32(sock, TCP_TIMESTAMP, state.timestamp)
        if state.sent:
            _set_int(sock, TCP_REPAIR_QUEUE, SEND_QUEUE)
            _fill(sock, state.sent)  # queued as already sent: retransmitted by the timer, not sent now
        if state.received:
            _set_int(sock, TCP_REPAIR_QUEUE, RECV_QUEUE)
            _fill(sock, state.received)
        _set_int(sock, TCP_REPAIR_QUEUE, NO_QUEUE)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, WINDOW.pack(*state.window))
        _set_int(sock, TCP_REPAIR, TCP_REPAIR_OFF)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # not kernel TCP state: set again
        if state.unsent:
            sock.setblocking(True)
            sock.sendall(state.unsent)
        return sock
    except BaseException:
        sock.close()
        raise
