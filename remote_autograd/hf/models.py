"""Build the model every side agrees on: pretrained from a local folder, or a small random one
of any registered family (GPT-2 by default).

The server and the client each build the whole model from the same :class:`ModelSpec` and keep
their own parts, so the trunk's base weights never travel: with a local folder both read the
same files; with a random config both draw the same weights from ``seed``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    ByT5Tokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .families import DecoderFamily, get_family
from .lora import LoraOptions, add_lora
from .split import Bottom, SplitModel, Top, Trunk, split_causal_lm

__all__ = [
    "ModelSpec",
    "build_client_parts",
    "build_config",
    "build_model",
    "build_tokenizer",
    "build_trunk",
]


@dataclass(frozen=True)
class ModelSpec:
    """Which model to split and where. Both sides must be given the same one."""

    path: str | None = None  # local folder with weights + tokenizer; None: random init
    model_type: str | None = None  # a registered family (gpt2, llama, qwen2...); None: the
    # folder's config.json decides, or GPT-2 for a random model
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


def build_config(spec: ModelSpec) -> PretrainedConfig:
    """The model's config: the folder's, or a random model's from the size fields of ``spec``."""
    if spec.path is not None:
        config = AutoConfig.from_pretrained(spec.path, local_files_only=True)
        if spec.model_type is not None and spec.model_type != config.model_type:
            raise ValueError(
                f"model_type {spec.model_type!r} does not match the {config.model_type!r} model "
                f"in {spec.path}: leave --model-type out with --model-path, or name its own type"
            )
        get_family(config.model_type)  # refuse a model we cannot split before loading weights
    else:
        model_type = spec.model_type or "gpt2"
        family = get_family(model_type)
        tokenizer = build_tokenizer(spec)
        if spec.n_embd % spec.n_head:
            raise ValueError(
                f"n_embd ({spec.n_embd}) must be a multiple of n_head ({spec.n_head}): "
                "change --n-embd or --n-head"
            )
        config = AutoConfig.for_model(
            model_type,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            # Wider than the usual 0.02: with the embedding (= LM head) and final norm frozen,
            # logits are at most |h| * |w| ~ d * std, and 0.02 * 128 caps them near 2.6 nats,
            # a floor for the loss that LoRA on the blocks alone could not get under.
            initializer_range=0.1,
            **family.config_kwargs(
                n_layer=spec.n_layer,
                n_embd=spec.n_embd,
                n_head=spec.n_head,
                n_positions=spec.n_positions,
            ),
        )
    if spec.dropout is not None:
        for key in get_family(config.model_type).dropout_keys:
            setattr(config, key, spec.dropout)
    return config


def build_model(spec: ModelSpec) -> PreTrainedModel:
    """The whole causal LM, in training mode. Reads nothing from the network."""
    config = build_config(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        if spec.path is None:
            model = AutoModelForCausalLM.from_config(
                config, attn_implementation=spec.attn_implementation
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(
                spec.path,
                config=config,
                local_files_only=True,
                attn_implementation=spec.attn_implementation,
            )
    return model.train()


def family_lora(lora: LoraOptions, family: DecoderFamily) -> LoraOptions:
    """``lora`` with the family's default targets when it names none."""
    if lora.target_modules is not None:
        return lora
    return dataclasses.replace(lora, target_modules=family.lora_targets)


def build_trunk(spec: ModelSpec, lora: LoraOptions) -> Trunk:
    """The server's part: blocks ``[trunk_start, trunk_end)``, with adapters if LoRA is on."""
    trunk = split_causal_lm(build_model(spec), spec.trunk_start, spec.trunk_end).trunk
    if lora.enabled:
        add_lora(trunk, family_lora(lora, trunk.family), seed=spec.seed + 2, part="trunk")
    return trunk


def build_client_parts(spec: ModelSpec, lora: LoraOptions) -> tuple[Bottom, Top]:
    """The client's parts; with LoRA off every weight of theirs trains."""
    parts: SplitModel = split_causal_lm(build_model(spec), spec.trunk_start, spec.trunk_end)
    if lora.enabled:
        lora = family_lora(lora, parts.bottom.family)
        add_lora(parts.bottom, lora, seed=spec.seed + 1, part="bottom")
        add_lora(parts.top, lora, seed=spec.seed + 3, part="top")
    return parts.bottom, parts.top
