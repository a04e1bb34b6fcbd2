"""What the trunk's checks need from the other processes of a trunk, when there are any.

A trunk sharded with FSDP2 (distributed.py) holds each parameter, gradient and optimizer state
as a ``DTensor`` whose rank-local shard is only part of it: a verdict such as "this gradient is
finite" or "this parameter grew past max_weight_growth", and a norm, must be taken over every
rank's shard, and every rank must reach the same verdict, or the replicas part ways. The checks
(guard.py, validate.py, the engine's GradNorm) therefore look at their own shard (:func:`local`)
and combine across ranks through a :class:`Ranks`. A trunk in one process uses :data:`ONE`,
which combines nothing.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch

__all__ = ["ONE", "Ranks", "is_sharded", "local"]


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a DTensor: each rank holds a part of it."""
    # No DTensor can exist unless torch.distributed.tensor was imported: no import cost here.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of ``tensor``: a DTensor's local shard, any other tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


class Ranks:
    """Combines per-rank values over every process of the trunk (here: one, unchanged)."""

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank."""
        return flag

    def max(self, values: Sequence[float]) -> list[float]:
        """Each value's largest over the ranks; NaN counts as +inf (it is not finite)."""
        return [math.inf if math.isnan(v) else float(v) for v in values]

    def norms(self, values: Sequence[float], norm_type: float) -> list[float]:
        """Each vector norm of a tensor sharded over the ranks, from its shards' norms."""
        return [float(v) for v in values]

    # Whether each rank holds a part of the gradients, which a later all-reduce adds up (ddp,
    # between combines): then an overflow can lie in the sum of parts each rank finds finite.
    parts = False

    def totals(self, values: Sequence[float]) -> list[float]:
        """Each value's sum over the ranks where they hold parts (``parts``); else the values."""
        return [float(v) for v in values]

    def total_tensors(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors' sums over the ranks where they hold parts, as new tensors; else them."""
        return list(tensors)


ONE = Ranks()  # a trunk in one process
