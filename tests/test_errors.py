"""Every gRPC status becomes one exception of the tree, with a message that says what to do."""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc
import pytest
import torch
from polling import wait_for
from torch import nn

import remote_autograd
from remote_autograd import (
    AuthenticationError,
    ClientOptions,
    ContextNotFound,
    DeadlineExceeded,
    InvalidRequest,
    LimitExceeded,
    NotConfigured,
    RemoteAutogradError,
    RemoteModule,
    RemoteOptimizer,
    ServerOptions,
    ServerUnavailable,
    StaleContext,
    TransportError,
    TrunkError,
)
from remote_autograd._proto import remote_autograd_pb2 as pb
from remote_autograd.errors import ERROR_METADATA_KEY, from_rpc_error

# Without it the client re-creates a lost context (see tests/test_faults.py).
NO_RECOVERY = ClientOptions(recover_contexts=False)


@pytest.fixture(scope="module")
def status_server():
    """A real gRPC server whose method aborts with the status code named in the request."""

    def abort(request: bytes, context: grpc.ServicerContext) -> bytes:
        code = grpc.StatusCode[request.decode()]
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            context.set_trailing_metadata(((ERROR_METADATA_KEY, "CodecError"),))
        context.abort(code, f"aborted with {code.name}")

    server = grpc.server(futures.ThreadPoolExecutor(2))
    handler = grpc.method_handlers_generic_handler(
        "test.Status", {"Abort": grpc.unary_unary_rpc_method_handler(abort)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel.unary_unary("/test.Status/Abort")
    channel.close()
    server.stop(None)


_S = grpc.StatusCode
# What the documented tree (errors.py) says each status becomes. INVALID_ARGUMENT comes with
# ra-error=CodecError from the status server, so the metadata's class wins over the status.
EXPECTED_CLASS: dict[grpc.StatusCode, type[RemoteAutogradError]] = {
    _S.CANCELLED: TransportError,
    _S.UNKNOWN: TrunkError,
    _S.INVALID_ARGUMENT: remote_autograd.CodecError,
    _S.DEADLINE_EXCEEDED: DeadlineExceeded,
    _S.NOT_FOUND: ContextNotFound,
    _S.ALREADY_EXISTS: StaleContext,
    _S.PERMISSION_DENIED: AuthenticationError,
    _S.RESOURCE_EXHAUSTED: LimitExceeded,
    _S.FAILED_PRECONDITION: StaleContext,
    _S.ABORTED: TransportError,
    _S.OUT_OF_RANGE: InvalidRequest,
    _S.UNIMPLEMENTED: TrunkError,
    _S.INTERNAL: TrunkError,
    _S.UNAVAILABLE: ServerUnavailable,
    _S.DATA_LOSS: TrunkError,
    _S.UNAUTHENTICATED: AuthenticationError,
}


def test_the_expected_table_covers_every_status_code():
    assert set(EXPECTED_CLASS) == {c for c in grpc.StatusCode if c != grpc.StatusCode.OK}


@pytest.mark.parametrize(
    "code", [c for c in grpc.StatusCode if c != grpc.StatusCode.OK], ids=lambda c: c.name
)
def test_every_status_code_is_translated(code, status_server):
    with pytest.raises(grpc.RpcError) as caught:
        status_server(code.name.encode(), timeout=10)
    error = from_rpc_error(caught.value, method="Abort", address="127.0.0.1:1")
    assert isinstance(error, RemoteAutogradError)
    assert f"aborted with {code.name}" in str(error)
    # By identity: a subclass or a sibling sharing the status would be a different error.
    assert type(error) is EXPECTED_CLASS[code], (code, type(error))
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert isinstance(error, remote_autograd.CodecError)  # the metadata names the class
    elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        assert isinstance(error, TransportError) and code.name in str(error)
    else:
        assert getattr(error, "status", None) == code or isinstance(error, TransportError)
    if isinstance(error, TransportError):
        assert error.status == code


def test_unreachable_server_is_a_clear_error_not_a_hang():
    from remote_autograd import ClientOptions

    remote = RemoteModule("127.0.0.1:1", options=ClientOptions(connect_timeout=0.5))
    with pytest.raises(ServerUnavailable, match="no trunk server answered at 127.0.0.1:1"):
        remote(torch.randn(2))


def test_backward_after_expiry_names_the_context(start_server):
    server = start_server(nn.Linear(3, 3), ServerOptions(context_ttl=0.2))
    remote = RemoteModule(server.address, options=NO_RECOVERY)
    y = remote(torch.randn(2, 3, requires_grad=True))
    wait_for(lambda: server.stats()["contexts"] == 0)  # the sweeper expired it
    with pytest.raises(ContextNotFound, match=r"no forward context \(expired after 0.2 s idle"):
        y.sum().backward()


def test_evicted_context_says_why(start_server):
    server = start_server(nn.Linear(3, 3), ServerOptions(max_contexts=1))
    remote = RemoteModule(server.address, options=NO_RECOVERY)
    x = torch.randn(2, 3, requires_grad=True)
    first = remote(x)
    second = remote(x)
    with pytest.raises(ContextNotFound, match="evicted to stay under max_contexts=1"):
        first.sum().backward()
    second.sum().backward()  # the newest one is still there
    assert x.grad is not None


def test_trunk_exception_is_reported_and_the_server_keeps_serving(start_server):
    class Picky(nn.Module):
        def forward(self, x):
            if x.shape[-1] != 3:
                raise ValueError(f"expected 3 features, got {x.shape[-1]}")
            return x * 2

    remote = RemoteModule(start_server(Picky()).address)
    with pytest.raises(TrunkError, match="the trunk raised ValueError: expected 3 features, got 4"):
        remote(torch.randn(2, 4))
    assert torch.equal(remote(torch.ones(1, 3)), torch.full((1, 3), 2.0))


def test_an_error_too_long_for_grpc_trailers_arrives_cut_not_as_stream_removed(start_server):
    """torch's "not implemented for this backend" errors list every backend (~14 KB), past
    what gRPC lets a status message carry."""

    class Verbose(nn.Module):
        def forward(self, x):
            raise NotImplementedError("no kernel for this backend; available: " + "Cpu, " * 4000)

    remote = RemoteModule(start_server(Verbose()).address)
    with pytest.raises(TrunkError, match=r"raised NotImplementedError: no kernel") as info:
        remote(torch.ones(2))
    assert str(info.value).endswith("more characters)") and len(str(info.value)) < 2500


def test_a_trunk_error_on_every_call_logs_few_tracebacks(start_server, caplog, monkeypatch):
    """A wrong feature size raises in the trunk on every call: each is answered INTERNAL with
    its error, and the server logs the traceback of the first few only, saying how many it
    left out (each was 3 KB of log: one client could write megabytes a second)."""
    from remote_autograd import throttle

    monkeypatch.setattr(throttle, "TRACEBACKS", throttle.Throttle(burst=3, period=3600))
    remote = RemoteModule(start_server(nn.Linear(4, 4)).address)
    with caplog.at_level(logging.DEBUG, logger="remote_autograd.service"):
        for _ in range(20):
            with pytest.raises(TrunkError, match="mat1 and mat2"):
                remote(torch.ones(2, 5))
    tracebacks = [r for r in caplog.records if r.exc_info and "failed in the trunk" in r.message]
    assert len(tracebacks) == 3
    quiet = [r for r in caplog.records if r.levelno == logging.DEBUG and "mat1" in r.message]
    assert len(quiet) == 17
    throttle.TRACEBACKS.period = 0.0  # a new period: the next one is shown, with the count
    with (
        caplog.at_level(logging.DEBUG, logger="remote_autograd.service"),
        pytest.raises(TrunkError),
    ):
        remote(torch.ones(2, 5))
    assert "(17 more since, without traceback)" in caplog.records[-1].message


def test_optimizer_allowlist_and_arguments(start_server):
    remote = RemoteModule(start_server(nn.Linear(2, 2)).address)
    with pytest.raises(InvalidRequest, match="optimizer 'Optimizer' is not allowed; use one of"):
        RemoteOptimizer(remote, "Optimizer", lr=0.1)
    with pytest.raises(InvalidRequest, match="'os' is not allowed"):
        RemoteOptimizer(remote, "os", lr=0.1)
    with pytest.raises(TypeError, match="plain numbers"):
        RemoteOptimizer(remote, torch.optim.SGD, lr="0.1")
    with pytest.raises(TypeError, match="plain numbers"):
        RemoteOptimizer(remote, torch.optim.SGD, lr=float("nan"))
    with pytest.raises(InvalidRequest, match="unexpected keyword|momentum"):
        RemoteOptimizer(remote, torch.optim.SGD, lr=0.1, momentumm=0.9)
    optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
    with pytest.raises(ValueError, match="takes no closure"):
        optimizer.step(lambda: 0.0)
    optimizer.param_groups[0]["lr"] = float("inf")
    with pytest.raises(InvalidRequest, match="lr=inf"):
        optimizer.step()


def test_step_before_optimizer_and_out_of_order_steps(start_server):
    remote = RemoteModule(start_server(nn.Linear(2, 2)).address)
    with pytest.raises(NotConfigured, match="Step before ConfigureOptimizer"):
        remote.client.step(1, [{}])
    RemoteOptimizer(remote, torch.optim.SGD, lr=0.1)
    with pytest.raises(StaleContext, match="Step #3 does not follow this session's last step #0"):
        remote.client.step(3, [{}])


def test_bad_gradients_are_refused_before_touching_the_trunk(start_server):
    trunk = nn.Linear(3, 3)
    server = start_server(trunk)
    remote = RemoteModule(server.address)
    y = remote(torch.randn(2, 3, requires_grad=True))
    # A client that does not ask for a report (report_nonfinite) is refused outright.
    value = {"grads": [torch.full((2, 3), float("nan"))]}
    header = pb.Header(request_id="r" * 32, backward_seq=1, needs_input_grad=[False])
    compute = pb.Header(request_id="r" * 32, keep_context=True, needs_input_grad=[False])
    remote.client._exchange(
        "Compute", compute, {"args": [torch.randn(2, 3)], "kwargs": {}}, "activation"
    )
    with pytest.raises(InvalidRequest, match="not finite"):
        remote.client._exchange("Backward", header, value, "gradient")
    # RemoteModule asks for one: accepted, nothing accumulated (GradScaler skips the step).
    y.backward(torch.full((2, 3), float("nan")))
    assert server.engine.sessions.values()[0].grads == {}


def test_a_bad_reply_quantization_is_refused_before_the_trunk_runs(start_server):
    """reply_quantization is checked before the call runs: a training Compute so refused moves
    no BatchNorm statistic and keeps no context, a Backward adds no gradient and leaves its
    context to the next one."""
    trunk = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    server = start_server(trunk)
    remote = RemoteModule(server.address)
    x = torch.randn(4, 3)

    def call(method: str, request_id: str, value: dict, quantization: str = "") -> None:
        header = pb.Header(
            request_id=request_id,
            training=True,
            keep_context=True,
            needs_input_grad=[False],
            backward_seq=1 if method == "Backward" else 0,
            reply_quantization=quantization,
        )
        kind = "activation" if method == "Compute" else "gradient"
        remote.client._exchange(method, header, value, kind)

    call("Compute", "k" * 32, {"args": [x], "kwargs": {}})  # a kept context
    (session,) = server.engine.sessions.values()
    buffers = [b.clone() for b in trunk.buffers()]
    with pytest.raises(InvalidRequest, match="reply_quantization"):
        call("Compute", "c" * 32, {"args": [x], "kwargs": {}}, "bogus")
    assert all(torch.equal(a, b) for a, b in zip(buffers, trunk.buffers(), strict=True))
    assert len(server.engine.contexts) == 1
    grads = {"grads": [torch.ones(4, 3)]}
    with pytest.raises(InvalidRequest, match="reply_quantization"):
        call("Backward", "k" * 32, grads, "bogus")
    assert session.grads == {}
    call("Backward", "k" * 32, grads)  # the context answers the honest one, once
    assert torch.equal(session.grads["1.bias"], torch.full((3,), 4.0))  # one batch's worth


class Blocking(nn.Module):
    """Waits for ``release`` before answering: slower than any deadline, until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.release.wait(60)
        return x + 1


def test_a_call_past_client_options_timeout_is_deadline_exceeded(start_server):
    trunk = Blocking()
    server = start_server(trunk)
    try:
        remote = RemoteModule(server.address, options=ClientOptions(timeout=0.5))
        remote.client.info()  # connected: only the Compute can run out of time
        with pytest.raises(
            DeadlineExceeded,
            match=r"within ClientOptions.timeout=0.5 s; raise ClientOptions.timeout",
        ) as info:
            remote(torch.zeros(2))
        assert type(info.value) is DeadlineExceeded
        assert info.value.status == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "Compute to 127.0.0.1" in str(info.value)
        assert trunk.calls == 1  # DEADLINE_EXCEEDED is not retried (only UNAVAILABLE is)
    finally:
        trunk.release.set()
    assert torch.equal(remote(torch.zeros(2)), torch.ones(2))  # released: it answers again


def _linear3() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 3).double()


def test_compute_refuses_an_integer_input_that_needs_a_gradient(start_server):
    server = start_server(nn.Embedding(5, 3).double())
    client = RemoteModule(server.address).client
    with pytest.raises(InvalidRequest, match=r"input 0 is torch.int64: it cannot need a grad"):
        client.compute(
            "int0", [torch.tensor([1, 2])], {}, needs_input_grad=[True], keep_context=True,
            training=True,
        )  # fmt: skip
    assert server.stats()["contexts"] == 0
    with pytest.raises(InvalidRequest, match="needs_input_grad has 2 flags for 1 input tensors"):
        client.compute(
            "int1", [torch.tensor([1, 2])], {}, needs_input_grad=[False, False],
            keep_context=True, training=True,
        )  # fmt: skip
    assert server.stats()["contexts"] == 0


def test_backward_header_is_checked_against_its_forward(start_server):
    server = start_server(_linear3())
    client = RemoteModule(server.address, options=NO_RECOVERY).client
    x = torch.ones(2, 3, dtype=torch.float64)
    client.compute("ctx", [x], {}, needs_input_grad=[False], keep_context=True, training=True)
    grads = [torch.ones(2, 3, dtype=torch.float64)]
    session = server.engine.sessions.values()[0]
    with pytest.raises(InvalidRequest, match="needs_input_grad has 2 flags for 1 inputs"):
        client.backward("ctx", 1, grads, [True, True])
    with pytest.raises(InvalidRequest, match="input 0 was not sent as requiring a gradient"):
        client.backward("ctx", 1, grads, [True])
    with pytest.raises(StaleContext, match="Backward #2 for request ctx: expected #1"):
        client.backward("ctx", 2, grads, [False])
    with pytest.raises(InvalidRequest, match=r"Backward got 2 gradients for a forward with 1"):
        client.backward("ctx", 1, grads * 2, [False])
    with pytest.raises(InvalidRequest, match=r"expected a tensor of shape \[2, 3\]"):
        client.backward("ctx", 1, [torch.ones(3, 2, dtype=torch.float64)], [False])
    assert session.grads == {}  # nothing refused was accumulated
    value, _ = client.backward("ctx", 1, grads, [False])  # the context is still usable
    assert value == {"grads": [None]}
    expected = torch.ones(2, 3, dtype=torch.float64).t() @ x
    assert torch.equal(session.grads["weight"], expected)


class Unsendable(nn.Module):
    def __init__(self, value) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor):
        return {"out": x, "extra": self.value}


@pytest.mark.parametrize(
    "value, named",
    [({1, 2}, "type set"), (torch.zeros(2, dtype=torch.complex64), "complex64")],
    ids=["set", "complex"],
)
def test_a_trunk_returning_what_cannot_be_sent_is_a_trunk_error(start_server, value, named):
    server = start_server(Unsendable(value))
    remote = RemoteModule(server.address)
    with pytest.raises(TrunkError, match="the trunk returned a value that cannot be sent") as info:
        remote(torch.ones(2))
    assert type(info.value) is TrunkError and named in str(info.value)
    assert server.stats()["contexts"] == 0  # a forward not kept (no grad wanted) leaves nothing


@pytest.mark.parametrize("method", ["GradNorm", "Step"])
def test_an_unknown_zero_grad_mode_is_refused_and_changes_nothing(start_server, method):
    """Protobuf enums are open: any int can arrive as zero_grad. It is refused as
    INVALID_ARGUMENT (not an INTERNAL error of the trunk), and the session's gradients stay."""
    from remote_autograd._proto import remote_autograd_pb2 as pb
    from remote_autograd._proto import remote_autograd_pb2_grpc as pb_grpc

    server = start_server(nn.Linear(3, 2).double())
    remote = RemoteModule(server.address)
    optimizer = RemoteOptimizer(remote, "SGD", lr=0.1)
    optimizer.zero_grad()
    remote(torch.ones(1, 3, dtype=torch.float64, requires_grad=True)).sum().backward()
    session = server.engine.sessions.values()[0]
    held = {k: v.clone() for k, v in session.grads.items()}
    metadata = (("ra-session", remote.client.session_id),)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TrunkStub(channel)
        request = (
            pb.GradNormRequest(norm_type=2.0, zero_grad=7)
            if method == "GradNorm"
            else pb.StepRequest(step=1, zero_grad=7)
        )
        with pytest.raises(grpc.RpcError) as info:
            getattr(stub, method)(request, metadata=metadata, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "zero_grad must be one of 0 (KEEP), 1 (TO_NONE), 2 (TO_ZERO), got 7" in info.value.details()
    )
    assert session.grads.keys() == held.keys()
    for name, grad in held.items():
        assert torch.equal(session.grads[name], grad), name
    assert server.stats()["weights_version"] == 0
    optimizer.step()  # the session goes on
    assert server.stats()["weights_version"] == 1
