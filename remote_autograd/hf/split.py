"""Cut a Hugging Face causal LM into bottom, trunk and top.

    bottom: token + position embeddings, blocks [0, k)   -> client
    trunk:  blocks [k, m)                                -> server
    top:    blocks [m, n), final norm, LM head           -> client

What crosses each cut is the hidden states plus the *2-D* padding mask and the position ids
(integer tensors, a few bytes per token). Every part rebuilds what its blocks need from these
with the library's own helpers, exactly as the unsplit model does once: the causal + padding
mask for GPT-2, and (for a RoPE family) the rotary embeddings from the position ids. What
differs between families lives in one :class:`DecoderFamily` subclass, so adding Llama/Qwen
means writing one more of these, not another split.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.masking_utils import create_causal_mask

__all__ = [
    "FAMILIES",
    "Bottom",
    "DecoderFamily",
    "GPT2Family",
    "LlamaFamily",
    "SplitModel",
    "Top",
    "Trunk",
    "causal_lm_loss",
    "split_causal_lm",
]


class DecoderFamily:
    """Where one family of decoder-only models keeps its parts, and what its blocks take."""

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
        # GPT2Model and LlamaModel both number positions 0..T-1 whatever the padding.
        return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)

    def block_kwargs(
        self,
        config: PretrainedConfig,
        shared: nn.ModuleDict,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
    ) -> dict[str, Any]:
        """Keyword arguments of every block, built as the unsplit model builds them."""
        raise NotImplementedError


class GPT2Family(DecoderFamily):
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

    def block_kwargs(self, config, shared, hidden_states, attention_mask, position_ids):
        mask = _causal_mask(config, hidden_states, attention_mask, position_ids)
        return {"attention_mask": mask, "position_ids": position_ids}


def _causal_mask(config, hidden_states, attention_mask, position_ids):
    """The 4-D causal + padding mask the blocks take, built as the unsplit model builds it."""
    return create_causal_mask(
        config=config,
        inputs_embeds=hidden_states,
        attention_mask=attention_mask,
        past_key_values=None,
        position_ids=position_ids,
    )


class LlamaFamily(DecoderFamily):
    """RoPE: every part holds the (parameter-free) rotary embedding and turns the position ids
    that crossed the cut into cos/sin itself, as LlamaModel does once."""

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

    def block_kwargs(self, config, shared, hidden_states, attention_mask, position_ids):
        mask = _causal_mask(config, hidden_states, attention_mask, position_ids)
        return {
            "attention_mask": mask,
            "position_ids": position_ids,
            "position_embeddings": shared["rotary"](hidden_states, position_ids=position_ids),
        }


# model_type -> family.
FAMILIES: dict[str, DecoderFamily] = {"gpt2": GPT2Family(), "llama": LlamaFamily()}


class _Part(nn.Module):
    """Blocks of one part and what they need to run on their own.

    Modules are registered in the unsplit model's order (embeddings, blocks, norm, head), so
    ``parameters()`` of bottom, trunk and top, concatenated, list the unsplit model's parameters
    in its own order: gradient-norm clipping then stacks the norms exactly as torch would.
    """

    def __init__(
        self,
        family: DecoderFamily,
        config: PretrainedConfig,
        blocks: list[nn.Module],
        shared: nn.ModuleDict,
        first_layer: int,
        *,
        embeddings: nn.ModuleDict | None = None,
        norm: nn.Module | None = None,
        head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.family = family
        self.config = config
        self.first_layer = first_layer  # index of blocks[0] in the unsplit model
        if embeddings is not None:
            self.embeddings = embeddings
        self.shared = shared
        self.blocks = nn.ModuleList(blocks)
        if norm is not None:
            self.norm = norm
        if head is not None:
            self.head = head

    def run_blocks(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        if not len(self.blocks):
            return hidden_states
        kwargs = self.family.block_kwargs(
            self.config, self.shared, hidden_states, attention_mask, position_ids
        )
        for block in self.blocks:
            hidden_states = block(hidden_states, **kwargs)
        return hidden_states

    def extra_repr(self) -> str:
        last = self.first_layer + len(self.blocks)
        return f"blocks [{self.first_layer}, {last}) of a {self.config.model_type}"


class Bottom(_Part):
    """Embeddings and the first blocks; returns what the trunk takes, as keyword arguments."""

    def __init__(self, family, config, embeddings: nn.ModuleDict, blocks, shared) -> None:
        super().__init__(family, config, blocks, shared, 0, embeddings=embeddings)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | None]:
        position_ids = self.family.position_ids(attention_mask, input_ids)  # (1, T)
        hidden = self.family.embed(self.embeddings, input_ids, position_ids)  # (B, T, d)
        hidden = self.run_blocks(hidden, attention_mask, position_ids)
        return {
            "hidden_states": hidden,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
        }


class Trunk(_Part):
    """The middle blocks: hidden states in, hidden states out. This is what the server runs."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        dropout_seed: int | None = None,
    ) -> torch.Tensor:
        if position_ids is None:
            position_ids = _positions(hidden_states)
        if dropout_seed is None or not self.training:
            return self.run_blocks(hidden_states, attention_mask, position_ids)
        # The client draws the seed from its own (checkpointed) generator, so the trunk's
        # dropout masks replay exactly after a resume; the server's RNG is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(dropout_seed)
            return self.run_blocks(hidden_states, attention_mask, position_ids)


class Top(_Part):
    """The last blocks, the final norm and the LM head; returns logits (B, T, vocab)."""

    def __init__(
        self, family, config, blocks, shared, norm: nn.Module, head: nn.Module, first_layer
    ):
        super().__init__(family, config, blocks, shared, first_layer, norm=norm, head=head)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if position_ids is None:
            position_ids = _positions(hidden_states)
        hidden = self.run_blocks(hidden_states, attention_mask, position_ids)
        return self.head(self.norm(hidden))


def _positions(hidden_states: torch.Tensor) -> torch.Tensor:
    return torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)


class SplitModel(NamedTuple):
    bottom: Bottom
    trunk: Trunk
    top: Top


def split_causal_lm(model: PreTrainedModel, start: int, end: int) -> SplitModel:
    """Cut ``model`` so that the trunk holds blocks ``[start, end)``.

    The parts share ``model``'s modules (no copy): tied weights, such as GPT-2's embedding and
    LM head, stay one parameter in the bottom and the top. Only the trunk is meant to travel.
    """
    model_type = getattr(model.config, "model_type", None)
    family = FAMILIES.get(model_type or "")
    if family is None:
        raise ValueError(
            f"cannot split a {model_type!r} model: supported families are "
            f"{', '.join(sorted(FAMILIES))} (add a DecoderFamily to remote_autograd.hf.split)"
        )
    backbone = family.backbone(model)
    blocks = list(family.blocks(backbone))
    if not 0 <= start < end <= len(blocks):
        raise ValueError(
            f"trunk layers [{start}, {end}) do not fit a model of {len(blocks)} blocks: "
            f"expected 0 <= start < end <= {len(blocks)}"
        )
    shared = family.shared(backbone)
    config = model.config
    bottom = Bottom(family, config, family.embeddings(backbone), blocks[:start], shared)
    trunk = Trunk(family, config, blocks[start:end], shared, first_layer=start)
    head = model.get_output_embeddings()
    top = Top(family, config, blocks[end:], shared, family.final_norm(backbone), head, end)
    for part in (bottom, trunk, top):
        part.train(model.training)
    return SplitModel(bottom, trunk, top)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss ``GPT2LMHeadModel(labels=...)`` computes: next-token cross entropy, -100 ignored."""
    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])
