"""GPT-2 cut into bottom (embeddings) | trunk (the transformer blocks) | top (ln_f + tied head).

Built from transformers' GPT2 modules with random init (no downloads). The same seed gives the
same weights in every process, so the split run and the monolithic run start identical.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

# name -> (n_layer, n_embd, n_head, vocab): "small" is GPT-2 small (124M parameters).
CONFIGS = {
    "small": (12, 768, 12, 50257),
    "tiny": (2, 64, 4, 1000),
}
SEED = 0


def config(name: str) -> GPT2Config:
    n_layer, n_embd, n_head, vocab = CONFIGS[name]
    return GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab,
        n_positions=1024,
        resid_pdrop=0.0,  # no dropout: runs are comparable step by step
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="sdpa",
        bos_token_id=0,
        eos_token_id=0,
    )


class Bottom(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.wte(ids) + self.wpe(positions)  # [B, T, n_embd]


class Trunk(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.h = nn.ModuleList(GPT2Block(cfg, layer_idx=i) for i in range(cfg.n_layer))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.h:
            out = block(hidden)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden  # [B, T, n_embd]


class Top(nn.Module):
    """Final norm and the LM head, tied to the bottom's token embedding as in GPT-2."""

    def __init__(self, cfg: GPT2Config, wte: nn.Embedding) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.wte = wte

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ln_f(hidden) @ self.wte.weight.T  # [B, T, vocab]


def _init(module: nn.Module, cfg: GPT2Config) -> None:
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.normal_(sub.weight, std=cfg.initializer_range)
        if getattr(sub, "bias", None) is not None and not isinstance(sub, nn.LayerNorm):
            nn.init.zeros_(sub.bias)
        if type(sub).__name__ == "Conv1D":
            nn.init.normal_(sub.weight, std=cfg.initializer_range)
            nn.init.zeros_(sub.bias)


def build(name: str) -> tuple[Bottom, Trunk, Top]:
    """The three parts, deterministically initialised (bottom and top share ``wte``)."""
    cfg = config(name)
    torch.manual_seed(SEED)
    bottom = Bottom(cfg)
    _init(bottom, cfg)
    torch.manual_seed(SEED + 1)
    trunk = Trunk(cfg)
    _init(trunk, cfg)
    top = Top(cfg, bottom.wte)
    return bottom, trunk, top


def build_trunk(name: str) -> Trunk:
    return build(name)[1]
