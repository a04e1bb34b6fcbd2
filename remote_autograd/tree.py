"""Flatten nested values into (template, tensors) and back, in one fixed order.

Named tuples and Hugging Face ``ModelOutput``s keep their type (what a trunk returns is what
its caller gets); other tuple and dict subclasses become plain tuples and dicts, as the wire
carries them (codec.py). ``UserDict``s (a tokenizer's ``BatchEncoding``) are walked too and
keep their type, for :func:`~remote_autograd.split_batch`; the wire refuses them. Other
mappings are plain values.

Plain recursive functions rather than closures: a recursive closure is a reference cycle, and a
cycle holding tensors keeps them (and, through their graph, server contexts) alive until the
garbage collector happens to run.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import UserDict
from typing import Any

import torch

__all__ = ["flatten", "is_model_output", "is_named_tuple", "model_output", "unflatten"]


def is_named_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and isinstance(getattr(type(value), "_fields", None), tuple)


def is_model_output(value: Any) -> bool:
    """A Hugging Face ``ModelOutput`` (without importing transformers: where no module has
    imported it, no value is one)."""
    generic = sys.modules.get("transformers.utils.generic")
    base = getattr(generic, "ModelOutput", None)
    return base is not None and isinstance(value, base)


def _tuple_like(node: tuple, items: Any) -> tuple:
    return type(node)._make(items) if is_named_tuple(node) else tuple(items)  # type: ignore[attr-defined]


def _dict_like(node: dict, items: dict) -> dict:
    return model_output(type(node), items) if is_model_output(node) else items


def _mapping_like(node: UserDict, items: dict) -> Any:
    """A mapping of ``node``'s type built from ``items`` (a UserDict's type takes a dict, as
    BatchEncoding's does), else a dict. (The wire carries plain dicts: codec.py refuses it.)"""
    try:
        return type(node)(items)
    except Exception:  # noqa: BLE001 - a subclass whose constructor takes no dict
        return items


def model_output(cls: type, items: dict) -> Any:
    """``cls(**items)``, with the keys that are not its fields (``out["aux"] = ...``, which a
    ModelOutput allows) set after, in their order."""
    fields = {field.name for field in dataclasses.fields(cls)}
    output = cls(**{key: value for key, value in items.items() if key in fields})
    for key, value in items.items():
        if key not in fields:
            output[key] = value
    return output


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
        return _tuple_like(node, [_flatten(item, tensors) for item in node])
    if isinstance(node, list):
        return [_flatten(item, tensors) for item in node]
    if isinstance(node, dict):
        return _dict_like(node, {key: _flatten(item, tensors) for key, item in node.items()})
    if isinstance(node, UserDict):  # a tokenizer's BatchEncoding
        return _mapping_like(node, {key: _flatten(item, tensors) for key, item in node.items()})
    return node


def unflatten(template: Any, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> Any:
    """Put ``tensors`` back into the slots of ``template``."""
    if isinstance(template, _Slot):
        return tensors[template.index]
    if isinstance(template, tuple):
        return _tuple_like(template, [unflatten(item, tensors) for item in template])
    if isinstance(template, list):
        return [unflatten(item, tensors) for item in template]
    if isinstance(template, dict):
        return _dict_like(template, {k: unflatten(item, tensors) for k, item in template.items()})
    if isinstance(template, UserDict):
        items = {k: unflatten(item, tensors) for k, item in template.items()}
        return _mapping_like(template, items)
    return template
