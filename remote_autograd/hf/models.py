"""Build the model every side agrees on: pretrained from a local folder, or a small random GPT-2.

The server and the client each build the whole model from the same :class:`ModelSpec` and keep
their own parts, so the trunk's base weights never travel: with a local folder both read the
same files; with a random config both draw the same weights from ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    ByT5Tokenizer,
    GPT2Config,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .lora import LoraOptions, add_lora
from .split import Bottom, SplitModel, Top, Trunk, split_causal_lm

__all__ = ["ModelSpec", "build_client_parts", "build_model", "build_tokenizer", "build_trunk"]

_DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")  # GPT-2's names


@dataclass(frozen=True)
class ModelSpec:
    """Which model to split and where. Both sides must be given the same one."""

    path: str | None = None  # local folder with GPT-2 weights + tokenizer; None: random init
    trunk_start: int = 2  # first block on the server
    trunk_end: int = 4  # first block after the trunk (the top starts here)
    n_layer: int = 6  # random init only: blocks
    n_embd: int = 128  # random init only: hidden size
    n_head: int = 4  # random init only: attention heads
    n_positions: int = 256  # random init only: longest sequence
    dropout: float | None = None  # override the config's dropouts; None keeps them
    attn_implementation: str = "eager"  # eager is deterministic and the same on both sides
    seed: int = 0  # random weights and LoRA initialisation


def build_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The folder's tokenizer, or a byte-level one (ByT5's: 256 bytes + pad/eos/unk, no files)."""
    if spec.path is None:
        return ByT5Tokenizer(extra_ids=0)
    tokenizer = AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
    if tokenizer.pad_token is None:  # GPT-2 has none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(spec: ModelSpec) -> PreTrainedModel:
    """The whole causal LM, in training mode. Reads nothing from the network."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        if spec.path is None:
            tokenizer = build_tokenizer(spec)
            config = GPT2Config(
                vocab_size=len(tokenizer),
                n_positions=spec.n_positions,
                n_embd=spec.n_embd,
                n_layer=spec.n_layer,
                n_head=spec.n_head,
                bos_token_id=tokenizer.eos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                # Wider than GPT-2's 0.02: with the embedding (= LM head) and final norm frozen,
                # logits are at most |h| * |w| ~ d * std, and 0.02 * 128 caps them near 2.6 nats,
                # a floor for the loss that LoRA on the blocks alone could not get under.
                initializer_range=0.1,
            )
            _set_dropout(config, spec.dropout)
            model = AutoModelForCausalLM.from_config(
                config, attn_implementation=spec.attn_implementation
            )
        else:
            config = AutoConfig.from_pretrained(spec.path, local_files_only=True)
            _set_dropout(config, spec.dropout)
            model = AutoModelForCausalLM.from_pretrained(
                spec.path,
                config=config,
                local_files_only=True,
                attn_implementation=spec.attn_implementation,
            )
    return model.train()


def _set_dropout(config: GPT2Config, dropout: float | None) -> None:
    if dropout is None:
        return
    for key in _DROPOUT_KEYS:
        if hasattr(config, key):
            setattr(config, key, dropout)


def build_trunk(spec: ModelSpec, lora: LoraOptions) -> Trunk:
    """The server's part: blocks ``[trunk_start, trunk_end)``, with adapters if LoRA is on."""
    trunk = split_causal_lm(build_model(spec), spec.trunk_start, spec.trunk_end).trunk
    if lora.enabled:
        add_lora(trunk, lora, seed=spec.seed + 2, part="trunk")
    return trunk


def build_client_parts(spec: ModelSpec, lora: LoraOptions) -> tuple[Bottom, Top]:
    """The client's parts; with LoRA off every weight of theirs trains."""
    parts: SplitModel = split_causal_lm(build_model(spec), spec.trunk_start, spec.trunk_end)
    if lora.enabled:
        add_lora(parts.bottom, lora, seed=spec.seed + 1, part="bottom")
        add_lora(parts.top, lora, seed=spec.seed + 3, part="top")
    return parts.bottom, parts.top
