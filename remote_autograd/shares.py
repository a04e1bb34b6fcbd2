"""How a call's batch is cut between the ranks of a distributed trunk (distributed.py).

The batch size is the first dimension of the first input tensor that has one; every input
tensor whose first dimension equals it is cut into contiguous shares, the first ranks taking
one sample more when the batch does not divide (5 over 2 ranks: 3 + 2). Other tensors
(position ids of batch 1, masks without a batch dimension) and plain values go to every rank
whole. A call with no batch dimension at all is run whole by rank 0 alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Plan", "shares"]


def shares(batch: int, world: int) -> list[int]:
    """Contiguous share sizes of a batch over ``world`` ranks, the first ranks one larger."""
    base, extra = divmod(batch, world)
    return [base + (1 if rank < extra else 0) for rank in range(world)]


def _batch_size(tensors: Sequence[torch.Tensor]) -> int | None:
    return next((int(t.shape[0]) for t in tensors if t.dim() >= 1), None)


class Plan:
    """One call's split: per input whether it is cut, each rank's share, the ranks whose
    outputs count (``active``) and the ranks that run (``running``: all of them when every
    rank must take part in the trunk's collectives, as FSDP's are)."""

    def __init__(self, tensors: Sequence[torch.Tensor], world: int, *, everyone: bool) -> None:
        batch = _batch_size(tensors)
        self.batch = batch
        self.batched = [batch is not None and t.dim() >= 1 and t.shape[0] == batch for t in tensors]
        # No batch dimension at all: rank 0 runs the call whole (with FSDP the others run it
        # too, for the collectives, and their outputs and gradients are left out).
        self.sizes = shares(batch, world) if batch is not None else [1] + [0] * (world - 1)
        self.active = [rank for rank, size in enumerate(self.sizes) if size > 0] or [0]
        self.running = list(range(world)) if everyone else self.active
        self.offsets = [sum(self.sizes[:rank]) for rank in range(world)]

    def share(self, tensor: torch.Tensor, batched: bool, rank: int) -> torch.Tensor:
        """Rank ``rank``'s part of ``tensor`` (all of it when it is not cut)."""
        if not batched or self.batch is None:
            return tensor
        start = self.offsets[rank]
        return tensor[start : start + self.sizes[rank]]

    def stand_in(self, tensor: torch.Tensor, batched: bool, rank: int) -> torch.Tensor:
        """What a running rank computes on: its share, or, when that is empty, the batch's
        first sample, whose results are left out (a trunk need not take a batch of 0)."""
        if batched and self.batch and not self.sizes[rank]:
            return tensor[:1]
        return self.share(tensor, batched, rank)
