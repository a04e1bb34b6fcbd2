"""Cut a Hugging Face causal LM into bottom, trunk and top.

    bottom: token + position embeddings, blocks [0, k)   -> client
    trunk:  blocks [k, m)                                -> server
    top:    blocks [m, n), final norm, LM head           -> client

What crosses each cut is the hidden states plus the *2-D* padding mask and the position ids
(integer tensors, a few bytes per token). Every part rebuilds what its blocks need from these
with the library's own helpers, exactly as the unsplit model does once: the causal + padding
mask (full or sliding window), and (for a RoPE family) the rotary embeddings from the position
ids. What differs between families lives in one :class:`~remote_autograd.hf.families.DecoderFamily`
subclass, found by ``config.model_type`` (see families.py), so a new architecture is one more of
these, not another split.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.loss.loss_utils import ForCausalLMLoss

from .families import DecoderFamily, get_family

__all__ = [
    "Bottom",
    "SplitModel",
    "Top",
    "Trunk",
    "causal_lm_loss",
    "split_causal_lm",
]


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
        layers = range(self.first_layer, self.first_layer + len(self.blocks))
        kwargs = self.family.block_kwargs(
            self.config, self.shared, hidden_states, attention_mask, position_ids, layers
        )
        for block, block_kwargs in zip(self.blocks, kwargs, strict=True):
            hidden_states = block(hidden_states, **block_kwargs)
        return hidden_states

    def extra_repr(self) -> str:
        last = self.first_layer + len(self.blocks)
        return f"blocks [{self.first_layer}, {last}) of a {self.config.model_type}"


class Bottom(_Part):
    """Embeddings and the first blocks; returns what the trunk takes, as keyword arguments."""

    def __init__(self, family, config, embeddings: nn.ModuleDict, blocks, shared) -> None:
        super().__init__(family, config, blocks, shared, 0, embeddings=embeddings)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        # As the unsplit model: 0..T-1 unless given (HF generate() numbers a left-padded row
        # from its first token: attention_mask.cumsum(-1) - 1).
        if position_ids is None:
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
    # A peft PeftModel: its LoRA layers are in the model it wraps, whose attributes the
    # wrapper's own shadow (a Llama's model.model is the whole LM there).
    base = getattr(model, "get_base_model", None)
    if callable(base):
        model = base()
    family = get_family(getattr(model.config, "model_type", None))
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
