"""What a kept forward really holds: its inputs, its outputs and the activations autograd saved.

``max_context_bytes`` bounds this. Counting only inputs and outputs misses most of it: a
transformer block saves several tensors the size of its input for its backward. The saved ones
are seen through ``torch.autograd.graph.saved_tensors_hooks`` while the forward runs; tensors
are counted once per storage (views share one), and the trunk's own parameters and buffers,
which every forward saves and none owns, not at all.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["Footprint", "plain_bytes"]


class Footprint:
    """Bytes of distinct storages added to it, leaving out those of ``shared`` tensors."""

    def __init__(self, shared: Iterable[torch.Tensor] = ()) -> None:
        self.nbytes = 0
        self._seen: set[tuple[torch.device, int]] = set()
        for tensor in shared:
            self._key(tensor)

    def add(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            self._count(tensor)

    @contextlib.contextmanager
    def saved(self) -> Iterator[None]:
        """Count every tensor autograd saves for backward inside the block."""

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            # A Parameter (or a view of one, as linear saves weight.t()) is a weight of the
            # trunk whatever its storage: FSDP gathers a layer's weights into fresh memory for
            # each forward and frees it after.
            if not isinstance(tensor, torch.nn.Parameter) and not isinstance(
                tensor._base, torch.nn.Parameter
            ):
                self._count(tensor)
            # The same memory, without the autograd history: an output saved as itself would
            # hold its own grad_fn, a cycle no collector frees (the whole graph leaked).
            return tensor.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield

    def _count(self, tensor: torch.Tensor) -> None:
        key = self._key(tensor)
        if key is not None:
            self.nbytes += key[2]

    def _key(self, tensor: torch.Tensor) -> tuple[torch.device, int, int] | None:
        """Registers the tensor's storage; returns it (device, address, bytes) if new."""
        try:
            storage = tensor.untyped_storage()
            key = (tensor.device, storage.data_ptr())
            size = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
            key, size = (tensor.device, id(tensor)), tensor.numel() * tensor.element_size()
        if key in self._seen:
            return None
        self._seen.add(key)
        return (*key, size)


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def plain_bytes(tree: Any) -> int:
    """About the memory the plain values of ``tree`` take (numbers, strings, and the lists,
    tuples and maps holding them and its tensors' slots): ``sys.getsizeof`` of each, walked
    without recursion. A kept forward keeps them for its recompute: a 1 MiB frame of numbers
    is ~8 MiB of Python objects, which counting its tensors alone let pile up unbounded."""
    total, stack = 0, [tree]
    while stack:
        node = stack.pop()
        total += sys.getsizeof(node)
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return total
