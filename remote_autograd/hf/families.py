"""Model families: where each decoder-only architecture keeps its parts, and the registry of them.

A :class:`DecoderFamily` tells :func:`~remote_autograd.hf.split.split_causal_lm` where the
blocks, embeddings and final norm of one architecture live and what keyword arguments its blocks
take; it also names the default LoRA targets and how the command line's ``--n-layer/--n-embd/
--n-head/--n-positions`` map onto the architecture's config. Families are looked up by
``config.model_type``; :func:`register_family` adds one, so a new architecture is one class and
one call, not another split:

    register_family("my_model", MyFamily())

Out of the box: GPT-2, GPT-NeoX, and the Llama-like RoPE decoders (Llama, Mistral, Qwen2,
Qwen3, Gemma, Phi-3), which differ only in attention masks (full or sliding window, per layer)
and in their linear layers' names.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

__all__ = [
    "FAMILIES",
    "DecoderFamily",
    "GPT2Family",
    "GPTNeoXFamily",
    "LlamaFamily",
    "Phi3Family",
    "get_family",
    "register_family",
]


class DecoderFamily:
    """Where one family of decoder-only models keeps its parts, and what its blocks take.

    Subclass it for a new architecture and :func:`register_family` an instance under the
    ``model_type`` of its config.
    """

    # Module names LoRA adapts when --lora-targets / LoraOptions.target_modules is not given.
    lora_targets: tuple[str, ...] = ()
    # Config fields that ModelSpec.dropout (--dropout) sets.
    dropout_keys: tuple[str, ...] = ()

    def backbone(self, model: PreTrainedModel) -> Any:
        """The bare decoder inside the LM (``model.transformer`` for GPT-2, ``model.model``...)."""
        raise NotImplementedError

    def blocks(self, backbone: Any) -> nn.ModuleList:
        raise NotImplementedError

    def embeddings(self, backbone: Any) -> nn.ModuleDict:
        """What the bottom needs before its blocks (token/position embeddings, dropout)."""
        raise NotImplementedError

    def embed(self, embeddings: nn.ModuleDict, input_ids: torch.Tensor, position_ids: torch.Tensor):
        raise NotImplementedError

    def shared(self, backbone: Any) -> nn.ModuleDict:
        """Parameter-free modules every part needs next to its blocks (a rotary embedding)."""
        return nn.ModuleDict()

    def final_norm(self, backbone: Any) -> nn.Module:
        raise NotImplementedError

    def position_ids(self, attention_mask: torch.Tensor | None, input_ids: torch.Tensor):
        # Every family here numbers positions 0..T-1 whatever the padding, as its model does.
        return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)

    def block_kwargs(
        self,
        config: PretrainedConfig,
        shared: nn.ModuleDict,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        layers: range,
    ) -> list[dict[str, Any]]:
        """Keyword arguments of each block ``layers`` (indices in the unsplit model), built as the
        unsplit model builds them."""
        raise NotImplementedError

    def config_kwargs(self, *, n_layer: int, n_embd: int, n_head: int, n_positions: int) -> dict:
        """The command line's size flags in this family's config fields (random init only)."""
        return {
            "num_hidden_layers": n_layer,
            "hidden_size": n_embd,
            "num_attention_heads": n_head,
            "num_key_value_heads": n_head,
            "head_dim": n_embd // n_head,  # Gemma's and Qwen3's defaults do not follow n_embd
            "intermediate_size": 4 * n_embd,
            "max_position_embeddings": n_positions,
        }


def _causal_mask(config, hidden_states, attention_mask, position_ids, *, sliding=False):
    """The 4-D causal (+ sliding window) + padding mask blocks take, as the unsplit model's."""
    make = create_sliding_window_causal_mask if sliding else create_causal_mask
    return make(
        config=config,
        inputs_embeds=hidden_states,
        attention_mask=attention_mask,
        past_key_values=None,
        position_ids=position_ids,
    )


class GPT2Family(DecoderFamily):
    lora_targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")  # attention and MLP
    dropout_keys: tuple[str, ...] = ("resid_pdrop", "embd_pdrop", "attn_pdrop")

    def backbone(self, model: PreTrainedModel) -> Any:
        return model.transformer

    def blocks(self, backbone: Any) -> nn.ModuleList:
        return backbone.h

    def embeddings(self, backbone: Any) -> nn.ModuleDict:
        return nn.ModuleDict({"wte": backbone.wte, "wpe": backbone.wpe, "drop": backbone.drop})

    def embed(self, embeddings: nn.ModuleDict, input_ids: torch.Tensor, position_ids: torch.Tensor):
        hidden = embeddings["wte"](input_ids) + embeddings["wpe"](position_ids)
        return embeddings["drop"](hidden)

    def final_norm(self, backbone: Any) -> nn.Module:
        return backbone.ln_f

    def block_kwargs(self, config, shared, hidden_states, attention_mask, position_ids, layers):
        mask = _causal_mask(config, hidden_states, attention_mask, position_ids)
        return [{"attention_mask": mask, "position_ids": position_ids} for _ in layers]

    def config_kwargs(self, *, n_layer: int, n_embd: int, n_head: int, n_positions: int) -> dict:
        return {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "n_positions": n_positions}


class LlamaFamily(DecoderFamily):
    """RoPE decoders laid out like Llama (``model.model.layers``, ``rotary_emb``, ``norm``):
    Llama, Mistral, Qwen2, Qwen3 and Gemma (whose embedding scales itself). Every part holds
    the (parameter-free) rotary embedding and turns the position ids that crossed the cut into
    cos/sin itself, as the unsplit model does once."""

    lora_targets: tuple[str, ...] = (
        *("q_proj", "k_proj", "v_proj", "o_proj"),  # attention
        *("gate_proj", "up_proj", "down_proj"),  # MLP
    )
    dropout_keys: tuple[str, ...] = ("attention_dropout",)

    def backbone(self, model: PreTrainedModel) -> Any:
        return model.model

    def blocks(self, backbone: Any) -> nn.ModuleList:
        return backbone.layers

    def embeddings(self, backbone: Any) -> nn.ModuleDict:
        return nn.ModuleDict({"embed_tokens": backbone.embed_tokens})

    def embed(self, embeddings: nn.ModuleDict, input_ids: torch.Tensor, position_ids: torch.Tensor):
        return embeddings["embed_tokens"](input_ids)

    def shared(self, backbone: Any) -> nn.ModuleDict:
        return nn.ModuleDict({"rotary": backbone.rotary_emb})

    def final_norm(self, backbone: Any) -> nn.Module:
        return backbone.norm

    def block_kwargs(self, config, shared, hidden_states, attention_mask, position_ids, layers):
        # One mask per attention kind these blocks use, as Qwen2Model/MistralModel build them.
        kinds = [_attention_kind(config, i) for i in layers]
        masks = {
            kind: _causal_mask(
                config,
                hidden_states,
                attention_mask,
                position_ids,
                sliding=kind == "sliding_attention",
            )
            for kind in dict.fromkeys(kinds)
        }
        rotary = shared["rotary"](hidden_states, position_ids=position_ids)
        return [
            {
                "attention_mask": masks[kind],
                "position_ids": position_ids,
                "position_embeddings": rotary,
            }
            for kind in kinds
        ]


def _attention_kind(config: PretrainedConfig, layer: int) -> str:
    """``full_attention`` or ``sliding_attention`` for one layer: Qwen2/Qwen3 list it per layer
    (``layer_types``); Mistral and Phi-3 slide every layer when ``sliding_window`` is set."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[layer]
    if getattr(config, "sliding_window", None) is not None:
        return "sliding_attention"
    return "full_attention"


class Phi3Family(LlamaFamily):
    """Phi-3: Llama's layout with fused projections."""

    lora_targets: tuple[str, ...] = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    dropout_keys: tuple[str, ...] = ("attention_dropout", "resid_pdrop")


class GPTNeoXFamily(DecoderFamily):
    """GPT-NeoX (Pythia): RoPE on part of each head, embedding dropout, untied ``embed_out``."""

    lora_targets: tuple[str, ...] = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
    dropout_keys: tuple[str, ...] = ("attention_dropout", "hidden_dropout")

    def backbone(self, model: PreTrainedModel) -> Any:
        return model.gpt_neox

    def blocks(self, backbone: Any) -> nn.ModuleList:
        return backbone.layers

    def embeddings(self, backbone: Any) -> nn.ModuleDict:
        return nn.ModuleDict({"embed_in": backbone.embed_in, "drop": backbone.emb_dropout})

    def embed(self, embeddings: nn.ModuleDict, input_ids: torch.Tensor, position_ids: torch.Tensor):
        return embeddings["drop"](embeddings["embed_in"](input_ids))

    def shared(self, backbone: Any) -> nn.ModuleDict:
        return nn.ModuleDict({"rotary": backbone.rotary_emb})

    def final_norm(self, backbone: Any) -> nn.Module:
        return backbone.final_layer_norm

    def block_kwargs(self, config, shared, hidden_states, attention_mask, position_ids, layers):
        mask = _causal_mask(config, hidden_states, attention_mask, position_ids)
        rotary = shared["rotary"](hidden_states, position_ids=position_ids)
        kwargs = {"attention_mask": mask, "position_ids": position_ids}
        return [{**kwargs, "position_embeddings": rotary} for _ in layers]

    def config_kwargs(self, *, n_layer: int, n_embd: int, n_head: int, n_positions: int) -> dict:
        return {
            "num_hidden_layers": n_layer,
            "hidden_size": n_embd,
            "num_attention_heads": n_head,
            "intermediate_size": 4 * n_embd,
            "max_position_embeddings": n_positions,
        }


# config.model_type -> family. Change it through register_family.
FAMILIES: dict[str, DecoderFamily] = {}


def register_family(model_type: str, family: DecoderFamily, *, replace: bool = False) -> None:
    """Split models whose ``config.model_type`` is ``model_type`` with ``family``.

    ``replace=True`` swaps out a family registered before (a built-in one included); without it
    registering a taken name is refused, so two plugins cannot silently override each other.
    """
    if not isinstance(family, DecoderFamily):
        raise TypeError(f"family must be a DecoderFamily instance, got {type(family).__name__}")
    if model_type in FAMILIES and not replace:
        raise ValueError(
            f"a family is already registered for model_type {model_type!r} "
            f"({type(FAMILIES[model_type]).__name__}); pass replace=True to swap it"
        )
    FAMILIES[model_type] = family


def get_family(model_type: str | None) -> DecoderFamily:
    """The family registered for ``model_type``; a ValueError naming the supported ones if none."""
    family = FAMILIES.get(model_type or "")
    if family is None:
        raise ValueError(
            f"no model family for model_type {model_type!r}: supported are "
            f"{', '.join(sorted(FAMILIES))}; add one with remote_autograd.hf.register_family"
        )
    return family


for _type, _family in {
    "gpt2": GPT2Family(),
    "gpt_neox": GPTNeoXFamily(),
    "llama": LlamaFamily(),
    "mistral": LlamaFamily(),
    "qwen2": LlamaFamily(),
    "qwen3": LlamaFamily(),
    "gemma": LlamaFamily(),
    "phi3": Phi3Family(),
}.items():
    register_family(_type, _family)
