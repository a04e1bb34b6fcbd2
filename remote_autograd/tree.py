"""Flatten nested values into (template, tensors) and back, in one fixed order.

Plain recursive functions rather than closures: a recursive closure is a reference cycle, and a
cycle holding tensors keeps them (and, through their graph, server contexts) alive until the
garbage collector happens to run.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["flatten", "unflatten"]


class _Slot:
    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __eq__(self, other: object) -> bool:  # templates compare by their shape and values
        return isinstance(other, _Slot) and other.index == self.index

    def __hash__(self) -> int:
        return hash((_Slot, self.index))


def flatten(value: Any) -> tuple[Any, list[torch.Tensor]]:
    """Replace every tensor in lists, tuples and dicts by a slot; return the tensors in order."""
    tensors: list[torch.Tensor] = []
    return _flatten(value, tensors), tensors


def _flatten(node: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(node, torch.Tensor):
        tensors.append(node)
        return _Slot(len(tensors) - 1)
    if isinstance(node, tuple):
        return tuple(_flatten(item, tensors) for item in node)
    if isinstance(node, list):
        return [_flatten(item, tensors) for item in node]
    if isinstance(node, dict):
        return {key: _flatten(item, tensors) for key, item in node.items()}
    return node


def unflatten(template: Any, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> Any:
    """Put ``tensors`` back into the slots of ``template``."""
    if isinstance(template, _Slot):
        return tensors[template.index]
    if isinstance(template, tuple):
        return tuple(unflatten(item, tensors) for item in template)
    if isinstance(template, list):
        return [unflatten(item, tensors) for item in template]
    if isinstance(template, dict):
        return {key: unflatten(item, tensors) for key, item in template.items()}
    return template
