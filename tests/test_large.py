"""A 256 MiB tensor through Compute and Backward with default limits, over the bulk channel and
over gRPC streams."""

from __future__ import annotations

import pytest
import torch
from models import Scale
from torch import nn

from remote_autograd import ClientOptions, RemoteModule

MiB = 1 << 20


@pytest.mark.parametrize("bulk", [True, False], ids=["bulk-channel", "grpc-streams"])
def test_256_mib_tensor_round_trips_forward_and_backward(start_server, bulk):
    server = start_server(Scale())
    remote = RemoteModule(server.address, options=ClientOptions(bulk=bulk))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256 * MiB // 4, generator=generator).requires_grad_()  # 256 MiB of float32
    y = remote(x)
    assert y.shape == x.shape and torch.equal(y, x.detach() * 1.5)
    grad = torch.randn(y.shape, generator=generator)
    y.backward(grad)
    assert torch.equal(x.grad, grad * 1.5)
    session_grads = server.engine.sessions.values()[0].grads
    torch.testing.assert_close(session_grads["weight"], (grad * x.detach()).sum().reshape(1))
    # Both directions went over the bulk channel, or were streamed in chunks.
    assert remote.client.stats.bytes_sent > 512 * MiB
    assert remote.client.stats.bytes_received > 512 * MiB
    assert remote.client.stats.bulk_calls == (2 if bulk else 0)


def test_small_request_with_a_large_reply(start_server):
    class Expand(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.tensor([1.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.repeat(1 << 20) * self.weight  # 8 floats in, 32 MiB out

    remote = RemoteModule(start_server(Expand()).address)
    x = torch.arange(8.0, requires_grad=True)
    for _ in range(2):  # the first reply arrives unary, the next call streams
        y = remote(x)
        assert torch.equal(y, x.detach().repeat(1 << 20))
        y.sum().backward()
    assert torch.equal(x.grad, torch.full((8,), 2.0 * (1 << 20)))
