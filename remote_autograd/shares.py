"""How a call's batch is cut between the ranks of a distributed trunk (distributed.py), and
how the ranks' outputs and input gradients are put back together.

The batch size is the first dimension of the first input tensor that has one; every input
tensor whose first dimension equals it is cut into contiguous shares, the first ranks taking
one sample more when the batch does not divide (5 over 2 ranks: 3 + 2). Other tensors
(position ids of batch 1, masks without a batch dimension) and plain values go to every rank
whole. A call with no batch dimension at all is run whole by rank 0 alone.

Outputs come back concatenated along the batch, so every tensor output must carry the batch as
its first dimension when more than one rank ran; the gradients of the outputs are cut as the
inputs were, and the input gradients concatenated again (summed, for inputs sent whole).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import InvalidRequest

__all__ = ["Plan", "join_grads", "shares"]


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

    # -- the ranks' results put back together (rank 0) ---------------------------------------

    def gather(
        self, per_rank: dict[int, list[torch.Tensor]], device: torch.device
    ) -> tuple[list[bool], list[torch.Tensor]]:
        """The forward's outputs from each active rank's, on ``device``; per output also
        whether it carries the batch (then its gradient is cut as the inputs were)."""
        ranks = self.active
        counts = {len(per_rank[rank]) for rank in ranks}
        if len(counts) != 1:
            raise InvalidRequest(f"the ranks' shares gave different numbers of outputs: {counts}")
        batched, outputs = [], []
        for index in range(counts.pop()):
            parts = [per_rank[rank][index].to(device) for rank in ranks]
            if len(parts) == 1:
                batched.append(parts[0].dim() >= 1 and self.batch is not None)
                outputs.append(parts[0])
                continue
            if not all(
                p.dim() >= 1 and p.shape[0] == self.sizes[r]
                for p, r in zip(parts, ranks, strict=True)
            ):
                raise InvalidRequest(
                    f"output {index} of the trunk has no batch dimension first (shapes "
                    f"{[list(p.shape) for p in parts]} for shares {self.sizes}): a trunk served "
                    "with --parallel must return tensors whose first dimension is the batch"
                )
            if len({(p.shape[1:], p.dtype) for p in parts}) != 1:
                raise InvalidRequest(
                    f"output {index} of the trunk differs between the ranks' shares beyond "
                    f"the batch dimension (shapes {[list(p.shape) for p in parts]}, dtypes "
                    f"{sorted({str(p.dtype) for p in parts})}): a trunk served with --parallel "
                    "must give each sample the same shape whatever else is in its share (pad "
                    "to a fixed length rather than to the longest in the batch)"
                )
            batched.append(True)
            outputs.append(torch.cat(parts))
        return batched, outputs

    def grad_shares(
        self,
        outputs: Sequence[torch.Tensor],
        batched_outputs: Sequence[bool],
        grads: list[Any],
        rank: int,
    ) -> list[Any]:
        """Rank ``rank``'s part of the gradients of the gathered ``outputs``, each checked to
        be a tensor of its output's shape."""
        several = len(self.active) > 1
        result: list[Any] = []
        for index, (grad, output) in enumerate(zip(grads, outputs, strict=True)):
            if grad is None:
                result.append(None)
                continue
            if not isinstance(grad, torch.Tensor) or grad.shape != output.shape:
                shape = getattr(grad, "shape", type(grad).__name__)
                raise InvalidRequest(
                    f"gradient {index}: expected a tensor of shape {list(output.shape)}, "
                    f"got {shape}"
                )
            if several and batched_outputs[index]:
                grad = self.share(grad, True, rank)
            result.append(grad)
        return result

    def input_grads(
        self,
        leaves: Sequence[torch.Tensor],
        wanted: Sequence[int],
        per_rank: dict[int, list[Any]],
        device: torch.device,
    ) -> list[torch.Tensor | None]:
        """The gradients of the inputs ``wanted`` (indices into ``leaves``) from each active
        rank's: concatenated for a cut input (zeros for a share that had none), summed for an
        input every rank had whole."""
        result: list[torch.Tensor | None] = []
        for position, index in enumerate(wanted):
            grads = [per_rank[r][position] for r in self.active]
            cut = self.batched[index]
            leaf = leaves[index].detach()
            pieces = [self.share(leaf, True, r) for r in self.active] if cut else []
            result.append(join_grads(grads, cut, pieces, device))
        return result


def join_grads(
    grads: Sequence[torch.Tensor | None],
    cut: bool,
    pieces: Sequence[torch.Tensor],
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """One input's gradient from its pieces' (a rank's share, or a micro-batch's slice, see
    chunks.py): concatenated for an input cut into ``pieces`` (zeros for a piece that got
    none), summed for one every piece had whole (``pieces`` unused); None if no piece got one.
    Each moved to ``device`` when given."""
    if all(g is None for g in grads):
        return None
    moved = [g if g is None or device is None else g.to(device) for g in grads]
    if cut:
        return torch.cat(
            [torch.zeros_like(p) if g is None else g for g, p in zip(moved, pieces, strict=True)]
        )
    total = None
    for g in moved:
        if g is not None:
            total = g if total is None else total + g
    return total
