"""A session optimizer's parameter groups, named by trunk parameter names.

The client sends groups as ``{"params": [names], hyperparameter: value...}``; the server checks
them against the trunk's trainable parameters and gives torch's optimizer the tensors.
Parameters that no group names form a last group with the optimizer's defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import InvalidRequest
from .validate import plain_map

__all__ = ["resolve_groups", "torch_groups"]


def resolve_groups(groups: Any, params: Sequence[tuple[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """The groups with every name checked, plus a last group of the parameters none names;
    None or empty: one group of all."""
    names = [name for name, _ in params]
    if not groups:
        return [{"params": names}]
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise InvalidRequest("param_groups must be a list of maps {'params': [names], ...}")
    known = set(names)
    taken: dict[str, int] = {}
    resolved = []
    for index, group in enumerate(groups):
        members = group.get("params")
        if not isinstance(members, list) or not members:
            raise InvalidRequest(f"param group {index}: 'params' must be a non-empty list of names")
        for name in members:
            if not isinstance(name, str) or name not in known:
                raise InvalidRequest(
                    f"param group {index}: no trainable parameter named {str(name)[:80]!r} in "
                    "the trunk"
                )
            if name in taken:
                raise InvalidRequest(
                    f"parameter {name!r} is in param groups {taken[name]} and {index}: a "
                    "parameter belongs to one group"
                )
            taken[name] = index
        hyper = plain_map({k: v for k, v in group.items() if k != "params"}, f"param group {index}")
        resolved.append({"params": list(members), **hyper})
    rest = [name for name in names if name not in taken]
    if rest:
        resolved.append({"params": rest})
    return resolved


def torch_groups(
    groups: list[dict[str, Any]], params: Sequence[tuple[str, torch.Tensor]]
) -> list[dict[str, Any]]:
    """Resolved groups with the tensors in place of the names, for a torch optimizer."""
    named = dict(params)
    return [{**group, "params": [named[name] for name in group["params"]]} for group in groups]
