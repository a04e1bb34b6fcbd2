"""The bulk channel (remote_autograd/bulk.py): large frames on a TCP connection beside the gRPC
call, TLS beside a TLS port. Real servers on 127.0.0.1:0; the attacks speak the bulk wire format
over raw sockets (TLS sockets where the server is TLS)."""

from __future__ import annotations

import contextlib
import logging
import random
import select
import socket
import ssl
import struct
import threading
import time

import grpc
import pytest
import torch
from models import Scale
from pki import make_pki
from polling import wait_for

from remote_autograd import ClientOptions, Limits, RemoteModule, ServerOptions, frames, serve
from remote_autograd._proto import remote_autograd_pb2 as pb
from remote_autograd._proto import remote_autograd_pb2_grpc as pb_grpc
from remote_autograd.bulk import BulkListener
from remote_autograd.transport import bulk_client_tls, bulk_server_tls

MiB = 1 << 20
PREFIX = struct.Struct(">4sIQ")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, bytes]:
    return make_pki(tmp_path_factory.mktemp("pki"))


class Wire:
    """Plain text or TLS: the options of both sides and the sockets a hand-made peer opens."""

    def __init__(self, pki: dict[str, bytes] | None, mutual: bool = False) -> None:
        self.pki = pki
        self.mutual = mutual

    def server(self, **fields) -> ServerOptions:
        if self.pki is not None:
            fields.update(
                certificate_chain=self.pki["server.pem"], private_key=self.pki["server.key"]
            )
            if self.mutual:
                fields.update(client_ca=self.pki["ca.pem"])
        return ServerOptions(**fields)

    def client(self, **fields) -> ClientOptions:
        if self.pki is not None:
            fields.update(root_certificates=self.pki["ca.pem"])
            if self.mutual:
                fields.update(
                    certificate_chain=self.pki["client.pem"], private_key=self.pki["client.key"]
                )
        return ClientOptions(**fields)

    def channel(self, address: str) -> grpc.Channel:
        if self.pki is None:
            return grpc.insecure_channel(address)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.pki["ca.pem"],
            private_key=self.pki["client.key"] if self.mutual else None,
            certificate_chain=self.pki["client.pem"] if self.mutual else None,
        )
        return grpc.secure_channel(address, credentials)

    def tls(self, **fields) -> ssl.SSLContext | None:
        """The client side's TLS of a bulk connection (``fields``: other ClientOptions)."""
        return bulk_client_tls(self.client(**fields))


@pytest.fixture(params=["plain", "tls"])
def wire(request, pki) -> Wire:
    return Wire(pki if request.param == "tls" else None)


def _round_trip(remote: RemoteModule, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().requires_grad_()
    y = remote(x)
    y.backward(grad)
    return y.detach(), x.grad


def test_large_frames_take_the_bulk_channel_and_equal_grpc_streams(start_server, wire):
    server = start_server(Scale(torch.float64), wire.server())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(MiB // 2, generator=generator, dtype=torch.float64)  # 4 MiB
    grad = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    results = {}
    for bulk in (True, False):
        with RemoteModule(server.address, options=wire.client(bulk=bulk)) as remote:
            for _ in range(3):
                results[bulk] = _round_trip(remote, x, grad)
            assert remote.client.stats.bulk_calls == (6 if bulk else 0)
            if bulk:
                assert len(server.service.bulk) == 1  # one connection, reused by every call
        assert len(server.service.bulk) == 0  # close() ended the session, and its connections
    assert torch.equal(results[True][0], x * 1.5)
    assert torch.equal(results[True][1], grad * 1.5)
    for a, b in zip(results[True], results[False], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("form", ["ipv4:{host}:{port}", "dns:///{host}:{port}"])
def test_grpc_target_uris_take_the_bulk_channel_too(start_server, form, caplog):
    server = start_server(Scale(torch.float64))
    host, port = server.address.rsplit(":", 1)
    x, grad = torch.randn(2, MiB // 16, dtype=torch.float64)  # 512 KiB each
    with (
        caplog.at_level(logging.WARNING),
        RemoteModule(form.format(host=host, port=port)) as remote,
    ):
        y, g = _round_trip(remote, x, grad)
        assert torch.equal(y, x * 1.5) and torch.equal(g, grad * 1.5)
        assert remote.client.stats.bulk_calls == 2
    assert not [r for r in caplog.records if "bulk" in r.getMessage()]


def test_small_frames_stay_in_grpc_messages(start_server):
    server = start_server(Scale(torch.float64))
    with RemoteModule(server.address) as remote:
        y, g = _round_trip(remote, torch.ones(512, dtype=torch.float64), torch.ones(512))
        assert torch.equal(g, torch.full((512,), 1.5, dtype=torch.float64))
        assert remote.client.stats.bulk_calls == 0
    assert len(server.service.bulk) == 0


# -- the wire, spoken by hand -------------------------------------------------------------------


class Peer:
    """A client speaking the protocol by hand: gRPC stub + raw bulk sockets."""

    def __init__(
        self, address: str, session: str = "s1", token: str | None = None, wire: Wire | None = None
    ) -> None:
        self.sockets: list[socket.socket] = []
        self.wire = wire or Wire(None)
        self.channel = self.wire.channel(address)
        self.stub = pb_grpc.TrunkStub(self.channel)
        self.metadata: tuple[tuple[str, str], ...] = (("ra-session", session),)
        if token:
            self.metadata += (("authorization", f"Bearer {token}"),)
        self.port = self.stub.Info(pb.InfoRequest(), metadata=self.metadata).bulk_port
        assert self.port

    def connect(
        self, tls: ssl.SSLContext | None | bool = True, source: str = "127.0.0.1"
    ) -> socket.socket:
        """A connection to the bulk port: TLS as the wire says (``tls``: True), raw TCP (False),
        or TLS with this client context; from the loopback address ``source``."""
        address = ("127.0.0.1", self.port)
        sock = socket.create_connection(address, timeout=10, source_address=(source, 0))
        self.sockets.append(sock)
        context = self.wire.tls() if tls is True else tls or None
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
            self.sockets.append(sock)
        return sock

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.channel.close()

    def ticket(self) -> pb.OpenBulkReply:
        return self.stub.OpenBulk(pb.OpenBulkRequest(), metadata=self.metadata)

    def hello(self, ticket: bytes, tls: ssl.SSLContext | None | bool = True):
        sock = self.connect(tls)
        sock.sendall(b"RAB1" + ticket)
        return sock, _recv(sock, 5)

    def open(self) -> tuple[socket.socket, str]:
        reply = self.ticket()
        sock, answer = self.hello(reply.ticket)
        assert answer == b"RAB1\x00"
        return sock, reply.connection_id

    def compute(self, connection_id: str, payload_bytes: int) -> grpc.Future:
        header = pb.Header(payload_bytes=payload_bytes, bulk_connection=connection_id)
        return self.stub.Compute.future(pb.Frame(header=header), metadata=self.metadata, timeout=30)


@pytest.fixture
def peers():
    """Peers made by the test; their sockets and channels are closed at its end."""
    made: list[Peer] = []

    def make(*args, **kwargs) -> Peer:
        made.append(Peer(*args, **kwargs))
        return made[-1]

    yield make
    for one in made:
        one.close()


def _recv(sock: socket.socket, n: int) -> bytes:
    """Up to ``n`` bytes: fewer when the peer closes (a reset counts as closing)."""
    data = b""
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except (ConnectionResetError, ssl.SSLError):  # TLS: a reset, or an alert
            break
        if not chunk:
            break
        data += chunk
    return data


def _status(future: grpc.Future) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        future.result()
    return info.value.code()


def _still_serves(server, wire: Wire | None = None) -> None:
    with RemoteModule(server.address, options=(wire or Wire(None)).client()) as remote:
        x, grad = torch.randn(2, MiB // 16, dtype=torch.float64)  # 512 KiB each, incompressible
        y, g = _round_trip(remote, x, grad)
        assert torch.equal(y, x * 1.5) and torch.equal(g, grad * 1.5)
        assert remote.client.stats.bulk_calls == 2


def test_a_connection_needs_a_fresh_ticket(start_server, peers, wire):
    server = start_server(Scale(torch.float64), wire.server())
    peer = peers(server.address, wire=wire)
    sock, answer = peer.hello(b"\x00" * 32)
    assert answer == b"RAB1\x01" and _recv(sock, 1) == b""  # refused, then closed
    ticket = peer.ticket().ticket
    first, answer = peer.hello(ticket)
    assert answer == b"RAB1\x00"
    _, answer = peer.hello(ticket)
    assert answer == b"RAB1\x01"  # single use
    garbage = peer.connect()
    garbage.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 32)
    assert _recv(garbage, 5) == b"RAB1\x01"
    assert len(server.service.bulk) == 1
    if wire.pki is not None:  # a fresh ticket in plain text to the TLS port opens nothing
        sock, answer = peer.hello(peer.ticket().ticket, tls=False)
        assert b"RAB1" not in answer  # closed, maybe after a TLS alert
        assert len(server.service.bulk) == 1


def test_connections_reset_at_their_hello_or_left_idle_are_dropped(start_server, peers):
    """A peer that resets right after its hello never gets the answer: its connection is not
    kept. Then a client that went away is still pruned (a socket closed under the listener
    once stopped every prune)."""
    server = start_server(Scale(torch.float64), ServerOptions(context_ttl=1.0))
    peer = peers(server.address, "s1")
    for _ in range(3):
        sock = peer.connect()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(b"RAB1" + peer.ticket().ticket)
        sock.close()  # a reset: the server's answer cannot go out
    honest, _ = peer.open()
    honest.close()
    wait_for(lambda: len(server.service.bulk) == 0, timeout=30)
    _still_serves(server)


def test_tickets_of_an_ended_session_open_nothing(start_server, peers):
    """A connection opened with a ticket of a session that has ended would belong to no
    session, and nothing would ever drop it: the tickets end with their session."""
    server = start_server(Scale(torch.float64), ServerOptions(max_session_bulk_connections=8))
    peer = peers(server.address, "s1")
    _, connection_id = peer.open()
    tickets = [peer.ticket().ticket for _ in range(3)]
    assert peer.stub.EndSession(pb.EndSessionRequest(), metadata=peer.metadata).ended
    assert len(server.service.bulk) == 0  # its connection went with it
    for ticket in tickets:
        _, answer = peer.hello(ticket)
        assert answer == b"RAB1\x01"
    assert len(server.service.bulk) == 0
    _still_serves(server)


def test_a_session_ending_while_its_ticket_is_presented_keeps_no_connection(
    start_server, peers, monkeypatch
):
    """The session ends in the instant between the server taking the ticket and registering
    its connection (widened here to up to 2 s: the EndSession runs while the connection is
    made). It once found neither, and the connection stayed, of no session, for good."""
    from remote_autograd import bulk

    server = start_server(Scale(torch.float64))
    peer = peers(server.address, "s1")
    ended = threading.Event()

    class EndingSession(bulk._Connection):
        def __init__(self, *args, **kwargs) -> None:
            end = peer.stub.EndSession.future(pb.EndSessionRequest(), metadata=peer.metadata)
            end.add_done_callback(lambda _: ended.set())
            ended.wait(2.0)  # all 2 s where the EndSession cannot get in between (it waits)
            super().__init__(*args, **kwargs)

    ticket = peer.ticket().ticket
    monkeypatch.setattr(bulk, "_Connection", EndingSession)
    sock, answer = peer.hello(ticket)
    assert ended.wait(30)
    assert answer in (b"RAB1\x00", b"")  # answered, or closed by the session's end
    wait_for(lambda: len(server.service.bulk) == 0, timeout=10)
    sock.settimeout(10)
    assert _recv(sock, 1) == b""  # and its socket is closed
    monkeypatch.undo()
    _still_serves(server)


def test_a_session_ending_while_its_ticket_is_issued_keeps_no_ticket(start_server, peers):
    """The session ends between OpenBulk finding it and the ticket being issued (here: the
    EndSession runs right before the issue). The ticket, issued after the session's end voided
    its tickets, once opened a connection that belonged to no session."""
    server = start_server(Scale(torch.float64))
    listener = server.service.bulk
    peer = peers(server.address, "s1")
    issued = []

    def issue_after_the_end(session: str) -> tuple[bytes, str]:
        assert peer.stub.EndSession(pb.EndSessionRequest(), metadata=peer.metadata).ended
        issued.append(BulkListener.issue(listener, session))
        return issued[-1]

    listener.issue = issue_after_the_end
    with pytest.raises(grpc.RpcError) as refused:
        peer.ticket()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # a client retries
    del listener.issue
    _, answer = peer.hello(issued[0][0])
    assert answer == b"RAB1\x01"
    assert len(listener) == 0 and not server.engine.sessions.values()
    _still_serves(server)


def test_a_connection_serves_only_the_session_that_opened_it(start_server, peers, wire):
    server = start_server(Scale(torch.float64), wire.server(tokens=("alpha", "beta")))
    owner = peers(server.address, "s1", token="alpha", wire=wire)
    _, connection_id = owner.open()
    others = (peers(server.address, "s2", "alpha", wire), peers(server.address, "s1", "beta", wire))
    for other in others:
        future = other.compute(connection_id, 1000)
        assert _status(future) == grpc.StatusCode.UNAVAILABLE
    assert _status(owner.compute("0123456789abcdef", 1000)) == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as info:
        peers(server.address, "s3", token="gamma", wire=wire)  # no token, no ticket
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_lying_or_oversized_bulk_frames_are_refused(start_server, peers, wire):
    server = start_server(Scale(torch.float64), wire.server(limits=Limits(max_payload_bytes=MiB)))
    peer = peers(server.address, wire=wire)
    sock, connection_id = peer.open()
    future = peer.compute(connection_id, 2 * MiB)  # over the limit: refused before any byte
    with pytest.raises(grpc.RpcError) as info:
        future.result()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_payload_bytes=1048576" in info.value.details()
    assert _recv(sock, 1) == b""  # dropped: bytes the client sent would be read as the next
    sock, connection_id = peer.open()
    future = peer.compute(connection_id, 1000)  # this time the bulk prefix lies
    sock.sendall(PREFIX.pack(b"RAQ1", 0, 999_999))
    with pytest.raises(grpc.RpcError) as info:
        future.result()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the header declares 1000" in info.value.details()
    assert _recv(sock, 1) == b""  # and the server dropped it
    assert server.stats()["inflight_bytes"] == 0
    _still_serves(server, wire)


def test_a_stalled_or_vanished_sender_frees_the_server(start_server, peers):
    server = start_server(Scale(torch.float64), ServerOptions(bulk_timeout=0.5))
    peer = peers(server.address)
    sock, connection_id = peer.open()
    future = peer.compute(connection_id, 4096)
    sock.sendall(PREFIX.pack(b"RAQ1", 0, 4096) + b"\x00" * 100)  # then nothing
    assert _status(future) == grpc.StatusCode.UNAVAILABLE  # after bulk_timeout
    sock, connection_id = peer.open()
    future = peer.compute(connection_id, 4096)
    sock.sendall(PREFIX.pack(b"RAQ1", 0, 4096) + b"\x00" * 100)
    sock.close()  # gone mid-frame
    assert _status(future) == grpc.StatusCode.UNAVAILABLE
    assert server.stats()["inflight_bytes"] == 0
    deadline = time.monotonic() + 5
    while len(server.service.bulk) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(server.service.bulk) == 0  # both dropped
    _still_serves(server)


def test_without_a_bulk_connection_frames_go_as_grpc_streams(start_server, caplog):
    x = torch.randn(MiB // 2, dtype=torch.float64)  # 4 MiB that LZ4 cannot shrink
    # No connection may be opened: OpenBulk is refused (a named limit), the call streams.
    server = start_server(Scale(torch.float64), ServerOptions(max_bulk_connections=0))
    with RemoteModule(server.address) as remote:
        y, g = _round_trip(remote, x, torch.ones_like(x))
        assert torch.equal(g, torch.full_like(x, 1.5)) and remote.client.stats.bulk_calls == 0
        assert remote.client.stats.bytes_sent > 4 * MiB
    # The port cannot be reached: the client says so once and streams from then on.
    server = start_server(Scale(torch.float64))
    server.service.bulk.close()
    with caplog.at_level(logging.WARNING), RemoteModule(server.address) as remote:
        for _ in range(2):
            y, g = _round_trip(remote, x, torch.ones_like(x))
        assert torch.equal(y, x * 1.5) and remote.client.stats.bulk_calls == 0
    assert caplog.text.count("cannot be reached") == 1
    # Turned off on either side.
    server = start_server(Scale(torch.float64), ServerOptions(bulk=False))
    assert server.service.bulk is None
    with RemoteModule(server.address) as remote:
        _round_trip(remote, x, torch.ones_like(x))
        assert remote.client.stats.bulk_calls == 0


def test_releases_riding_on_a_backward_are_applied(start_server):
    server = start_server(Scale(torch.float64))
    with RemoteModule(server.address) as remote:
        x = torch.ones(4, dtype=torch.float64, requires_grad=True)
        first, second = remote(x), remote(x)
        first.sum().backward()  # frees the first graph: its release waits for the next call
        second.sum().backward()  # ... which is this Backward
        assert server.stats()["contexts"] <= 1
        wait_for(lambda: server.stats()["contexts"] == 0)  # the second's goes on its own


def test_receive_buffers_are_reused_once_nothing_holds_them():
    # A pool of its own: the process-wide one holds whatever earlier tests left in it.
    pool = frames._BufferPool(max_buffers=4)
    first = pool.take(MiB)
    first[0] = 7
    del first
    second = pool.take(MiB)
    assert second[0] == 7  # the same memory (fresh memory is zeros)
    third = pool.take(MiB)
    assert third[0] == 0  # the second still holds it
    tensor = torch.frombuffer(third, dtype=torch.uint8)  # what a decoded tensor does
    third[0] = 9
    del third
    assert pool.take(MiB)[0] != 9  # the tensor still holds it: not handed out again
    del tensor
    assert pool.take(MiB)[0] == 9  # free once the tensor is gone


def test_random_bytes_at_the_bulk_port_open_nothing(start_server, peers, wire):
    server = start_server(Scale(torch.float64), wire.server())
    peer = peers(server.address, wire=wire)
    generator = random.Random(7)
    for i in range(300):
        # TLS: raw bytes where the handshake should be, then (every third) inside TLS
        sock = peer.connect(tls=wire.pki is not None and i % 3 == 0)
        with contextlib.suppress(OSError):  # the server may have judged and closed it already
            sock.sendall(generator.randbytes(generator.randrange(0, 80)))
            sock.shutdown(socket.SHUT_WR)  # a short hello ends here; a long one is judged
        answer = _recv(sock, 8)
        assert answer in (b"", b"RAB1\x01") or (wire.pki is not None and b"RAB1" not in answer)
        sock.close()
    # Garbage where a call's frame should be: each refused, the connection dropped.
    for _ in range(20):
        sock, connection_id = peer.open()
        size = generator.randrange(1, 4096)
        future = peer.compute(connection_id, size)
        sock.sendall(generator.randbytes(size + PREFIX.size))
        assert _status(future) in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.UNAVAILABLE,
        )
    assert len(server.service.bulk) <= 1 and server.stats()["inflight_bytes"] == 0
    _still_serves(server, wire)


def test_max_session_bulk_connections(start_server, peers):
    server = start_server(Scale(torch.float64), ServerOptions(max_session_bulk_connections=2))
    peer = peers(server.address, "s1")
    peer.open()
    peer.stub.OpenBulk(pb.OpenBulkRequest(), metadata=peer.metadata)  # a ticket counts too
    with pytest.raises(grpc.RpcError) as info:
        peer.stub.OpenBulk(pb.OpenBulkRequest(), metadata=peer.metadata)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_session_bulk_connections=2" in info.value.details()
    other = peers(server.address, "s2")  # the cap is per session
    _, connection_id = other.open()
    assert connection_id


def test_connections_presenting_tickets_at_once_are_capped(start_server, peers):
    from remote_autograd.bulk import _MAX_HANDSHAKES, _MAX_HOST_HANDSHAKES

    server = start_server(Scale(torch.float64))
    peer = peers(server.address)
    ticket = peer.stub.OpenBulk(pb.OpenBulkRequest(), metadata=peer.metadata).ticket
    hosts = [f"127.0.0.{2 + i}" for i in range(_MAX_HANDSHAKES // _MAX_HOST_HANDSHAKES)]
    # each holds a handshake slot, from as many addresses as it takes to fill them all
    silent = [peer.connect(source=h) for h in hosts for _ in range(_MAX_HOST_HANDSHAKES)]
    wait_for(lambda: server.service.bulk.handshaking == _MAX_HANDSHAKES)
    over, answer = peer.hello(ticket)
    assert answer == b""  # closed at once, before reading the ticket
    for sock in silent:
        sock.close()  # their handshakes end (EOF), freeing the slots

    def hello_accepted() -> bool:
        sock, answer = peer.hello(ticket)  # the ticket was never read: still valid
        return answer == b"RAB1\x00"

    wait_for(hello_accepted)
    assert len(server.service.bulk) == 1


def test_one_address_holding_connections_open_takes_no_other_addresses_slots(start_server, peers):
    """A peer without a ticket that opens connections and sends nothing, more than the
    listener has handshake slots, from one address: it holds that address's few slots only,
    and a client from another address opens its bulk connection at once."""
    from remote_autograd.bulk import _MAX_HANDSHAKES, _MAX_HOST_HANDSHAKES

    server = start_server(Scale(torch.float64))
    peer = peers(server.address)
    silent = [peer.connect(tls=False, source="127.0.0.2") for _ in range(_MAX_HANDSHAKES)]
    wait_for(lambda: server.service.bulk.handshaking == _MAX_HOST_HANDSHAKES)
    sock, answer = peer.hello(peer.ticket().ticket)  # from 127.0.0.1
    assert answer == b"RAB1\x00"
    assert len(server.service.bulk) == 1
    for held in silent:
        held.close()


# -- TLS ----------------------------------------------------------------------------------------


def _tls_refused(peer: Peer, ticket: bytes, context: ssl.SSLContext) -> bool:
    """Whether a TLS connection with ``context`` presenting ``ticket`` is refused in TLS (the
    handshake fails, or under TLS 1.3 the server's alert ends the connection before any
    answer)."""
    try:
        _, answer = peer.hello(ticket, tls=context)
    except (ssl.SSLError, ConnectionError):
        return True
    return answer == b""


def test_tls_bulk_verifies_the_server_and_under_mutual_tls_the_client(start_server, peers, pki):
    mutual = Wire(pki, mutual=True)
    server = start_server(Scale(torch.float64), mutual.server())
    peer = peers(server.address, wire=mutual)
    ticket = peer.ticket().ticket  # taken over the authenticated gRPC channel
    no_certificate = bulk_client_tls(ClientOptions(root_certificates=pki["ca.pem"]))
    intruder = bulk_client_tls(
        ClientOptions(
            root_certificates=pki["ca.pem"],
            certificate_chain=pki["intruder.pem"],  # same name, the rogue CA's
            private_key=pki["intruder.key"],
        )
    )
    assert no_certificate is not None and intruder is not None
    assert _tls_refused(peer, ticket, no_certificate)
    assert _tls_refused(peer, ticket, intruder)
    with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust it
        peer.hello(ticket, tls=bulk_client_tls(ClientOptions(root_certificates=pki["rogue.pem"])))
    assert len(server.service.bulk) == 0
    _, answer = peer.hello(ticket)  # refused in TLS, the ticket was never read: still good
    assert answer == b"RAB1\x00" and len(server.service.bulk) == 1
    _still_serves(server, mutual)  # frames over mutual TLS bulk, equal to local


def test_a_bulk_port_whose_certificate_does_not_verify_is_not_used(start_server, pki, caplog):
    tls = Wire(pki)
    server = start_server(Scale(torch.float64), tls.server())
    # The bulk port now shows a certificate of another CA (a port taken over, say): the
    # client's TLS refuses it, and its frames stay in the verified gRPC channel.
    server.service.bulk.close()
    server.service.bulk = BulkListener(
        "127.0.0.1",
        max_connections=8,
        max_session_connections=8,
        timeout=10,
        hello_timeout=5,
        tls=bulk_server_tls(
            ServerOptions(certificate_chain=pki["intruder.pem"], private_key=pki["intruder.key"])
        ),
    )
    x, grad = torch.randn(2, MiB // 16, dtype=torch.float64)  # 512 KiB each, incompressible
    with (
        caplog.at_level(logging.WARNING),
        RemoteModule(server.address, options=tls.client()) as remote,
    ):
        y, g = _round_trip(remote, x, grad)
        assert torch.equal(y, x * 1.5) and torch.equal(g, grad * 1.5)
        assert remote.client.stats.bulk_calls == 0
    assert "certificate verify failed" in caplog.text and "gRPC streams" in caplog.text
    assert len(server.service.bulk) == 0


# -- the hello deadline and the client's retry ---------------------------------------------------


def test_a_client_that_lost_the_bulk_channel_tries_it_again_later(start_server, caplog):
    server = start_server(Scale(torch.float64))
    server.service.bulk.close()  # nothing listens on the port the server told
    x, grad = torch.randn(2, MiB // 16, dtype=torch.float64)
    options = ClientOptions(bulk_retry_interval=0.2)
    with caplog.at_level(logging.WARNING), RemoteModule(server.address, options=options) as remote:
        y, g = _round_trip(remote, x, grad)
        assert torch.equal(y, x * 1.5) and torch.equal(g, grad * 1.5)
        assert remote.client.stats.bulk_calls == 0 and "cannot be reached" in caplog.text
        # The channel comes back on a new port (as after a restart of the server).
        server.service.bulk = BulkListener(
            "127.0.0.1", max_connections=8, max_session_connections=8, timeout=10, hello_timeout=5
        )
        deadline = time.monotonic() + 10
        while remote.client.stats.bulk_calls == 0 and time.monotonic() < deadline:
            y, g = _round_trip(remote, x, grad)
            assert torch.equal(y, x * 1.5) and torch.equal(g, grad * 1.5)
        before = remote.client.stats.bulk_calls
        assert before > 0
        _round_trip(remote, x, grad)
        assert remote.client.stats.bulk_calls == before + 2  # for good: both frames


class StallingRelay(threading.Thread):
    """A TCP relay in front of the bulk port: its first connection's reply (server to client)
    stops after ``after`` bytes and never goes on, the connection left open (a link that went
    quiet, the gRPC one still up); later connections relay in full."""

    def __init__(self, target: int, after: int) -> None:
        super().__init__(daemon=True)
        self.target, self.after = target, after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self._sockets: list[socket.socket] = []

    def run(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", self.target))
                self._sockets += [client, server]
                stall = self.connections == 0
                self.connections += 1
                for source, sink, limit in ((client, server, None), (server, client, stall)):
                    args = (source, sink, self.after if limit else None)
                    threading.Thread(target=self._pump, args=args, daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        sent = 0
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if limit is not None and sent + len(data) > limit:
                    sink.sendall(data[: limit - sent])
                    threading.Event().wait()  # the rest never comes
                sink.sendall(data)
                sent += len(data)

    def close(self) -> None:
        for sock in (self.listener, *self._sockets):
            sock.close()


def test_a_reply_stalled_on_the_way_ends_by_the_calls_deadline_and_is_retried(start_server):
    """The bulk reply stops on the way after the server sent it all (its gRPC reply came): the
    client gave up never, nothing closed the connection. Now the call's deadline ends the read,
    and the call is retried on a new connection: the result as without the stall."""
    server = start_server(Scale(torch.float64))
    relay = StallingRelay(server.service.bulk.port, after=100)
    relay.start()
    server.service.bulk.port = relay.port  # what Info tells: the relay
    x = torch.randn(4, MiB // 32, dtype=torch.float64)
    options = ClientOptions(bulk_min_bytes=0, timeout=2.0, retries=2)
    remote = RemoteModule(server.address, options=options)
    got: list[torch.Tensor] = []
    call = threading.Thread(target=lambda: got.append(remote(x).detach()), daemon=True)
    try:
        call.start()
        call.join(timeout=60)
        assert not call.is_alive(), "the call still waits for the stalled reply"
        assert torch.equal(got[0], x * 1.5)
        assert relay.connections == 2  # the stalled one, then the retry's
    finally:
        relay.close()
        remote.close()


def test_a_bulk_port_that_never_answers_costs_a_call_half_its_deadline(start_server, caplog):
    """What Info names as the bulk port takes connections and never answers (a middlebox, a
    port forward to nowhere; a firewall that drops SYNs is alike): opening a connection waited
    out connect_timeout (30 s) before the call's deadline had begun, again at every
    bulk_retry_interval. Now it gets at most half the call's deadline
    (ClientOptions.bulk_connect_timeout beside), and the call goes on in gRPC messages."""
    server = start_server(Scale(torch.float64))
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel completes connects; no reply
    server.service.bulk.port = silent.getsockname()[1]
    x = torch.randn(4, MiB // 32, dtype=torch.float64)
    options = ClientOptions(timeout=4.0, connect_timeout=120.0, bulk_retry_interval=0.1)
    remote = RemoteModule(server.address, options=options)
    got: list[torch.Tensor] = []

    def calls() -> None:
        for _ in range(2):  # the second tries the channel again
            got.append(remote(x).detach())
            time.sleep(0.2)

    call = threading.Thread(target=calls, daemon=True)
    try:
        with caplog.at_level(logging.WARNING):
            call.start()
            call.join(timeout=60)  # a guard (connect_timeout is 120 s), not a measurement
            assert not call.is_alive(), "a call waited out connect_timeout"
        assert len(got) == 2 and all(torch.equal(y, x * 1.5) for y in got)
        assert remote.client.stats.bulk_calls == 0
        assert caplog.text.count("cannot be reached") == 2
    finally:
        silent.close()
        remote.close()
    for wrong in (0, -1.0, None, "10", True):
        with pytest.raises(ValueError, match="bulk_connect_timeout must be a number of seconds"):
            ClientOptions(bulk_connect_timeout=wrong)


def test_a_large_call_while_the_server_restarts_waits_for_it(start_server):
    """The client's first large call asks for a bulk ticket while its server restarts on the
    same port: OpenBulk is UNAVAILABLE for a moment and is retried as any call is, and the call
    then goes on the new server's channel (a review found a version that failed it at once)."""
    from remote_autograd import serve

    first = serve(Scale(torch.float64), "127.0.0.1:0")
    port = first.address.rsplit(":", 1)[1]
    remote = RemoteModule(first.address, options=ClientOptions(timeout=20))
    remote.remote_info()  # connected, no bulk connection yet
    first.stop(grace=None)
    restarted: list = []
    starter = threading.Timer(
        0.5, lambda: restarted.append(serve(Scale(torch.float64), f"127.0.0.1:{port}"))
    )
    starter.start()
    x = torch.randn(4, MiB // 32, dtype=torch.float64)
    try:
        with torch.no_grad():
            assert torch.equal(remote(x), x * 1.5)
        assert remote.client.stats.bulk_calls == 1
    finally:
        starter.join()
        remote.close()
        for server in restarted:
            server.stop(grace=None)


class Trickler(threading.Thread):
    """Opens bulk connections and sends their first bytes one at a time, every 0.2 s, until the
    server closes them (then opens the next), until told to stop. ``endings`` says how each
    ended: "closed" by the server, "answered" (the server judged a whole hello), "stopped"."""

    def __init__(
        self, port: int, first: bytes, stop: threading.Event, source: str = "127.0.0.1"
    ) -> None:
        super().__init__(daemon=True)
        self.port, self.first, self.stop, self.source = port, first, stop, source
        self.endings: list[str] = []

    def run(self) -> None:
        until = time.monotonic() + 20  # bounded whatever happens
        while not self.stop.is_set() and time.monotonic() < until:
            self.endings.append(self._one())

    def _one(self) -> str:
        try:
            address = ("127.0.0.1", self.port)
            sock = socket.create_connection(address, timeout=5, source_address=(self.source, 0))
        except OSError:
            return "closed"
        with sock:
            sock.settimeout(0.2)
            try:
                sock.sendall(self.first)
                while not self.stop.is_set():
                    try:
                        if sock.recv(64):
                            return "answered"
                        return "closed"
                    except TimeoutError:
                        sock.sendall(b"\x00")
            except OSError:
                return "closed"
        return "stopped"


def test_slow_hellos_hold_no_handshake_slot_past_the_deadline(start_server, wire):
    """Peers trickling their hellos from as many addresses as it takes fill every handshake
    slot; each is cut at the hello deadline, a client already connected keeps its bulk
    channel, and a new client whose connection was refused meanwhile gets the channel once
    the slots free up."""
    from remote_autograd.bulk import _MAX_HANDSHAKES, _MAX_HOST_HANDSHAKES

    server = start_server(Scale(torch.float64), wire.server(bulk_hello_timeout=0.5))
    listener = server.service.bulk
    x, grad = torch.randn(2, MiB // 16, dtype=torch.float64)
    options = wire.client(bulk_retry_interval=0.1)
    # TLS: a handshake record header that promises 512 bytes; plain: the start of a hello
    first = b"\x16\x03\x01\x02\x00" if wire.pki is not None else b"RAB1"
    stop = threading.Event()
    hosts = [f"127.0.0.{2 + i}" for i in range(_MAX_HANDSHAKES // _MAX_HOST_HANDSHAKES)]
    tricklers = [
        Trickler(listener.port, first, stop, host)
        for host in hosts
        for _ in range(_MAX_HOST_HANDSHAKES)
    ]
    with (
        RemoteModule(server.address, options=options) as old,
        RemoteModule(server.address, options=options) as new,
    ):
        _round_trip(old, x, grad)  # its connection is open before the slots fill
        assert old.client.stats.bulk_calls == 2
        try:
            for trickler in tricklers:
                trickler.start()
            deadline = time.monotonic() + 10
            while listener.handshaking < _MAX_HANDSHAKES and time.monotonic() < deadline:
                time.sleep(0.01)
            assert listener.handshaking == _MAX_HANDSHAKES  # every slot held by a trickler
            for _ in range(3):
                y, g = _round_trip(old, x, grad)
                assert torch.equal(y, x * 1.5) and torch.equal(g, grad * 1.5)
            assert old.client.stats.bulk_calls == 8
            y, g = _round_trip(new, x, grad)  # its hello is likely refused: streams
            assert torch.equal(y, x * 1.5) and torch.equal(g, grad * 1.5)
            while time.monotonic() < deadline:
                closed = sum(t.endings.count("closed") for t in tricklers)
                if closed >= 2 * len(tricklers):  # every trickler cut twice
                    break
                time.sleep(0.05)
        finally:
            stop.set()
            for trickler in tricklers:
                trickler.join(timeout=10)
        endings = [e for t in tricklers for e in t.endings]
        assert endings.count("closed") >= 2 * len(tricklers) and "answered" not in endings
        deadline = time.monotonic() + 10
        while new.client.stats.bulk_calls == 0 and time.monotonic() < deadline:
            y, g = _round_trip(new, x, grad)
            assert torch.equal(y, x * 1.5) and torch.equal(g, grad * 1.5)
        assert new.client.stats.bulk_calls >= 2


def test_a_server_restarted_without_a_bulk_channel_gets_large_frames_by_grpc(start_server):
    """A client that used the bulk channel, then its server restarted on the same address
    without one: large frames go as gRPC streams (they were refused for good, INVALID_ARGUMENT,
    by the Compute naming a stale connection and then by OpenBulk)."""
    server = start_server(Scale(torch.float64))
    port = server.port
    x, grad = torch.randn(2, MiB // 16, dtype=torch.float64)
    with RemoteModule(server.address, options=ClientOptions(retries=3)) as remote:
        y, g = _round_trip(remote, x, grad)
        assert remote.client.stats.bulk_calls == 2
        server.stop(grace=None)
        restarted = serve(
            Scale(torch.float64), f"127.0.0.1:{port}", options=ServerOptions(bulk=False)
        )
        try:
            for _ in range(2):
                y, g = _round_trip(remote, x, grad)
                assert torch.equal(y, x * 1.5) and torch.equal(g, grad * 1.5)
            assert remote.client.stats.bulk_calls == 2
        finally:
            restarted.stop(grace=None)


class _Held(torch.nn.Module):
    """Scales by 1.5; a forward of a single 42 says it ``entered`` and waits for ``release``
    (a call holding the server's one worker)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([1.5], dtype=torch.float64))
        self.entered, self.release = threading.Event(), threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 1 and float(x) == 42.0:
            self.entered.set()
            self.release.wait(60)
        return x * self.weight


def _bytes_waiting(server) -> bool:
    """Whether a bulk connection of ``server`` has bytes that nobody has read yet."""
    socks = [c.sock for c in list(server.service.bulk._connections.values())]
    return bool(socks) and bool(select.select(socks, [], [], 0)[0])


def test_a_call_waiting_for_a_worker_keeps_its_bulk_connection(start_server):
    """On a busy server (its one worker held) a bulk call's frame arrives before a worker can
    read it. The sweeper's prune leaves such a connection alone (it closed it, and the call
    failed), and the call is answered once the worker is free."""
    trunk = _Held()
    server = start_server(trunk, ServerOptions(max_workers=1))
    x = torch.randn(1, MiB // 8, dtype=torch.float64)
    holder = RemoteModule(server.address)
    remote = RemoteModule(server.address, options=ClientOptions(retries=0))
    with torch.no_grad():
        remote(x)  # its bulk connection is open
        busy = threading.Thread(target=lambda: holder(torch.full((1, 1), 42.0).double()))
        busy.start()
        assert trunk.entered.wait(30)  # the one worker is held
        result: list[torch.Tensor] = []
        call = threading.Thread(target=lambda: result.append(remote(x)))
        call.start()
        wait_for(lambda: _bytes_waiting(server))  # its frame arrived; no worker reads it
        assert server.service.bulk.prune() == 0
        trunk.release.set()
        call.join(60)
        busy.join(60)
    assert torch.equal(result[0], x * 1.5)
    holder.close()
    remote.close()
