"""Fair shares between clients of one trunk server, and the operations around them.

Request ids live inside their session; per-identity shares of sessions, contexts and bytes in
flight; the Step's wait budget for other sessions' forwards; health during a graceful shutdown;
the Checkpoint RPC's rate limit. Real servers on 127.0.0.1:0, numbers checked against the same
computation done locally in float64.
"""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from polling import wait_for
from torch import nn

from remote_autograd import (
    ClientOptions,
    ContextNotFound,
    InvalidRequest,
    LimitExceeded,
    RemoteModule,
    RemoteOptimizer,
    ServerOptions,
    ServerUnavailable,
    serve,
)
from remote_autograd._proto import remote_autograd_pb2 as pb
from remote_autograd._proto import remote_autograd_pb2_grpc as pb_grpc
from remote_autograd.client import TrunkClient
from remote_autograd.sessions import ANONYMOUS
from remote_autograd.transport import SESSION_METADATA_KEY

# Several clients train one shared trunk in turn here, each checked from the weights the last
# one left: starting from a stepped trunk is the point, not a mistake (SteppedTrunkWarning).
pytestmark = pytest.mark.filterwarnings("ignore::remote_autograd.SteppedTrunkWarning")

TOKENS = ("alpha-token", "beta-token")


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 2).double()


def _session(server, client: TrunkClient):
    return next(s for s in server.engine.sessions.values() if s.key.endswith(client.session_id))


def _client(server, token: str | None, **options) -> TrunkClient:
    return TrunkClient(server.address, ClientOptions(token=token, retries=0, **options))


# -- request ids live inside their session ---------------------------------------------------


@pytest.mark.parametrize(
    "tokens", [TOKENS, (TOKENS[0], TOKENS[0])], ids=["two-tokens", "one-token"]
)
def test_the_same_request_id_in_two_sessions_names_two_contexts(start_server, tokens):
    server = start_server(_linear(), ServerOptions(tokens=TOKENS))
    local = _linear()
    alice, bob = (_client(server, token) for token in tokens)
    generator = torch.Generator().manual_seed(7)
    xa, xb, ga, gb = (
        torch.randn(3, n, dtype=torch.float64, generator=generator) for n in (4, 4, 2, 2)
    )
    kept = {"needs_input_grad": [True], "keep_context": True, "training": True}

    with pytest.raises(ContextNotFound):  # Bob cannot reach Alice's id before it exists either
        bob.backward("shared-id", 1, [gb], [True])
    alice.compute("shared-id", [xa], {}, **kept)
    bob.compute("shared-id", [xb], {}, **kept)  # must not replace or evict Alice's context
    assert server.stats()["contexts"] == 2
    grads_b, _ = bob.backward("shared-id", 1, [gb], [True])
    grads_a, _ = alice.backward("shared-id", 1, [ga], [True])

    for x, g, got, client in ((xa, ga, grads_a, alice), (xb, gb, grads_b, bob)):
        local.zero_grad()
        x = x.clone().requires_grad_()
        local(x).backward(g)
        assert torch.equal(got["grads"][0], x.grad)
        session = _session(server, client)
        assert torch.equal(session.grads["weight"], local.weight.grad)
        assert torch.equal(session.grads["bias"], local.bias.grad)
    alice.close()
    bob.close()


def test_not_found_says_nothing_about_other_sessions(start_server):
    server = start_server(_linear(), ServerOptions(tokens=TOKENS, max_session_contexts=1))
    alice, bob = _client(server, TOKENS[0]), _client(server, TOKENS[1])
    x, g = torch.ones(1, 4, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    kept = {"needs_input_grad": [False], "keep_context": True, "training": True}
    alice.compute("released-id", [x], {}, **kept)
    stub = alice._connect()
    stub.Release(pb.ReleaseRequest(request_ids=["released-id"]), **alice._kw(10))
    alice.compute("evicted-id0", [x], {}, **kept)
    alice.compute("current-id0", [x], {}, **kept)  # evicts evicted-id0 (max_session_contexts)

    with pytest.raises(ContextNotFound, match="released by the client"):
        alice.backward("released-id", 1, [g], [False])  # her own history: she is told why
    never = _message(bob, "never-exist0")
    for request_id in ("released-id", "evicted-id0", "current-id0"):
        # Bob hears exactly what he hears of an id that never existed anywhere.
        assert _message(bob, request_id).replace(request_id, "X") == never.replace(
            "never-exist0", "X"
        )
    assert "max_session_contexts" not in never and "released" in never  # the generic text
    alice.backward("current-id0", 1, [g], [False])  # Alice's context is intact
    alice.close()
    bob.close()


def _message(client: TrunkClient, request_id: str) -> str:
    with pytest.raises(ContextNotFound) as caught:
        client.backward(request_id, 1, [torch.ones(1, 2, dtype=torch.float64)], [False])
    return str(caught.value)


# -- per-identity shares ---------------------------------------------------------------------


def test_one_identity_cannot_take_every_session(start_server):
    options = ServerOptions(tokens=TOKENS, max_sessions=4, max_sessions_per_identity=2)
    server = start_server(_linear(), options)
    greedy = [_client(server, TOKENS[0]) for _ in range(3)]
    for client in greedy[:2]:
        client.configure_optimizer("SGD", {"lr": 0.1})
    with pytest.raises(LimitExceeded, match="max_sessions_per_identity=2"):
        greedy[2].configure_optimizer("SGD", {"lr": 0.1})
    assert server.stats()["sessions"] == 2
    _train_and_check(server, TOKENS[1])  # another identity still gets in, and trains right
    for client in greedy:
        client.close()


def test_info_calls_hold_no_session(start_server):
    server = start_server(_linear(), ServerOptions(tokens=TOKENS, max_sessions=2))
    with grpc.insecure_channel(server.address) as channel:
        info = pb_grpc.TrunkStub(channel).Info
        for index in range(70):
            metadata = (("ra-session", f"probe{index}"), ("authorization", f"Bearer {TOKENS[0]}"))
            assert info(pb.InfoRequest(), metadata=metadata, timeout=10).trainable_numel == 10
    assert server.stats()["sessions"] == 0
    _train_and_check(server, TOKENS[0])
    _train_and_check(server, TOKENS[1])


def test_a_closed_client_gives_its_session_back(start_server):
    options = ServerOptions(tokens=TOKENS, max_sessions_per_identity=2)
    server = start_server(_linear(), options)
    for _ in range(5):  # a sweep of runs in one process: each closes, none is refused
        remote = RemoteModule(server.address, options=ClientOptions(token=TOKENS[0]))
        optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
        kept = remote(torch.ones(2, 4, dtype=torch.float64, requires_grad=True))
        kept.sum().backward()
        optimizer.step()
        kept = remote(torch.ones(2, 4, dtype=torch.float64, requires_grad=True))
        assert server.stats()["sessions"] == 1 and server.stats()["contexts"] >= 1
        remote.close()
        assert server.stats()["sessions"] == 0  # with its contexts, gradients and optimizer
        assert server.stats()["contexts"] == 0
    prober = _client(server, TOKENS[1])
    prober.info()
    prober.close()  # only Info: nothing to end, and no session is made to end it
    assert server.stats()["sessions"] == 0
    # A release thread that outlived its server (a restart, a new server on the same port)
    # releases into no session, and makes none: one made by it once stood beside a test's own.
    stray = _client(server, TOKENS[1])
    stray.info()  # connected: its release thread sends
    stray.schedule_release("0123456789abcdef")
    wait_for(lambda: not stray._pending_releases, timeout=10)
    assert server.stats()["sessions"] == 0
    stray.close()


def test_without_authentication_there_is_one_identity_and_no_share(start_server):
    server = start_server(_linear(), ServerOptions(max_sessions=3, max_sessions_per_identity=1))
    clients = [_client(server, None) for _ in range(3)]
    for client in clients:  # all "anonymous": only max_sessions applies
        client.configure_optimizer("SGD", {"lr": 0.1})
    assert {s.key.partition("/")[0] for s in server.engine.sessions.values()} == {ANONYMOUS}
    with pytest.raises(LimitExceeded, match="max_sessions=3"):
        _client(server, None).configure_optimizer("SGD", {"lr": 0.1})
    for client in clients:
        client.close()


def test_one_identity_cannot_push_out_the_contexts_of_another(start_server):
    options = ServerOptions(tokens=TOKENS, max_contexts=8, max_identity_contexts=2)
    server = start_server(_linear(), options)
    strict = ClientOptions(token=TOKENS[1], recover_contexts=False)  # eviction = an error
    patient = RemoteModule(server.address, options=strict)
    kept = patient(torch.ones(1, 4, dtype=torch.float64, requires_grad=True))
    greedy = [RemoteModule(server.address, options=ClientOptions(token=TOKENS[0])) for _ in "ab"]
    x = torch.ones(1, 4, dtype=torch.float64, requires_grad=True)
    outputs = [module(x) for _ in range(5) for module in greedy]  # two sessions, one identity
    assert server.stats()["contexts"] == 3  # two of the greedy identity's, one of the patient
    kept.sum().backward()  # still there
    del outputs


def test_one_identity_cannot_hold_every_byte_in_flight(start_server):
    options = ServerOptions(
        tokens=TOKENS, unary_payload_bytes=1024, max_identity_inflight_bytes=100_000, bulk=False
    )
    server = start_server(_linear(), options)
    generator = torch.Generator().manual_seed(3)  # random: LZ4 cannot shrink it
    big, small = (torch.randn(n, 4, dtype=torch.float64, generator=generator) for n in (4096, 2048))
    greedy = RemoteModule(server.address, options=ClientOptions(token=TOKENS[0], retries=0))
    with pytest.raises(LimitExceeded, match="max_identity_inflight_bytes=100000"):
        greedy(big)  # 128 KiB streamed: over this identity's share, under max_inflight_bytes
    assert torch.equal(greedy(small), _linear()(small).detach())  # 64 KiB streamed: fits
    other = RemoteModule(server.address, options=ClientOptions(token=TOKENS[1]))
    assert torch.equal(other(small), _linear()(small).detach())


def _train_and_check(server, token: str) -> None:
    """One SGD step of a fresh client, checked against the same step done locally."""
    local = nn.Linear(4, 2).double()
    local.load_state_dict(server.engine.module.state_dict())
    remote = RemoteModule(server.address, options=ClientOptions(token=token))
    optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
    x = torch.arange(8, dtype=torch.float64).reshape(2, 4)
    remote(x).square().sum().backward()
    optimizer.step()
    local(x).square().sum().backward()
    torch.optim.SGD(local.parameters(), lr=0.1).step()
    for name, value in server.engine.module.state_dict().items():
        assert torch.equal(value, local.state_dict()[name]), name
    remote.close()


# -- a Step's wait budget ----------------------------------------------------------------------


def test_a_forward_that_never_gets_its_backward_costs_one_budget(start_server):
    server = start_server(_linear(), ServerOptions(step_wait=0.2))
    stray = RemoteModule(server.address)  # keeps a forward every step, never its Backward
    RemoteOptimizer(stray, "SGD", lr=0.1)
    worker = RemoteModule(server.address)
    optimizer = RemoteOptimizer(worker, "SGD", lr=0.1)
    local = _linear()
    local_optimizer = torch.optim.SGD(local.parameters(), lr=0.1)
    kept = []
    for step in range(3):
        kept.append(stray(torch.ones(1, 4, dtype=torch.float64)))
        x = torch.full((2, 4), float(step), dtype=torch.float64)
        optimizer.zero_grad()
        worker(x).square().sum().backward()
        if step == 0:
            with pytest.warns(RuntimeWarning, match="whole step_wait budget"):
                optimizer.step()  # waits out the budget for the stray forward
        else:
            optimizer.step()  # the stray session is overdue: not waited for again
        local_optimizer.zero_grad()
        local(x).square().sum().backward()
        local_optimizer.step()
    stats = worker.client.stats
    assert (stats.step_waits, stats.step_waits_expired) == (1, 1)
    assert server.stats()["step_waits_expired"] == 1  # the operator sees it too
    assert stats.step_wait_seconds > 0
    for name, value in server.engine.module.state_dict().items():
        assert torch.equal(value, local.state_dict()[name]), name


def test_a_step_reply_says_how_long_it_waited(start_server):
    server = start_server(_linear(), ServerOptions(step_wait=60.0))
    a, b = TrunkClient(server.address), TrunkClient(server.address)
    a.configure_optimizer("SGD", {"lr": 0.1})
    b.configure_optimizer("SGD", {"lr": 0.1})
    x, g = torch.ones(1, 4, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    kept = {"needs_input_grad": [False], "keep_context": True, "training": True}
    a.compute("a-forward", [x], {}, **kept)
    b.compute("b-forward", [x], {}, **kept)
    b.backward("b-forward", 1, [g], [False])
    replies: list[pb.StepReply] = []
    stepping = threading.Thread(target=lambda: replies.append(b.step(1, [{"lr": 0.1}])))
    stepping.start()
    wait_for(lambda: server.engine.turns._steps_waiting == 1)
    a.backward("a-forward", 1, [g], [False])  # lets B's Step go, within its budget
    stepping.join()
    assert replies[0].waited_forwards == 1 and not replies[0].wait_expired
    assert replies[0].wait_seconds > 0
    assert (b.stats.step_waits, b.stats.step_waits_expired) == (1, 0)
    a.close()
    b.close()


def test_a_step_whose_session_ends_while_it_waits_moves_nothing(start_server):
    """B's Step waits for A's forward; meanwhile B's session is ended (EndSession, as its
    client's close sends). When A's Backward lets the Step go, it is refused with the reason
    and the shared weights stay as they were; A then steps as it would alone."""
    server = start_server(_linear(), ServerOptions(step_wait=60.0))
    a, b = TrunkClient(server.address), TrunkClient(server.address)
    a.configure_optimizer("SGD", {"lr": 0.5})
    b.configure_optimizer("SGD", {"lr": 0.5})
    before = {n: p.detach().clone() for n, p in server.engine.module.named_parameters()}
    x = torch.arange(4, dtype=torch.float64).reshape(1, 4)
    g = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    kept = {"needs_input_grad": [False], "keep_context": True, "training": True}
    a.compute("a-forward", [x], {}, **kept)
    b.compute("b-forward", [x], {}, **kept)
    b.backward("b-forward", 1, [g], [False])
    errors: list[BaseException] = []

    def step_b() -> None:
        try:
            b.step(1, [{"lr": 0.5}])
        except InvalidRequest as exc:
            errors.append(exc)

    stepping = threading.Thread(target=step_b)
    stepping.start()
    wait_for(lambda: server.engine.turns._steps_waiting == 1)
    with grpc.insecure_channel(server.address) as channel:
        ended = pb_grpc.TrunkStub(channel).EndSession(
            pb.EndSessionRequest(), metadata=((SESSION_METADATA_KEY, b.session_id),), timeout=10
        )
    assert ended.ended
    a.backward("a-forward", 1, [g], [False])  # lets B's Step go
    stepping.join()
    assert len(errors) == 1 and "ended while this call waited" in str(errors[0])
    assert server.engine.weights_version == 0
    for name, param in server.engine.module.named_parameters():
        assert torch.equal(param.detach(), before[name]), name
    assert a.step(1, [{"lr": 0.5}]).weights_version == 1
    local = _linear()
    local(x).backward(g)
    with torch.no_grad():
        for name, param in server.engine.module.named_parameters():
            expected = (
                dict(local.named_parameters())[name]
                - 0.5 * dict(local.named_parameters())[name].grad
            )
            assert torch.equal(param.detach(), expected), name
    a.close()
    b.close()


def test_a_forward_whose_session_ends_while_it_runs_keeps_no_context(start_server):
    """The session ends (EndSession) while its kept forward runs: the context it would cache,
    and the lease that would make every other session's Step wait, are not kept."""
    gate = _Gate()
    server = start_server(gate, ServerOptions(step_wait=60.0))
    a = TrunkClient(server.address)
    a.info()
    errors: list[BaseException] = []

    def forward() -> None:
        try:
            a.compute(
                "kept",
                [torch.ones(2)],
                {},
                needs_input_grad=[True],
                keep_context=True,
                training=True,
            )
        except InvalidRequest as exc:
            errors.append(exc)

    running = threading.Thread(target=forward)
    running.start()
    assert gate.entered.wait(30)
    with grpc.insecure_channel(server.address) as channel:
        ended = pb_grpc.TrunkStub(channel).EndSession(
            pb.EndSessionRequest(), metadata=((SESSION_METADATA_KEY, a.session_id),), timeout=10
        )
    assert ended.ended
    gate.open.set()
    running.join()
    assert len(errors) == 1 and "ended while its forward ran" in str(errors[0])
    assert server.stats()["contexts"] == 0
    assert server.engine.turns.others_holding("") == 0  # no lease left for a Step to wait on
    a.close()


# -- operations: health while draining, the Checkpoint RPC's rate -----------------------------


class _Gate(nn.Module):
    """A trunk whose forward blocks until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.open = threading.Event(), threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        assert self.open.wait(60)
        return x + 1


def test_health_says_not_serving_while_calls_drain():
    gate = _Gate()
    server = serve(gate)
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)

    def status() -> int:
        return health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status

    assert status() == health_pb2.HealthCheckResponse.SERVING
    remote = RemoteModule(server.address)
    results: list[torch.Tensor] = []
    call = threading.Thread(target=lambda: results.append(remote(torch.zeros(2))))
    call.start()
    assert gate.entered.wait(30)
    stopping = threading.Thread(target=server.stop, kwargs={"grace": 60})
    stopping.start()
    wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING)
    assert status() == health_pb2.HealthCheckResponse.NOT_SERVING  # still answering
    late = RemoteModule(server.address, options=ClientOptions(retries=0))
    with pytest.raises(ServerUnavailable, match="shutting down"):
        late(torch.zeros(2))
    gate.open.set()
    call.join(60)
    stopping.join(60)
    assert torch.equal(results[0], torch.ones(2))  # the call in flight finished
    assert not stopping.is_alive()
    assert server._drain.inflight == 0  # every call counted in was counted out
    channel.close()


def test_the_checkpoint_rpc_is_rate_limited(start_server, tmp_path):
    path = tmp_path / "trunk.ckpt"
    options = ServerOptions(checkpoint_path=str(path), min_checkpoint_interval=3600)
    server = start_server(_linear(), options)
    client = TrunkClient(server.address)
    assert client.checkpoint().weights_version == 0
    written = path.stat().st_mtime_ns
    # Nothing changed since (a retry of a Checkpoint whose reply was lost, say): answered with
    # the version the file holds, nothing written.
    assert client.checkpoint().weights_version == 0
    assert path.stat().st_mtime_ns == written
    newcomer = RemoteModule(server.address)
    RemoteOptimizer(newcomer, "SGD", lr=0.1)  # a session the file does not hold yet
    with pytest.raises(LimitExceeded, match="min_checkpoint_interval=3600"):
        client.checkpoint()
    newcomer.close()
    _train_and_check(server, None)  # the weights move: a new checkpoint is paced
    with pytest.raises(
        LimitExceeded, match=r"ask again in \d+\.\d s \(min_checkpoint_interval=3600"
    ):
        client.checkpoint()
    assert path.stat().st_mtime_ns == written
    client.close()
