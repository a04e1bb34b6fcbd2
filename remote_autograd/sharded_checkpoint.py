"""Checkpoints of a trunk on several processes, written with torch.distributed.checkpoint.

Every rank calls :func:`save` and :func:`load` together (they are collective). The state is the
engine's checkpoint (engine.py: weights version, module state, each session's optimizer), the
same tree a one-process server writes with checkpoint_file.py. Layout of ``path`` (a
directory)::

    latest           the name of the newest complete checkpoint, e.g. "v12-5f3a9c0e1b2d"
    v12-5f3a9c0e1b2d/
        *.distcp, .metadata   DCP's files: every tensor; each rank writes its own shards, and a
                              tensor every rank holds whole (ddp, optimizer step counts) once
        meta                  everything else: the tree with each tensor replaced by its key,
                              shape, dtype and whether it is sharded (a codec frame, msgpack)

``latest`` is replaced (write, fsync, rename) only once every rank finished writing, so a group
killed while saving resumes from the previous checkpoint; older directories are then removed.
A sharded tensor is saved as a ``DTensor`` and read back into one of the loading trunk's
layout (DCP reshards when the world size changed). DCP keeps its own ``.metadata`` file with
pickle: load only checkpoints this server wrote. With several hosts ``path`` must be a
directory every host sees (a shared file system).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from . import codec
from .checkpoint_file import FILE_LIMITS, remove_temporaries, write_atomically
from .ranks import is_sharded

__all__ = ["load", "save"]

_LATEST = "latest"
_META = "meta"
_TENSOR = "__tensor__"  # the key that marks a tensor's place in the meta tree


def _split(tree: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``tree`` with each tensor moved into ``tensors`` under its path, leaving a placeholder."""
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree
        return {
            _TENSOR: prefix,
            "shape": list(tree.shape),
            "dtype": codec.dtype_name(tree.dtype),
            "sharded": is_sharded(tree),
        }
    if isinstance(tree, dict):
        return {key: _split(value, f"{prefix}/{key}", tensors) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_split(value, f"{prefix}/{i}", tensors) for i, value in enumerate(tree)]
    return tree


def _fill(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if _TENSOR in tree:
            return tensors[tree[_TENSOR]]
        return {key: _fill(value, tensors) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_fill(value, tensors) for value in tree]
    return tree


def _placeholders(tree: Any) -> list[dict[str, Any]]:
    if isinstance(tree, dict):
        if _TENSOR in tree:
            return [tree]
        return [p for value in tree.values() for p in _placeholders(value)]
    if isinstance(tree, list):
        return [p for value in tree for p in _placeholders(value)]
    return []


def save(path: str, state: dict[str, Any], group: Any = None) -> None:
    """Write ``state`` under directory ``path`` (every rank, together). A failure to write on
    any rank (a full disk) raises OSError on every rank, which all go on serving."""
    rank = dist.get_rank()
    # One fresh name for all ranks: a save never writes into the directory ``latest`` names.
    token = torch.tensor([secrets.randbits(48)], dtype=torch.int64)
    dist.broadcast(token, 0, group=group)
    name = f"v{state['weights_version']}-{int(token):012x}"
    target = os.path.join(path, name)
    tensors: dict[str, torch.Tensor] = {}
    meta = _split(state, "", tensors)
    _together(lambda: os.makedirs(target, exist_ok=True) if rank == 0 else None, group)
    try:
        dcp.save(tensors, checkpoint_id=target)  # DCP tells every rank of a failure
    except dcp.CheckpointException as exc:  # a BaseException: made an OSError, like the others
        raise OSError(f"torch.distributed.checkpoint could not write {target}: {exc}") from exc

    def publish() -> None:
        if rank != 0:
            return
        write_atomically(os.path.join(target, _META), [codec.encode(meta, compression="none")])
        write_atomically(os.path.join(path, _LATEST), [name.encode()])
        for old in os.listdir(path):
            if old.startswith("v") and old != name:
                shutil.rmtree(os.path.join(path, old), ignore_errors=True)

    _together(publish, group)


def _together(write: Callable[[], None], group: Any) -> None:
    """Run ``write`` (file work of rank 0 only) and agree on its outcome: every rank raises if
    it failed, instead of rank 0 alone leaving the others waiting in the next collective."""
    error: OSError | None = None
    try:
        write()
    except OSError as exc:
        error = exc
    flag = torch.tensor([float(error is not None)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if error is not None:
        raise error
    if flag.item() > 0:
        raise OSError("rank 0 could not write the checkpoint (see its log)")


def load(
    path: str,
    live: dict[str, torch.Tensor],
    allocate: Callable[[list[int], torch.dtype, bool], torch.Tensor],
) -> dict[str, Any] | None:
    """The state saved under ``path`` (every rank, together), or None if there is none yet.

    ``live`` maps tensor keys (``/module/<name>``) to the trunk's own tensors, which are read
    into in place; any other tensor is made by ``allocate(shape, dtype, sharded)`` in the
    loading trunk's layout."""
    # What a save killed mid-way left: its half-written directory goes with the next save;
    # the temporary file of its ``latest``, here (no save runs while a trunk starts).
    remove_temporaries(os.path.join(path, _LATEST))
    try:
        with open(os.path.join(path, _LATEST), "rb") as f:
            name = f.read().decode()
    except FileNotFoundError:
        return None
    target = os.path.join(path, name)
    with open(os.path.join(target, _META), "rb") as f:
        meta = codec.decode(f.read(), limits=FILE_LIMITS)
    tensors: dict[str, torch.Tensor] = {}
    for spec in _placeholders(meta):
        key = spec[_TENSOR]
        held = live.get(key)
        if held is None:
            held = allocate(spec["shape"], codec.DTYPES[spec["dtype"]], bool(spec["sharded"]))
        tensors[key] = held
    dcp.load(tensors, checkpoint_id=target)
    return _fill(meta, tensors)
