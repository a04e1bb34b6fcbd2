"""Module factories for child-process servers (``remote-autograd serve --module factories:...``)
and the same trunks for in-process servers, so both runs start from identical weights."""

from __future__ import annotations

import time

import torch
import torch.utils.checkpoint
from torch import nn


def dropout_trunk() -> nn.Module:
    """A float64 trunk with dropout, seeded: every call returns the same weights."""
    generator = torch.Generator().manual_seed(1234)
    trunk = nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.25), nn.Linear(16, 8), nn.Tanh()
    ).to(torch.float64)
    with torch.no_grad():
        for param in trunk.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64) * 0.4)
    return trunk


def local_parts() -> tuple[nn.Module, nn.Module]:
    """The client-side bottom and top around dropout_trunk, seeded."""
    generator = torch.Generator().manual_seed(99)
    bottom, top = nn.Linear(4, 8).double(), nn.Linear(8, 2).double()
    with torch.no_grad():
        for param in [*bottom.parameters(), *top.parameters()]:
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64) * 0.5)
    return bottom, top


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data of one training step: the same for every run."""
    generator = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(5, 2, generator=generator, dtype=torch.float64)
    return x, y


def wide_mlp() -> nn.Module:
    """A float32 MLP whose saved activations are three times its input (memory-bound tests)."""
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))


class ShiftedTrunk(nn.Module):
    """dropout_trunk without the dropout (a split batch gives the unsplit batch's results),
    plus an optional ``shift`` added to the output (a tensor without the batch dimension);
    with ``limit``, it raises on an input beyond it (a trunk failing on some samples)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = dropout_trunk()
        del self.body[2]

    def forward(
        self,
        x: torch.Tensor,
        shift: torch.Tensor | None = None,
        pooled: bool = False,
        limit: float | None = None,
    ) -> torch.Tensor:
        out = self.body(x)
        if limit is not None and bool((x.abs() > limit).any()):  # the trunk's own failure
            raise RuntimeError(f"a sample beyond {limit}")
        out = out if shift is None else out * shift
        return out.mean(0) if pooled else out  # pooled: an output without the batch dimension


def shifted_trunk() -> nn.Module:
    return ShiftedTrunk()


class DropoutLinear(nn.Module):
    """``Linear(12, 12)`` then ``Dropout(0.5)``, float64, seeded."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(12)
        self.linear = nn.Linear(12, 12, dtype=torch.float64)
        self.drop = nn.Dropout(0.5)
        with torch.no_grad():
            for param in self.linear.parameters():
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.linear(x))


class Awkward(nn.Module):
    """Two outputs (the second from a layer of its own), a view by the batch size, BatchNorm:
    what a rank with an empty share, or with an output nobody back-propagates, trips over."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.layers = nn.ModuleList([nn.Linear(4, 6), nn.Linear(6, 3)]).double()
        self.norm = nn.BatchNorm1d(6).double()
        with torch.no_grad():
            for param in self.layers.parameters():
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(self.layers[0](x)).view(x.shape[0], -1) * 1.0  # an output, not a view
        return h, self.layers[1](h)


def awkward_trunk() -> nn.Module:
    return Awkward()


def dropout_linear() -> nn.Module:
    return DropoutLinear()


def shifted_trunk32() -> nn.Module:
    """shifted_trunk in float32."""
    return ShiftedTrunk().float()


class MixedTrunk(nn.Module):
    """shifted_trunk's float64 layers, then a float32 layer: parameters of two dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = ShiftedTrunk().body
        generator = torch.Generator().manual_seed(32)
        self.head = nn.Linear(8, 8)
        with torch.no_grad():
            for param in self.head.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).float()).double()


def mixed_trunk() -> nn.Module:
    return MixedTrunk()


class Headed(nn.Module):
    """Layers in a ModuleList, then a head and a scale the trunk holds itself (FSDP2 shards
    them with the root module: a final norm or head of a real model), float64, seeded."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(21)
        self.layers = nn.ModuleList([nn.Linear(8, 16), nn.Linear(16, 8)])
        self.head = nn.Linear(8, 4)
        self.scale = nn.Parameter(torch.ones(4))
        self.double()
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(0.3 * torch.randn(param.shape, generator=generator).double())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers[1](torch.tanh(self.layers[0](x)))) * self.scale


def headed_trunk() -> nn.Module:
    return Headed()


def linear32_trunk() -> nn.Module:
    """A seeded float32 ``Linear(4, 2)``: float32 is where finite gradients can overflow."""
    generator = torch.Generator().manual_seed(4321)
    trunk = nn.Linear(4, 2)
    with torch.no_grad():
        for param in trunk.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return trunk


def batchnorm_trunk() -> nn.Module:
    """``Linear(4, 4)`` then ``BatchNorm1d(4)``, float64: training forwards move its buffers."""
    torch.manual_seed(77)
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).double()


def softmax_mlp() -> nn.Module:
    """A float32 MLP with a softmax: autograd saves the softmax's output for its own backward
    (the case where a saved tensor's history leads back to the node saving it)."""
    torch.manual_seed(8)
    return nn.Sequential(nn.Linear(256, 512), nn.Softmax(dim=-1), nn.Linear(512, 256))


class Pause(nn.Module):
    """A layer that takes ``seconds`` and changes nothing (one layer of a large trunk)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x


class Checkpointed(nn.Module):
    """``inner`` under activation checkpointing: run again inside the backward."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False)


def narrow_slow_trunk() -> nn.Module:
    """Linear(4, 8), a 0.3 s pause (checkpointed: the backward runs it again), Tanh,
    Linear(8, 1), float64. On 2 fsdp ranks rank 1's shards of the last layer's weight [1, 8]
    and bias [1] are empty, and a forward or a backward takes long enough for a client to
    give up in the middle of it."""
    generator = torch.Generator().manual_seed(3)
    # Tanh saves its output for the backward: under the checkpoint that makes the backward run
    # the pause and Tanh again
    layers = (nn.Linear(4, 8), Checkpointed(nn.Sequential(Pause(0.3), nn.Tanh())), nn.Linear(8, 1))
    trunk = nn.Sequential(*layers).double()
    with torch.no_grad():
        for param in trunk.parameters():
            param.copy_(0.4 * torch.randn(param.shape, generator=generator, dtype=torch.float64))
    return trunk


class _Bf16Middle(nn.Module):
    """float32, bfloat16 and float32 layers: a trunk of two parameter dtypes."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(17)
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)])
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        self.layers[1].to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.layers[0](x))
        h = torch.tanh(self.layers[1](h.to(torch.bfloat16))).float()
        return self.layers[2](h)


def bf16_middle_trunk() -> nn.Module:
    return _Bf16Middle()
