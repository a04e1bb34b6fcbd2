"""The trunk's part of a model's ``state_dict()``: fetched from and sent to the server.

A model holding a :class:`~remote_autograd.RemoteModule` then checkpoints like any other:
``torch.save(model.state_dict(), f)`` holds the trunk's trainable parameters and persistent
buffers (BatchNorm statistics...) under the RemoteModule's prefix, with the trunk's own names,
and ``model.load_state_dict()`` of that file puts them back on the server. The trunk's frozen
parameters (a LoRA trunk's base weights) are left out: the server builds them itself, and
they never change.
"""

from __future__ import annotations

from typing import Any

import torch

from .client import TrunkClient
from .errors import InvalidRequest

__all__ = ["load_trunk_state", "save_trunk_state", "split_trunk_state"]


def save_trunk_state(client: TrunkClient, destination: dict[str, Any], prefix: str) -> None:
    """Add the trunk's trainable parameters and persistent buffers to ``destination``, in the
    order the trunk's own ``state_dict()`` has them (code zipping two state dicts' values
    lines them up); from a server that does not say the order, parameters first."""
    state = client.get_state(parameters=True, optimizer=False, buffers=True)
    tensors = {**(state.get("parameters") or {}), **(state.get("buffers") or {})}
    order = [name for name in state.get("order") or () if name in tensors]
    listed = set(order)
    for name in [*order, *(name for name in tensors if name not in listed)]:
        destination[prefix + name] = tensors[name]


def split_trunk_state(client: TrunkClient, state: dict[str, Any]) -> dict[str, Any]:
    """A LoadState frame for ``state`` (trunk names to tensors): buffers apart from
    parameters; a name the trunk has not is sent as a parameter, and the server names it."""
    buffers = set(client.info().buffers)
    return {
        "parameters": {k: v for k, v in state.items() if k not in buffers},
        "buffers": {k: v for k, v in state.items() if k in buffers},
        "optimizer": None,
        "step": None,
    }


def load_trunk_state(
    client: TrunkClient,
    state_dict: dict[str, Any],
    prefix: str,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """What ``nn.Module._load_from_state_dict`` does for local tensors, for the trunk's.

    The keys under ``prefix`` are matched against the names the server reports (an unreachable
    server raises its TransportError: nothing is reported as matched without asking it).
    Missing and unexpected keys are reported as PyTorch reports a local module's (its
    ``load_state_dict`` raises on them when strict, returns them otherwise), and the keys that
    match are loaded either way, as PyTorch loads a local module's. A shape or kind the trunk
    refuses is an error whatever ``strict`` is, again as PyTorch's size mismatch; the server
    then loads nothing.
    """
    info = client.info()
    expected = [*info.trainable_parameters, *info.buffers]
    known = set(expected)
    ours = {
        key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)
    }
    missing_keys.extend(prefix + name for name in expected if name not in ours)
    unexpected_keys.extend(prefix + name for name in ours if name not in known)
    load = {}
    for name in expected:
        if name not in ours:
            continue
        value = ours[name]
        if not isinstance(value, torch.Tensor):
            error_msgs.append(
                f'While copying the parameter named "{prefix + name}", expected torch.Tensor '
                f"or Tensor-like object from checkpoint but received {type(value)}"
            )
            return
        load[name] = value.detach().cpu()
    if not load:
        return
    try:
        client.load_state(split_trunk_state(client, load))
    except InvalidRequest as exc:  # a shape or dtype that does not fit, NaN...: named there
        error_msgs.append(f"the trunk at {client.address} refused the load: {exc}")
