"""The bulk channel: the bytes of large frames on a TCP (or TLS) connection beside the gRPC call.

gRPC-Python copies every message several times on each side; at 64 MiB a bare gRPC stream moves
0.40x what a TCP socket does on the same machine (docs/benchmarks.md). So a frame of
``ClientOptions.bulk_min_bytes`` or more travels on a TCP connection the client opened to the
server's bulk port, while the call itself (its header, authentication, deadline, status, retry)
is still an ordinary unary gRPC call whose header names the connection. The reply's frame comes
back on the same connection, before the call returns.

A connection belongs to the session that asked for it: the client gets a single-use ticket
(``OpenBulk``) over its authenticated gRPC channel and presents it as the connection's first
bytes; the server then lets only calls of that session name the connection. The connection is
TLS exactly when the gRPC port is: the same certificate and key (and client CA under mutual TLS),
the client verifying the same host name with the same roots as its gRPC channel; plain text only
beside a plain-text gRPC port (loopback, or ``--insecure``). A new connection has
``ServerOptions.bulk_hello_timeout`` in all for its TLS handshake and its ticket, so a peer that
trickles bytes holds a handshake slot no longer than that. Wire format (inside TLS, if any), all
integers big-endian::

    hello     client -> server  b"RAB1" + ticket (32 bytes)
              server -> client  b"RAB1" + status (1 byte, 0: accepted)
    request   client -> server  b"RAQ1" + uint32 0 + uint64 length + frame
    reply     server -> client  b"RAR1" + uint32 status + uint64 length + frame
              (status 1: no frame follows; the gRPC call carries the error)

A connection carries one call at a time. Either side drops it on anything unexpected; the client
then retries the call (every call that uses this channel is safe to repeat) on a new one. The
client's reads and writes of a call end by the call's deadline (``ClientOptions.timeout``): a
reply stalled on the way after the gRPC call answered is dropped and the call retried.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from . import codec, frames
from ._proto import remote_autograd_pb2 as pb
from .errors import CodecError, InvalidRequest, LimitExceeded, ServerUnavailable
from .memory import pieces
from .options import Limits

__all__ = ["BulkBroken", "BulkClient", "BulkListener"]

log = logging.getLogger(__name__)

# The peer closed (its end, or the whole connection) or the connection failed: poll(2) flags.
_HUNG_UP = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR

HELLO = b"RAB1"
REQUEST = b"RAQ1"
REPLY = b"RAR1"
TICKET_BYTES = 32
_PREFIX = struct.Struct(">4sIQ")
_OK, _NO_FRAME = 0, 1
TICKET_TTL = 30.0  # seconds a ticket may wait for its connection
_MAX_HANDSHAKES = 32  # connections presenting tickets at once; more are closed at once
# of them from one address: a peer without a ticket that holds connections open cannot take
# every slot. A session opens at most max_session_bulk_connections (8) at once, each hello
# a few milliseconds long
_MAX_HOST_HANDSHAKES = 8
_RECV_SLICE = 4 << 20  # largest single recv_into


class BulkBroken(ServerUnavailable):
    """A bulk connection broke mid-call; the call is safe to repeat on a new connection."""


class _Connection:
    """One side of a bulk connection: framed, exact-length reads and writes."""

    def __init__(self, sock: socket.socket, connection_id: str, session: str = "") -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _keep_alive(sock)
        self.sock = sock
        self.id = connection_id
        self.session = session
        self.busy = threading.Lock()  # one call at a time
        self.closed = False
        # A client's: when the call in progress must have sent and read all (monotonic), or
        # None. The server's gRPC reply does not close a stalled connection: this does.
        self.deadline: float | None = None
        # A connection dropped without close() (its client was garbage collected) still
        # closes its socket.
        self._finalizer = weakref.finalize(self, sock.close)

    def close(self) -> None:
        """Drop the connection; unblocks a thread sending or receiving on it."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):  # already gone
            # The plain socket's shutdown: SSLSocket.shutdown would also detach the TLS state
            # under a thread still reading, which would then read raw TLS records as data.
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        self._finalizer()

    def send(self, magic: bytes, status: int, buffers: Sequence[Any], length: int) -> None:
        if self.deadline is not None:
            self.sock.settimeout(_left(self.deadline))
        try:
            self.sock.sendall(_PREFIX.pack(magic, status, length))
            for buffer in buffers:
                for piece in pieces(buffer):  # a staged GPU tensor crosses while we send
                    self.sock.sendall(piece)
        except ValueError as exc:  # an SSL socket that close() closed under us
            raise ConnectionError(f"bulk connection {self.id} was closed") from exc

    def recv_prefix(self, magic: bytes) -> tuple[int, int]:
        prefix = bytearray(_PREFIX.size)
        self.recv_into(memoryview(prefix))
        got, status, length = _PREFIX.unpack(prefix)
        if got != magic:
            raise CodecError(f"bulk connection {self.id}: expected {magic!r}, got {bytes(got)!r}")
        return status, length

    def recv_into(self, view: memoryview) -> None:
        try:
            _recv_exact(self.sock, view, f"bulk connection {self.id}", deadline=self.deadline)
        except ValueError as exc:  # an SSL socket that close() closed under us
            raise ConnectionError(f"bulk connection {self.id} was closed") from exc

    def recv_frame(self, length: int, limits: Limits) -> memoryview:
        codec.check_frame_size(length, limits)
        view = frames.receive_buffer(length)
        try:
            self.recv_into(view)
        except BaseException:
            view.release()  # as frames.receive: a kept traceback must not hold the buffer
            raise
        return view


# -- server ---------------------------------------------------------------------------------


class BulkListener:
    """The server's bulk port: issues tickets, accepts connections, lends them to calls."""

    def __init__(
        self,
        host: str,
        port: int = 0,
        *,
        max_connections: int,
        max_session_connections: int,
        timeout: float,
        hello_timeout: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if hello_timeout <= 0:
            raise ValueError(
                f"ServerOptions.bulk_hello_timeout must be > 0 seconds, got {hello_timeout!r}"
            )
        self.max_connections = max_connections
        self.max_session_connections = max_session_connections
        self.timeout = timeout
        self.hello_timeout = hello_timeout
        self.tls = tls  # a server-side context: every connection is TLS
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=64)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._tickets: dict[bytes, tuple[str, str, float]] = {}  # digest -> id, session, expiry
        self._connections: dict[str, _Connection] = {}
        self._handshaking = 0  # connections in their TLS handshake or hello
        self._hosts: dict[str, int] = {}  # of them, per peer address
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="ra-bulk-accept", daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        return len(self._connections)

    def issue(self, session: str) -> tuple[bytes, str]:
        """A single-use ticket for one new connection of ``session``, and that connection's id."""
        now = time.monotonic()
        with self._lock:
            self._tickets = {d: t for d, t in self._tickets.items() if t[2] > now}
            held = sum(c.session == session for c in self._connections.values())
            held += sum(t[1] == session for t in self._tickets.values())
            if held >= self.max_session_connections:
                raise LimitExceeded(
                    f"session holds max_session_bulk_connections={self.max_session_connections} "
                    "bulk connections"
                )
            if len(self._connections) + len(self._tickets) >= self.max_connections:
                raise LimitExceeded(
                    f"server holds max_bulk_connections={self.max_connections} bulk connections"
                )
            ticket = secrets.token_bytes(TICKET_BYTES)
            connection_id = secrets.token_hex(8)
            self._tickets[_digest(ticket)] = (connection_id, session, now + TICKET_TTL)
        return ticket, connection_id

    def claim(self, connection_id: str, session: str) -> _Connection:
        """The connection a call names, reserved for that call (``release`` gives it back)."""
        with self._lock:
            connection = self._connections.get(connection_id)
        if connection is None or connection.session != session or connection.closed:
            # UNAVAILABLE: the client retries on a new connection (after a restart, say).
            raise ServerUnavailable(
                f"bulk connection {connection_id[:16]!r} is not open for this session here"
            )
        if not connection.busy.acquire(blocking=False):
            raise InvalidRequest(f"bulk connection {connection_id} is carrying another call")
        return connection

    def release(self, connection: _Connection) -> None:
        connection.busy.release()
        if connection.closed:
            with self._lock:
                self._connections.pop(connection.id, None)

    def drop_session(self, session: str) -> None:
        """The session ended: close its connections, and void its tickets not yet presented
        (a connection opened with one later would belong to no session, and stay)."""
        with self._lock:
            self._tickets = {d: t for d, t in self._tickets.items() if t[1] != session}
            gone = [c for c in self._connections.values() if c.session == session]
            for connection in gone:
                del self._connections[connection.id]
        for connection in gone:
            connection.close()

    def void(self, connection_id: str) -> None:
        """Void the ticket of ``connection_id``, and close its connection if one was opened."""
        with self._lock:
            self._tickets = {d: t for d, t in self._tickets.items() if t[0] != connection_id}
            connection = self._connections.pop(connection_id, None)
        if connection is not None:
            connection.close()

    def prune(self) -> int:
        """Close idle connections whose client went away. Not those with bytes to read: a
        call's frame arrives here before the call has a worker thread to read it (a busy
        server), and the bytes of a TLS connection cannot be told apart unread."""
        with self._lock:
            idle = [c for c in self._connections.values() if not c.busy.locked()]
        if not idle:
            return 0
        # poll, not select: select refuses a descriptor of 1024 or more, and one of -1 (a socket
        # closed under us), and would then prune nothing at all.
        poller = select.poll()
        by_fd: dict[int, _Connection] = {}
        gone_already = []
        for connection in idle:
            fd = connection.sock.fileno()
            if fd < 0 or connection.closed:
                gone_already.append(connection)
            else:
                by_fd[fd] = connection
                poller.register(fd, _HUNG_UP)
        try:
            events = poller.poll(0)
        except OSError:
            events = []
        hung_up = [by_fd[fd] for fd, flags in events if fd in by_fd and flags & _HUNG_UP]
        gone = [c for c in gone_already + hung_up if c.busy.acquire(blocking=False)]
        for connection in gone:
            connection.close()
            self.release(connection)
        return len(gone)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = list(self._connections.values()), {}
        with contextlib.suppress(OSError):  # wakes the accepting thread
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for connection in connections:
            connection.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, peer = self._listener.accept()
            except OSError:
                return  # the listener was closed
            host = str(peer[0])
            with self._lock:
                full = self._handshaking >= _MAX_HANDSHAKES
                full = full or self._hosts.get(host, 0) >= _MAX_HOST_HANDSHAKES
                if not full:
                    self._handshaking += 1
                    self._hosts[host] = self._hosts.get(host, 0) + 1
            if full:
                sock.close()  # too many connections presenting tickets at once
                continue
            threading.Thread(
                target=self._handshake, args=(sock, host), name="ra-bulk-hello", daemon=True
            ).start()

    def _handshake(self, sock: socket.socket, host: str) -> None:
        # One deadline for the TLS handshake and the whole hello: a peer trickling a byte now
        # and then must not hold a handshake slot (there are _MAX_HANDSHAKES) for longer.
        deadline = time.monotonic() + self.hello_timeout
        connection: _Connection | None = None
        try:
            sock.settimeout(self.hello_timeout)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                sock.do_handshake()  # bounded as a whole by the socket's timeout (CPython)
            hello = bytearray(len(HELLO) + TICKET_BYTES)
            _recv_exact(sock, memoryview(hello), "a new bulk connection", deadline=deadline)
            digest = _digest(bytes(hello[len(HELLO) :]))
            # The ticket is taken and its connection registered in one hold of the lock: a
            # session ending (drop_session) or the listener closing in between would find
            # neither the ticket nor the connection, which would then belong to nothing.
            # Registered before the answer: the client's first call may follow it at once.
            with self._lock:
                entry = self._tickets.pop(digest, None) if hello[: len(HELLO)] == HELLO else None
                if entry is not None and entry[2] >= time.monotonic() and not self._closed:
                    connection = _Connection(sock, entry[0], entry[1])
                    self._connections[connection.id] = connection
            if connection is None:
                sock.settimeout(max(deadline - time.monotonic(), 0.01))
                sock.sendall(HELLO + bytes([1]))
                sock.close()
                return
            sock.settimeout(self.timeout)
            sock.sendall(HELLO + bytes([_OK]))
        except (OSError, ValueError):  # includes timeouts and TLS errors
            if connection is not None:  # the answer did not go out: nobody will use it
                with self._lock:
                    self._connections.pop(connection.id, None)
            sock.close()
        finally:
            with self._lock:
                self._handshaking -= 1
                left = self._hosts.pop(host) - 1
                if left:
                    self._hosts[host] = left

    @property
    def handshaking(self) -> int:
        """New connections still in their TLS handshake or hello."""
        return self._handshaking


def serve_call(
    listener: BulkListener,
    session: str,
    header: pb.Header,
    limits: Limits,
    context: grpc.ServicerContext,
    reserve: Callable[[int], Any],
    work: Callable[[frames.Received], tuple[pb.Header, list]],
) -> pb.Frame:
    """Serve one call whose frames travel on the bulk connection its header names."""
    connection = listener.claim(header.bulk_connection, session)
    finished = False

    def on_done() -> None:
        # A call that ends mid-frame (refused, cancelled, past its deadline) drops the
        # connection: that unblocks the socket, and the client may have sent bytes that
        # nobody will read.
        if not finished:
            connection.close()

    context.add_callback(on_done)
    try:
        length = header.payload_bytes
        codec.check_frame_size(length, limits)  # before reserving or reading a byte
        with reserve(length):
            try:
                _, declared = connection.recv_prefix(REQUEST)
                if declared != length:
                    raise CodecError(
                        f"bulk connection carries {declared} bytes, the header declares {length}"
                    )
                received = frames.Received(header, connection.recv_frame(length, limits))
            except BaseException:
                connection.close()  # the stream's position is unknown
                raise
            try:
                reply_header, buffers = work(received)
            except BaseException:
                connection.send(REPLY, _NO_FRAME, (), 0)
                finished = True  # both sides are where they should be: keep the connection
                raise
        size = sum(len(b) for b in buffers)
        connection.send(REPLY, _OK, buffers, size)
        finished = True
        reply = pb.Frame()
        reply.header.CopyFrom(reply_header)  # a retried Backward's header is cached: copy it
        reply.header.payload_bytes = size
        reply.header.bulk_connection = connection.id
        return reply
    except OSError as exc:
        connection.close()
        raise ServerUnavailable(f"bulk connection {connection.id} broke: {exc}") from exc
    finally:
        listener.release(connection)


# -- client ---------------------------------------------------------------------------------


class BulkClient:
    """A client's bulk connections to one server, opened on demand and reused."""

    def __init__(
        self,
        host: str,
        port: int,
        open_ticket: Callable[[float], tuple[bytes, str]],
        *,
        limits: Limits,
        connect_timeout: float,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._open_ticket = open_ticket
        self._limits = limits
        self._connect_timeout = connect_timeout
        self._tls = tls  # a client-side context: verifies the server as the gRPC channel does
        self._server_hostname = server_hostname or host
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()

    def connect(self, timeout: float | None = None) -> _Connection:
        """A new connection, open within ``timeout`` seconds in all (ticket, TCP connect, TLS
        handshake, hello) or at most ``connect_timeout``; else an OSError (a timeout, a refusal)
        or the OpenBulk call's error."""
        deadline = time.monotonic() + min(timeout or self._connect_timeout, self._connect_timeout)
        ticket, connection_id = self._open_ticket(_left(deadline))
        sock = socket.create_connection((self.host, self.port), timeout=_left(deadline))
        try:
            sock.settimeout(_left(deadline))  # the TLS handshake, as a whole (CPython)
            if self._tls is not None:
                # A server that refuses our certificate (mutual TLS) says so in an alert that
                # the read of its answer raises (ssl.SSLError, an OSError).
                sock = self._tls.wrap_socket(sock, server_hostname=self._server_hostname)
            sock.sendall(HELLO + ticket)
            answer = bytearray(len(HELLO) + 1)
            connection = _Connection(sock, connection_id)
            connection.deadline = deadline
            connection.recv_into(memoryview(answer))
            connection.deadline = None
        except BaseException:
            sock.close()
            raise
        if answer != HELLO + bytes([_OK]):
            sock.close()
            raise ConnectionRefusedError(f"the server refused bulk connection {connection_id}")
        sock.settimeout(None)  # each call bounds its own reads and writes (its deadline)
        return connection

    def take(self, timeout: float | None = None) -> _Connection:
        """An idle connection, or a new one open within ``timeout`` (see connect)."""
        with self._lock:
            while self._idle:
                connection = self._idle.pop()
                if not connection.closed and not _gone(connection.sock):
                    return connection
                connection.close()
        return self.connect(timeout)

    def give_back(self, connection: _Connection) -> None:
        with self._lock:
            self._idle.append(connection)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def call(
        self,
        connection: _Connection,
        rpc: grpc.UnaryUnaryMultiCallable,
        header: pb.Header,
        buffers: Sequence[Any],
        **kwargs: Any,
    ) -> frames.Received:
        """One unary call whose frames travel on ``connection``; the connection returns to the
        pool when the exchange completed, and is dropped otherwise."""
        length = sum(len(b) for b in buffers)
        message = pb.Frame()
        message.header.CopyFrom(header)  # the caller may resend the header another way
        message.header.payload_bytes = length
        message.header.bulk_connection = connection.id
        # Every read and write of this call ends by the call's deadline: once the gRPC reply
        # has come, nothing else would end a reply stalled on the way (the connection cut
        # somewhere, the gRPC one not), and the call would wait for ever. Past it: BulkBroken,
        # and the call is retried on a new connection.
        timeout = kwargs.get("timeout")
        connection.deadline = None if timeout is None else time.monotonic() + timeout
        if timeout is None:
            connection.sock.settimeout(None)
        future = rpc.future(message, **kwargs)
        reusable = False

        def on_done(future: grpc.Future) -> None:
            # A call that fails before its reply arrived (refused, cancelled, past its
            # deadline) unblocks our socket at once.
            if not reusable and (future.cancelled() or future.exception() is not None):
                connection.close()

        future.add_done_callback(on_done)
        try:
            try:
                connection.send(REQUEST, 0, buffers, length)
                status, size = connection.recv_prefix(REPLY)
                buffer = connection.recv_frame(size, self._limits) if status == _OK else None
                reusable = True
            except OSError as exc:
                future.result()  # raises the call's own error when it has one
                raise BulkBroken(f"bulk connection {connection.id} broke: {exc}") from exc
            reply = future.result()
            if buffer is None or reply.header.payload_bytes != size:
                reusable = False
                raise CodecError(
                    f"bulk reply of {size} bytes, the reply header declares "
                    f"{reply.header.payload_bytes}"
                )
            return frames.Received(reply.header, buffer)
        finally:
            connection.deadline = None
            if reusable and not connection.closed:
                self.give_back(connection)
            else:
                connection.close()


def _recv_exact(
    sock: socket.socket, view: memoryview, what: str, *, deadline: float | None = None
) -> None:
    """Fill ``view`` from ``sock``; with a ``deadline`` (monotonic), the whole read ends by
    then (a socket's own timeout bounds each ``recv`` only)."""
    filled, total = 0, len(view)
    while filled < total:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{what} sent {filled} of {total} bytes in time")
            sock.settimeout(left)
        got = sock.recv_into(view[filled:], min(total - filled, _RECV_SLICE))
        if got == 0:
            raise ConnectionError(f"{what} closed after {filled} of {total} bytes")
        filled += got


# Keepalive probes on an idle connection: a NAT or firewall that forgets idle flows (after a
# few minutes) keeps this one, and a peer gone without a word is found out within about a
# minute, instead of a call stalling for bulk_timeout on a dead pooled connection.
_KEEPALIVE = {"TCP_KEEPIDLE": 30, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 3}


def _keep_alive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in _KEEPALIVE.items():
        if hasattr(socket, name):  # Linux; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _gone(sock: socket.socket) -> bool:
    """An idle connection the peer closed, that failed (keepalive), or with bytes to read: an
    idle connection is sent nothing, so it cannot carry a call."""
    poller = select.poll()
    try:
        poller.register(sock.fileno(), _HUNG_UP | select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):  # closed under us
        return True


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)


def _digest(ticket: bytes) -> bytes:
    return hashlib.sha256(ticket).digest()
