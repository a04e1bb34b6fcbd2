"""The trunk's fingerprint: what a client checks so that it trains the trunk it means to.

A fingerprint is JSON text describing an ``nn.Module``: each submodule's path, class and
``extra_repr()`` (so ``Linear(4, 8)`` differs from ``Linear(4, 16)`` and "blocks [2, 4)"
from "blocks [1, 5)"), each parameter's name, shape, dtype and whether it trains, and each
persistent buffer's name, shape and dtype. Values are not part of it: two trunks with the same
architecture and different weights share a fingerprint. Being text rather than a hash, it lets
the client say *what* differs, not only that something does.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

__all__ = [
    "batch_statistics",
    "computes_over_batch",
    "fingerprint_differences",
    "fingerprint_digest",
    "persistent_buffers",
    "state_order",
    "trunk_dtype",
    "trunk_fingerprint",
]

_FORMAT = 1
_SHOWN = 5  # differences of one kind named in a message; the rest are counted


def computes_over_batch(module: nn.Module, training: bool = True) -> bool:
    """Whether ``module`` itself, in a forward in that mode, computes over the batch
    (BatchNorm's batch statistics, in eval mode too where it keeps no running ones) or moves
    running statistics once per call (an InstanceNorm that tracks them, in training): a batch
    run in pieces then computes something else than the whole batch."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return training or module.running_mean is None  # what torch's forward decides by
    return (
        training
        and isinstance(module, nn.modules.instancenorm._InstanceNorm)
        and bool(module.track_running_stats)
    )


def batch_statistics(module: nn.Module) -> str:
    """The class of a submodule of ``module`` that a training forward runs over the batch, ""
    if none. Submodules in eval mode inside a module in training mode (a frozen BatchNorm)
    stay so in training forwards (runner.py) and count as such."""
    frozen = module.training
    return next(
        (
            type(sub).__name__
            for sub in module.modules()
            if computes_over_batch(sub, training=sub.training or not frozen)
        ),
        "",
    )


def persistent_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers ``module.state_dict()`` holds (BatchNorm statistics...), in its order."""
    found = []
    for path, sub in module.named_modules():
        prefix = f"{path}." if path else ""
        found += [(prefix + name, buffer) for name, buffer in _own_persistent(sub)]
    return found


def _own_persistent(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``module``'s own persistent buffers (not its children's)."""
    return [
        (name, buffer)
        for name, buffer in module._buffers.items()
        if buffer is not None and name not in module._non_persistent_buffers_set
    ]


def trunk_dtype(module: nn.Module) -> str:
    """The dtype of the trunk's floating parameters ("float32"), "" without any."""
    return next((_dtype(p) for p in module.parameters() if p.is_floating_point()), "")


def state_order(module: nn.Module) -> list[str]:
    """The names of the parameters and persistent buffers in ``module.state_dict()``'s order
    (each module's own parameters, then its buffers, then its children's)."""
    names = []
    for path, sub in module.named_modules():
        prefix = f"{path}." if path else ""
        names += [prefix + n for n, p in sub._parameters.items() if p is not None]
        names += [prefix + n for n, _ in _own_persistent(sub)]
    return names


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def trunk_fingerprint(module: nn.Module) -> str:
    """The fingerprint of ``module``, as a trunk server computes it of what it serves.

    Pass it as ``ClientOptions(fingerprint=...)``: the client then refuses a server whose trunk
    differs, naming the difference. Compute it from the same module (same class, same
    arguments, same adapters) the server is started with, before any ``.to(dtype)`` cast that
    ``ServerOptions.dtype`` would do.
    """
    description = {
        "format": _FORMAT,
        "modules": [
            [path, type(sub).__name__, sub.extra_repr()] for path, sub in module.named_modules()
        ],
        "parameters": [
            [name, list(p.shape), _dtype(p), bool(p.requires_grad)]
            for name, p in module.named_parameters()
        ],
        "buffers": [[name, list(b.shape), _dtype(b)] for name, b in persistent_buffers(module)],
    }
    return json.dumps(description, separators=(",", ":"))


def fingerprint_digest(fingerprint: str) -> str:
    """A short name of a fingerprint for messages and logs."""
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:12]


def _parse(fingerprint: str, whose: str) -> dict[str, Any]:
    try:
        description = json.loads(fingerprint)
    except ValueError as exc:
        raise ValueError(
            f"{whose} fingerprint is not JSON text of trunk_fingerprint(): {exc}"
        ) from None
    if not isinstance(description, dict) or description.get("format") != _FORMAT:
        raise ValueError(
            f"{whose} fingerprint is not of format {_FORMAT}: compute it with "
            "remote_autograd.trunk_fingerprint(module) of this version"
        )
    return description


def _compare(kind: str, expected: list, served: list, attributes: tuple[str, ...]) -> list[str]:
    want = {entry[0]: entry[1:] for entry in expected}
    have = {entry[0]: entry[1:] for entry in served}
    lines = []
    missing = [name for name in want if name not in have]
    extra = [name for name in have if name not in want]
    if missing:
        lines.append(f"{kind} expected but not served: {_names(missing)}")
    if extra:
        lines.append(f"{kind} served but not expected: {_names(extra)}")
    changed = []
    for name, values in want.items():
        if name in have and have[name] != values:
            diffs = [
                f"{attr} {ours!r} expected, {theirs!r} served"
                for attr, ours, theirs in zip(attributes, values, have[name], strict=False)
                if ours != theirs
            ]
            changed.append(f"{name or '(root)'}: {', '.join(diffs)}")
    if changed:
        more = f" (and {len(changed) - _SHOWN} more)" if len(changed) > _SHOWN else ""
        lines.append(f"{kind} that differ: " + "; ".join(changed[:_SHOWN]) + more)
    return lines


def _names(names: list[str]) -> str:
    shown = ", ".join(n or "(root)" for n in names[:_SHOWN])
    return shown + (f" (and {len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")


def fingerprint_differences(expected: str, served: str) -> list[str]:
    """What differs between two fingerprints, one line per kind of difference (empty: none)."""
    want = _parse(expected, "the expected")
    have = _parse(served, "the server's")
    return [
        *_compare("modules", want["modules"], have["modules"], ("class", "extra_repr")),
        *_compare(
            "parameters",
            want["parameters"],
            have["parameters"],
            ("shape", "dtype", "requires_grad"),
        ),
        *_compare("buffers", want["buffers"], have["buffers"], ("shape", "dtype")),
    ]
