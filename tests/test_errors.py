"""Every gRPC status becomes one exception of the tree, with a message that says what to do."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import pytest
import torch
from torch import nn

import remote_autograd
from remote_autograd import (
    ClientOptions,
    ContextNotFound,
    InvalidRequest,
    RemoteAutogradError,
    RemoteModule,
    RemoteOptimizer,
    ServerOptions,
    ServerUnavailable,
    StaleContext,
    TransportError,
    TrunkError,
)
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


@pytest.mark.parametrize(
    "code", [c for c in grpc.StatusCode if c != grpc.StatusCode.OK], ids=lambda c: c.name
)
def test_every_status_code_is_translated(code, status_server):
    with pytest.raises(grpc.RpcError) as caught:
        status_server(code.name.encode(), timeout=10)
    error = from_rpc_error(caught.value, method="Abort", address="127.0.0.1:1")
    assert isinstance(error, RemoteAutogradError)
    assert f"aborted with {code.name}" in str(error)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert isinstance(error, remote_autograd.CodecError)  # the metadata names the class
    elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        assert isinstance(error, TransportError) and code.name in str(error)
    else:
        assert getattr(error, "status", None) == code or isinstance(error, TransportError)


def test_unreachable_server_is_a_clear_error_not_a_hang():
    from remote_autograd import ClientOptions

    remote = RemoteModule("127.0.0.1:1", options=ClientOptions(connect_timeout=0.5))
    with pytest.raises(ServerUnavailable, match="no trunk server answered at 127.0.0.1:1"):
        remote(torch.randn(2))


def test_backward_after_expiry_names_the_context(start_server):
    server = start_server(nn.Linear(3, 3), ServerOptions(context_ttl=0.2))
    remote = RemoteModule(server.address, options=NO_RECOVERY)
    y = remote(torch.randn(2, 3, requires_grad=True))
    time.sleep(0.5)
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
    with pytest.raises(StaleContext, match="Step before ConfigureOptimizer"):
        remote.client.step(1, [{}])
    RemoteOptimizer(remote, torch.optim.SGD, lr=0.1)
    with pytest.raises(StaleContext, match="Step #3 does not follow this session's last step #0"):
        remote.client.step(3, [{}])


def test_bad_gradients_are_refused_before_touching_the_trunk(start_server):
    trunk = nn.Linear(3, 3)
    server = start_server(trunk)
    remote = RemoteModule(server.address)
    y = remote(torch.randn(2, 3, requires_grad=True))
    with pytest.raises(InvalidRequest, match="not finite"):
        y.backward(torch.full((2, 3), float("nan")))
    assert server.service.sessions.values()[0].grads == {}
