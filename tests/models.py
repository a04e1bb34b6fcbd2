"""Small deterministic models the tests split into bottom / trunk / top."""

from __future__ import annotations

import collections

import torch
from torch import nn


class Block(nn.Module):
    """A pre-norm transformer block: attention with a key padding mask, then an MLP."""

    def __init__(self, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class Blocks(nn.Module):
    """Several blocks taking (hidden, padding mask) and returning (hidden, per-token norm)."""

    def __init__(self, depth: int = 2, width: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for block in self.blocks:
            x = block(x, padding)
        return x, x.pow(2).mean(-1)


def mlp_parts(dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, nn.Module, nn.Module]:
    torch.manual_seed(seed)
    bottom = nn.Sequential(nn.Linear(6, 12), nn.Tanh())
    trunk = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12), nn.Tanh())
    top = nn.Linear(12, 3)
    return bottom.to(dtype), trunk.to(dtype), top.to(dtype)


def block_parts(dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, nn.Module, nn.Module]:
    torch.manual_seed(seed)
    bottom = nn.Embedding(20, 16)
    trunk = Blocks(depth=2, width=16)
    top = nn.Linear(16, 20)
    return bottom.to(dtype), trunk.to(dtype), top.to(dtype)


def make_mlp_trunk() -> nn.Module:
    """Factory for child-process servers: the float64 MLP trunk of mlp_parts(seed=0)."""
    return mlp_parts(torch.float64)[1]


class Scale(nn.Module):
    """``x * weight`` with weight 1.5: what comes back is easy to predict."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.5], dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class Split(nn.Module):
    """bottom -> trunk -> top, for either the remote or the local trunk."""

    def __init__(self, kind: str, bottom: nn.Module, trunk: nn.Module, top: nn.Module) -> None:
        super().__init__()
        self.kind, self.bottom, self.trunk, self.top = kind, bottom, trunk, top

    def forward(self, inputs, target):
        if self.kind == "mlp":
            logits = self.top(self.trunk(self.bottom(inputs[0])))
            return nn.functional.cross_entropy(logits, target)
        tokens, padding = inputs
        hidden, norms = self.trunk(self.bottom(tokens), padding)
        logits = self.top(hidden)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
        return loss + 1e-3 * norms.mean()  # the trunk's second output is used too


class NamedOutputs(nn.Module):
    """A trunk taking and returning named tuples and a Hugging Face ``ModelOutput``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.linear = nn.Linear(4, 4).double()

    def forward(self, x: torch.Tensor, extra: tuple) -> tuple:
        from transformers.modeling_outputs import BaseModelOutputWithPast

        # Defined here, so a client that imported this module still cannot find it by name.
        Pair = collections.namedtuple("Pair", ["hidden", "norms"])
        self.received = type(extra)  # the class the extra input arrived as
        hidden = self.linear(x) + extra[0]
        out = BaseModelOutputWithPast(last_hidden_state=2 * hidden, hidden_states=(hidden, -hidden))
        out["aux"] = hidden.mean()  # a key that is not a field, as a ModelOutput allows
        return Pair(hidden, hidden.norm(dim=-1)), out


Bias = collections.namedtuple("Bias", ["bias"])


def make_named_outputs_trunk() -> nn.Module:
    return NamedOutputs()


class AddsInPlace(nn.Module):
    """Changes its input in place before using it (``x += pos``, then ``ReLU(inplace=True)``),
    as a trunk may the output of the layer before it: float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.register_buffer("pos", torch.randn(4, dtype=torch.float64))
        self.linear = nn.Linear(4, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x += self.pos
        return self.linear(torch.relu_(x))


class SomeOutputsDetached(nn.Module):
    """Returns ``(h, h.detach() * 2, pos, h computed under no_grad)``: locally only the first
    requires grad. float64, batch-first outputs (pos repeated over the batch)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.linear = nn.Linear(4, 3).double()
        self.register_buffer("pos", torch.randn(3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.linear(x)
        with torch.no_grad():
            quiet = self.linear(x)
        return h, h.detach() * 2, self.pos.expand(x.shape[0], 3), quiet
