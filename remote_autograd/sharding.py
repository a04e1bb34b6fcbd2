"""The trunk's tensors under FSDP2 (``--parallel fsdp``, distributed.py): how the module is
sharded, and how whole tensors and shards turn into each other where the engine meets them.

Each rank holds a shard of every parameter, gradient and optimizer state (a ``DTensor``). The
engine speaks whole tensors (GetState, LoadState, a checkpoint loaded in another layout):
:func:`full` gathers them, :func:`distribute` cuts this rank's shard out of a whole value every
rank holds (no communication), :func:`room` makes a tensor of a saved shape in this trunk's
layout for torch.distributed.checkpoint to read into.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .ranks import is_sharded, local
from .validate import params_by_saved_id

__all__ = ["distribute", "full", "place_optimizer_state", "room", "shard"]


def shard(module: nn.Module) -> None:
    """FSDP2 on each layer (a child of an ``nn.ModuleList`` or ``nn.Sequential``) that has
    parameters, then on the whole trunk; gradients summed over the ranks, not averaged (the
    loss is the client's: the sum over the shares is the unsplit gradient)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    layers = [
        child
        for parent in module.modules()
        if isinstance(parent, (nn.ModuleList, nn.Sequential))
        for child in parent.children()
        if any(True for _ in child.parameters())
    ]
    for layer in layers:
        fully_shard(layer)
    # FSDP2 leaves the root's own parameters (a final norm, a head) gathered after a forward,
    # for its backward. A forward with no backward (no grad) then kept them gathered and
    # stale: later forwards used them as they were before a Step or a LoadState.
    fully_shard(module, reshard_after_forward=True)
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.set_gradient_divide_factor(1.0)
            # A plain SUM: a factor of 1 would otherwise be a PREMUL_SUM, which gloo lacks.
            sub.set_force_sum_reduction_for_comms(True)


def full(tree: Any) -> Any:
    """``tree`` with every sharded tensor gathered whole (collective: every rank calls it)."""
    if isinstance(tree, dict):
        return {key: full(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [full(value) for value in tree]
    if is_sharded(tree):
        return tree.full_tensor()
    return tree


def distribute(value: torch.Tensor, like: Any) -> Any:
    """This rank's shard of a whole ``value``, laid out as the sharded tensor ``like`` (no
    communication: every rank holds the whole value)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        value.to(local(like).device), like.device_mesh, like.placements, src_data_rank=None
    )


def place_optimizer_state(optimizer: torch.optim.Optimizer, state: Any) -> Any:
    """An optimizer ``state_dict`` of whole tensors, with each tensor shaped like its sharded
    parameter replaced by this rank's shard, ready for ``optimizer.load_state_dict``."""
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict):
        return state  # load_state_dict says what is wrong with it
    by_id = params_by_saved_id(state, optimizer)
    placed = {}
    for index, entries in state["state"].items():
        param = by_id.get(index)
        placed[index] = {
            key: distribute(value, param)
            if isinstance(value, torch.Tensor)
            and param is not None
            and is_sharded(param)
            and value.shape == param.shape
            else value
            for key, value in entries.items()
        }
    return {**state, "state": placed}


def room(
    params: Sequence[tuple[str, torch.Tensor]],
    device: torch.device,
    shape: list[int],
    dtype: torch.dtype,
    sharded: bool,
) -> torch.Tensor:
    """Room for a saved tensor in this trunk's layout: sharded like the parameters under fsdp
    (whatever the layout it was saved in: DCP reshards), whole under ddp."""
    like: Any = next((p for _, p in params if is_sharded(p)), None)
    if like is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    from torch.distributed.tensor import zeros

    # Saved whole (under ddp, or a step count): sharded here only if shaped like a weight.
    if not sharded and not any(list(p.shape) == shape for _, p in params):
        return torch.zeros(shape, dtype=dtype, device=device)
    return zeros(shape, dtype=dtype, device_mesh=like.device_mesh, placements=like.placements)
