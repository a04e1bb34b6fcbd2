"""TLS, mutual TLS, bearer tokens, sessions bound to their token, plain text only on loopback,
no unpickling, health/reflection and graceful shutdown."""

from __future__ import annotations

import logging
import pathlib
import re
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pki import make_pki
from torch import nn

from remote_autograd import (
    AuthenticationError,
    ClientOptions,
    ContextNotFound,
    RemoteModule,
    RemoteOptimizer,
    ServerOptions,
    ServerUnavailable,
    SteppedTrunkWarning,
    serve,
)
from remote_autograd._proto import remote_autograd_pb2 as pb
from remote_autograd._proto import remote_autograd_pb2_grpc as pb_grpc
from remote_autograd.client import TrunkClient

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "remote_autograd"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, bytes]:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a rogue CA's."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 2).double()


def _one_step(address: str, options: ClientOptions) -> torch.Tensor:
    with RemoteModule(address, options=options) as remote:
        optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
        x = torch.ones(3, 4, dtype=torch.float64, requires_grad=True)
        remote(x).sum().backward()
        optimizer.step()
        return x.grad


def _fails(address: str, options: ClientOptions, error: type[Exception]) -> None:
    options = ClientOptions(**{**options.__dict__, "connect_timeout": 1.0, "retries": 0})
    with pytest.raises(error), RemoteModule(address, options=options) as remote:
        remote(torch.ones(1, 4, dtype=torch.float64))


def test_a_tls_client_at_a_plain_text_port_is_told_at_once(start_server, pki):
    """The handshake's answer is not TLS (WRONG_VERSION_NUMBER): said at once, where gRPC
    retries it as a server that is down for all of connect_timeout."""
    server = start_server(_linear())
    options = ClientOptions(connect_timeout=20.0, retries=0, root_certificates=pki["ca.pem"])
    with pytest.raises(ServerUnavailable, match="the port does not speak TLS"):
        RemoteModule(server.address, options=options)(torch.ones(1, 4, dtype=torch.float64))


def test_tls(start_server, pki):
    options = ServerOptions(certificate_chain=pki["server.pem"], private_key=pki["server.key"])
    server = start_server(_linear(), options)
    assert server.service.bulk.tls is not None  # no plain-text side channel beside a TLS port
    expected = _linear().weight.sum(0).expand(3, 4)
    grad = _one_step(server.address, ClientOptions(root_certificates=pki["ca.pem"]))
    assert torch.equal(grad, expected)
    _fails(server.address, ClientOptions(), ServerUnavailable)  # plain text to a TLS port
    rogue = ClientOptions(root_certificates=pki["rogue.pem"])  # the server's does not verify
    _fails(server.address, rogue, AuthenticationError)


def test_mutual_tls(start_server, pki):
    options = ServerOptions(
        certificate_chain=pki["server.pem"], private_key=pki["server.key"], client_ca=pki["ca.pem"]
    )
    server = start_server(_linear(), options)
    trusted = ClientOptions(root_certificates=pki["ca.pem"])
    ended: list[str] = []  # session keys, as each session ends (the client closes)
    server.engine.session_listeners.append(ended.append)
    _one_step(
        server.address,
        ClientOptions(
            root_certificates=pki["ca.pem"],
            certificate_chain=pki["client.pem"],
            private_key=pki["client.key"],
        ),
    )
    assert "/cn=client-1/" in ended[0]  # the session is bound to the certificate's identity
    for options in (
        trusted,  # no client certificate
        ClientOptions(
            root_certificates=pki["ca.pem"],
            certificate_chain=pki["intruder.pem"],
            private_key=pki["intruder.key"],
        ),  # same CN, wrong CA
    ):
        _fails(server.address, options, ServerUnavailable)


def test_a_refused_certificate_is_named(start_server, pki):
    """gRPC reports a certificate that does not verify as a server that is down ("Socket
    closed"), and the client waited out connect_timeout (30 s) to say "is it running?". A
    server certificate that does not verify here is named at once, by a TLS handshake of the
    client's own (AuthenticationError). A client certificate the server refuses (none, or
    another CA's) ends in a close that a TLS proxy whose backend is not up also makes: the
    client waits as before, and then says the certificate may be why."""
    options = ServerOptions(
        certificate_chain=pki["server.pem"], private_key=pki["server.key"], client_ca=pki["ca.pem"]
    )
    server = start_server(_linear(), options)
    intruder = {"certificate_chain": pki["intruder.pem"], "private_key": pki["intruder.key"]}
    x = torch.ones(1, 4, dtype=torch.float64)
    rogue = ClientOptions(connect_timeout=20.0, retries=0, root_certificates=pki["rogue.pem"])
    with pytest.raises(AuthenticationError, match="TLS handshake with .* failed.*verif"):
        RemoteModule(server.address, options=rogue)(x)
    for fields in ({}, intruder):  # no client certificate, another CA's
        refused = ClientOptions(
            connect_timeout=1.0, retries=0, root_certificates=pki["ca.pem"], **fields
        )
        with pytest.raises(ServerUnavailable, match="accept this client's certificate"):
            RemoteModule(server.address, options=refused)(x)


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_large_frames_over_tls_take_the_tls_bulk_channel(start_server, pki, mutual):
    server_options = ServerOptions(
        certificate_chain=pki["server.pem"],
        private_key=pki["server.key"],
        client_ca=pki["ca.pem"] if mutual else None,
    )
    server = start_server(nn.Identity(), server_options)
    client_options = ClientOptions(
        root_certificates=pki["ca.pem"],
        certificate_chain=pki["client.pem"] if mutual else None,
        private_key=pki["client.key"] if mutual else None,
    )
    x = torch.randn(4, 1 << 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with RemoteModule(server.address, options=client_options) as remote:
        y = remote(x.requires_grad_())  # 2 MiB each way, LZ4 cannot shrink it
        y.backward(2 * x.detach())
        assert torch.equal(y, x) and torch.equal(x.grad, 2 * x.detach())
        assert remote.client.stats.bulk_calls == 2  # Compute and Backward, inside TLS
        (connection,) = server.service.bulk._connections.values()
        key = server.engine.sessions.values()[0].key
        assert connection.session == key  # bound to the session (under mTLS: its CN too)
        assert ("/cn=client-1/" in key) == mutual


# Two tokens train one trunk in turn: the second is told the first stepped it.
@pytest.mark.filterwarnings("ignore::remote_autograd.SteppedTrunkWarning")
def test_tokens_are_required_and_checked(start_server):
    server = start_server(_linear(), ServerOptions(tokens=("alpha-token", "beta-token")))
    for token in (None, "", "wrong", "alpha-token2", "alpha"):
        with pytest.raises(AuthenticationError, match="bearer token"):
            TrunkClient(server.address, ClientOptions(token=token, retries=0)).info()
    assert server.stats()["sessions"] == 0  # refused before any session state
    _one_step(server.address, ClientOptions(token="alpha-token"))
    _one_step(server.address, ClientOptions(token="beta-token"))


@pytest.mark.parametrize(
    "offered, accepted",
    [
        ("Bearer alpha-token", True),
        ("bearer alpha-token", True),  # the scheme is case-insensitive (RFC 7235)
        ("Basic alpha-token", False),
        ("Token alpha-token", False),
        ("alpha-token", False),  # no scheme at all
        (" alpha-token", False),
        ("Bearer  alpha-token", False),
        ("Bearer alpha-token ", False),
    ],
)
def test_the_token_must_come_with_the_bearer_scheme(start_server, offered, accepted):
    server = start_server(_linear(), ServerOptions(tokens=("alpha-token",)))
    metadata = (("ra-session", "s1"), ("authorization", offered))
    with grpc.insecure_channel(server.address) as channel:
        info = pb_grpc.TrunkStub(channel).Info
        if accepted:
            assert info(pb.InfoRequest(), metadata=metadata, timeout=10).trainable_numel == 10
            assert server.stats()["sessions"] == 0  # Info authenticates; it holds no session
            return
        with pytest.raises(grpc.RpcError) as caught:
            info(pb.InfoRequest(), metadata=metadata, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "missing or unknown bearer token" in caught.value.details()
    assert server.stats()["sessions"] == 0


def test_calls_without_a_token_cannot_hold_the_servers_threads(start_server):
    """Calls that send their headers and never their message, without a token, one per worker
    thread and more: each is refused at once, and a client with a token is answered. Health
    checks need no token; reflection needs one."""
    server = start_server(_linear(), ServerOptions(tokens=("alpha-token",), max_workers=4))
    release = threading.Event()

    def never():  # a request stream that sends nothing until the test ends
        release.wait(60)
        yield from ()

    with grpc.insecure_channel(server.address) as channel:
        compute = channel.stream_unary(
            "/remote_autograd.v1.Trunk/Compute",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        held = [compute.future(never(), timeout=60) for _ in range(8)]
        try:
            for call in held:
                assert call.exception(timeout=30).code() == grpc.StatusCode.UNAUTHENTICATED
            metadata = (("authorization", "Bearer alpha-token"),)
            info = pb_grpc.TrunkStub(channel).Info(pb.InfoRequest(), metadata=metadata, timeout=30)
            assert info.trainable_numel == 10
        finally:
            release.set()
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(reflection.ServerReflectionInfo(iter([]), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _hold(channel: grpc.Channel, method: str, token: str | None, n: int, release):
    """``n`` calls of ``method`` that send their headers and then nothing until ``release``."""

    def never():
        release.wait(60)
        yield from ()

    call = channel.stream_unary(method, request_serializer=lambda b: b, response_deserializer=None)
    # a session id too: a request stream (LoadState) is read only once its session is known
    metadata = (("authorization", f"Bearer {token}"), ("ra-session", "held")) if token else None
    return [call.future(never(), metadata=metadata, timeout=60) for _ in range(n)]


@pytest.mark.parametrize(
    "method",
    [
        "/remote_autograd.v1.Trunk/Compute",
        "/remote_autograd.v1.Trunk/Step",
        "/remote_autograd.v1.Trunk/LoadState",
    ],
)
def test_one_tokens_calls_held_open_take_no_other_tokens_threads(start_server, method):
    """Calls with a valid token that send their headers and never their message, more than
    the server has threads of any kind: another token's client trains as if alone (its
    result equals local training), and once they end, the first token's threads serve it
    again."""
    options = ServerOptions(tokens=("alpha", "beta"), max_workers=2, token_workers=2)
    server = start_server(_linear(), options)
    release = threading.Event()
    local = _linear()
    x = torch.ones(3, 4, dtype=torch.float64, requires_grad=True)
    local(x).sum().backward()
    with grpc.insecure_channel(server.address) as channel:
        held = _hold(channel, method, "alpha", 8, release)
        try:
            grad = _one_step(server.address, ClientOptions(token="beta", timeout=30))
            assert torch.equal(grad, x.grad)
            assert not any(call.done() for call in held)  # alpha's calls are still held open
        finally:
            release.set()
        for call in held:  # each ended without its message: an error, not a hang
            assert call.exception(timeout=30) is not None
    # alpha's threads serve it again, on the weights beta stepped (SGD, lr 0.1)
    torch.optim.SGD(local.parameters(), lr=0.1).step()
    x2 = torch.ones(3, 4, dtype=torch.float64, requires_grad=True)
    local(x2).sum().backward()
    with pytest.warns(SteppedTrunkWarning):
        grad = _one_step(server.address, ClientOptions(token="alpha", timeout=30))
    assert torch.equal(grad, x2.grad)


def test_health_checks_held_open_take_no_tokens_threads(start_server):
    """Health checks need no token. Anyone's health calls that send their headers and never
    their message, more than the server has threads, leave a client with a token answered;
    afterwards health answers again."""
    options = ServerOptions(tokens=("alpha",), max_workers=2)
    server = start_server(_linear(), options)
    release = threading.Event()
    with grpc.insecure_channel(server.address) as channel:
        held = _hold(channel, "/grpc.health.v1.Health/Check", None, 8, release)
        watch = _hold(channel, "/grpc.health.v1.Health/Watch", None, 8, release)
        try:
            grad = _one_step(server.address, ClientOptions(token="alpha", timeout=30))
            assert grad.shape == (3, 4)
            assert not any(call.done() for call in held + watch)
        finally:
            release.set()
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=30
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("name", ["max_workers", "token_workers"])
@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_thread_counts_must_be_whole_numbers(name, value):
    with pytest.raises(ValueError, match=f"ServerOptions.{name} must be >= 1"):
        ServerOptions(**{name: value})


def test_a_client_cannot_touch_another_clients_contexts(start_server):
    server = start_server(_linear(), ServerOptions(tokens=("alpha-token", "beta-token")))
    alice = RemoteModule(server.address, options=ClientOptions(token="alpha-token"))
    RemoteOptimizer(alice, "SGD", lr=0.1)
    y = alice(torch.ones(2, 4, dtype=torch.float64, requires_grad=True))
    request_id = server.engine.contexts._items.copy().popitem()[1].request_id

    # Mallory has the other token and even knows Alice's session id and request id.
    mallory = TrunkClient(server.address, ClientOptions(token="beta-token", retries=0))
    mallory.session_id = alice.client.session_id
    mallory._metadata = (("ra-session", mallory.session_id), mallory._metadata[1])
    grads = [torch.ones(2, 2, dtype=torch.float64)]
    with pytest.raises(ContextNotFound):
        mallory.backward(request_id, 1, grads, [False])
    assert mallory.configure_optimizer("SGD", {"lr": 5.0})  # her own session, not Alice's
    release = pb.ReleaseRequest(request_ids=[request_id])
    stub = mallory._connect()
    assert stub.Release(release, metadata=mallory._metadata, timeout=10).released == 0
    sessions = server.engine.sessions.values()
    alice_session = next(s for s in sessions if s.optimizer.defaults["lr"] == 0.1)
    assert alice_session.grads == {}
    y.sum().backward()  # Alice's context is intact, and only she accumulated into it
    assert set(alice_session.grads) == {"weight", "bias"}
    mallory.close()
    alice.close()


def test_plain_text_only_on_loopback_unless_insecure(caplog):
    with pytest.raises(ValueError, match="refusing to serve plain text on 0.0.0.0:0"):
        serve(_linear(), "0.0.0.0:0")
    with caplog.at_level(logging.WARNING, logger="remote_autograd.transport"):
        server = serve(_linear(), "0.0.0.0:0", options=ServerOptions(insecure=True))
    try:
        assert "PLAIN TEXT" in caplog.text
        _one_step(f"127.0.0.1:{server.port}", ClientOptions())
    finally:
        server.stop(grace=None)


def test_nothing_unpickles_or_evaluates():
    """Every module, remote_autograd/hf/ included. The one exception is the client-side run
    checkpoint of remote_autograd/hf/checkpoint.py (a file this process wrote), read with
    torch.load(weights_only=True): tensors and plain containers only, no arbitrary objects."""
    pattern = re.compile(
        r"import (c?pickle|dill|marshal)|\bpickle\.|torch\.load|(?<![\w.`])(eval|exec|__import__)\("
    )
    scanned = sorted(p for p in PACKAGE.rglob("*.py") if "_proto" not in p.parts)
    assert any(p.parent.name == "hf" for p in scanned)
    for path in scanned:
        hits = [
            line
            for line in path.read_text().splitlines()
            if pattern.search(line) and not _WEIGHTS_ONLY_LOAD.search(line)
        ]
        assert hits == [], f"{path.relative_to(PACKAGE)}: {hits}"
    loads = [
        (path.relative_to(PACKAGE).as_posix(), line.strip())
        for path in scanned
        for line in path.read_text().splitlines()
        if "torch.load" in line
    ]
    assert [where for where, _ in loads] == ["hf/checkpoint.py"], loads


_WEIGHTS_ONLY_LOAD = re.compile(r"torch\.load\([^)]*weights_only=True[^)]*\)")


class Slow(nn.Module):
    def __init__(self, started: threading.Event) -> None:
        super().__init__()
        self.started = started

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.started.set()
        time.sleep(0.5)
        return x + 1


def test_health_reflection_and_graceful_shutdown():
    started = threading.Event()
    server = serve(Slow(started))
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "remote_autograd.v1.Trunk"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {s.name for a in answers for s in a.list_services_response.service}
    assert {"remote_autograd.v1.Trunk", "grpc.health.v1.Health"} <= names

    remote = RemoteModule(server.address)
    results: list[torch.Tensor] = []
    call = threading.Thread(target=lambda: results.append(remote(torch.zeros(2))))
    call.start()
    assert started.wait(30)
    server.stop(grace=30)  # the call in flight finishes; new calls are refused
    call.join()
    assert torch.equal(results[0], torch.ones(2))
    with pytest.raises(ServerUnavailable):
        RemoteModule(server.address, options=ClientOptions(connect_timeout=1.0, retries=0))(
            torch.zeros(2)
        )
    channel.close()


def test_cli_flags_reach_the_server_options(tmp_path, pki):
    import argparse

    from remote_autograd.cli import add_server_arguments, server_options

    (tmp_path / "tokens.txt").write_text("alpha\n\n  beta  \n")
    for name in ("server.pem", "server.key", "ca.pem"):
        (tmp_path / name).write_bytes(pki[name])
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    args = parser.parse_args(
        [
            "--address", "0.0.0.0:1", "--insecure", "--token-file", str(tmp_path / "tokens.txt"),
            "--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key"),
            "--client-ca", str(tmp_path / "ca.pem"), "--max-payload-bytes", "1000",
            "--max-tensor-elements", "10", "--max-tensors", "3", "--max-sessions", "2",
            "--max-session-contexts", "5", "--max-inflight-bytes", "777", "--recompute",
            "--checkpoint", "ckpt", "--checkpoint-every", "4", "--checkpoint-interval", "9",
            "--no-bulk", "--bulk-port", "5001", "--bulk-timeout", "7",
        ]
    )  # fmt: skip
    options = server_options(args)
    assert options.tokens == ("alpha", "beta")
    assert options.certificate_chain == pki["server.pem"] and options.client_ca == pki["ca.pem"]
    assert options.insecure and options.recompute
    assert (options.limits.max_payload_bytes, options.limits.max_tensor_elements) == (1000, 10)
    assert (options.limits.max_tensors, options.max_sessions) == (3, 2)
    assert (options.max_session_contexts, options.max_inflight_bytes) == (5, 777)
    assert (options.checkpoint_path, options.checkpoint_every) == ("ckpt", 4)
    assert options.checkpoint_interval == 9.0
    assert (options.bulk, options.bulk_port, options.bulk_timeout) == (False, 5001, 7.0)
    defaults = server_options(parser.parse_args([]))
    assert defaults == ServerOptions()  # the flags' defaults are the library's
