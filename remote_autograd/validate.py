"""What the server accepts from the network besides frames: plain hyperparameters, finite
numbers, gradients that will not poison the weights. Each check raises InvalidRequest naming
what it refused."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgpack
import torch

from .errors import InvalidRequest
from .ranks import ONE, Ranks, local

__all__ = [
    "autocast_dtype",
    "check_buffers",
    "check_finite_grads",
    "check_finite_groups",
    "check_finite_tree",
    "check_grad_outputs",
    "check_optimizer_state",
    "check_parameters",
    "clone_tree",
    "describe",
    "finite_flags",
    "is_plain",
    "optimizer_class",
    "params_by_saved_id",
    "plain_group",
    "plain_map",
    "step_groups",
    "unpack",
]

_PLAIN = (bool, int, float)


_AUTOCAST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def autocast_dtype(name: str) -> torch.dtype | None:
    """The torch.autocast dtype a Compute header names ("" = no autocast)."""
    if not name:
        return None
    if name not in _AUTOCAST_DTYPES:
        raise InvalidRequest(
            f"autocast dtype must be one of {sorted(_AUTOCAST_DTYPES)}, got {name[:40]!r}"
        )
    return _AUTOCAST_DTYPES[name]


def finite_flags(tensors: Sequence[torch.Tensor]) -> list[bool]:
    """Whether each tensor holds only finite values, with one pass over each and one
    synchronisation per device kind. On a GPU, one fused kernel takes every tensor's largest
    magnitude (``_foreach_norm`` with ord=inf: NaN and inf propagate), instead of a few kernel
    launches per tensor; on the CPU, ``aminmax`` per tensor (``isfinite().all()`` would first
    build a boolean tensor as large as the input, several times slower)."""
    tensors = [local(t) for t in tensors]  # a DTensor: this rank's shard
    flags = [True] * len(tensors)
    checked = [i for i, t in enumerate(tensors) if t.is_floating_point() and t.numel()]
    fused = [i for i in checked if tensors[i].device.type == "cuda"]
    rest = [i for i in checked if tensors[i].device.type != "cuda"]
    verdicts: list[tuple[list[int], torch.Tensor]] = []
    if fused:
        norms = torch._foreach_norm([tensors[i] for i in fused], math.inf)
        verdicts.append((fused, torch.isfinite(torch.stack(norms))))
    if rest:
        ends = [torch.aminmax(tensors[i]) for i in rest]
        verdicts.append(
            (rest, torch.stack([torch.isfinite(low) & torch.isfinite(high) for low, high in ends]))
        )
    for indices, finite in verdicts:
        for index, flag in zip(indices, finite.tolist(), strict=True):
            flags[index] = flag
    return flags


def check_finite_grads(
    params: Sequence[tuple[str, torch.Tensor]],
    grads: Sequence[torch.Tensor | None],
    ranks: Ranks = ONE,
) -> None:
    """Refuse a Backward whose parameter gradients hold NaN or inf (on any rank), before
    accumulating."""
    present = [(name, g) for (name, _), g in zip(params, grads, strict=True) if g is not None]
    finite = finite_flags([g for _, g in present])
    if ranks.any(not all(finite)):
        bad = [name for (name, _), ok in zip(present, finite, strict=True) if not ok]
        raise InvalidRequest(
            f"this Backward gives non-finite (NaN or inf) gradients for trunk parameters "
            f"{', '.join(bad[:5]) or '(on another rank)'}{' ...' if len(bad) > 5 else ''}: "
            "refused, nothing was accumulated (check the inputs and the loss)"
        )


def check_grad_outputs(grads: Sequence[Any], *, finite: bool = True) -> None:
    """Refuse output gradients of a Backward that are not floating tensors, or (``finite``)
    not finite."""
    for index, grad in enumerate(grads):
        if grad is None:
            continue
        if not isinstance(grad, torch.Tensor) or not grad.is_floating_point():
            raise InvalidRequest(
                f"gradient {index}: expected a floating tensor, got {describe(grad)}"
            )
        if finite and not finite_flags([grad])[0]:
            raise InvalidRequest(
                f"gradient {index} is not finite (NaN or inf): refused before it reaches the trunk"
            )


def check_parameters(parameters: Any, named: dict[str, torch.Tensor]) -> None:
    """Refuse parameters to load that the trunk does not have, of another shape, or non-finite."""
    if not isinstance(parameters, dict):
        raise InvalidRequest("'parameters' must map names to tensors")
    for name, value in parameters.items():
        if name not in named:
            raise InvalidRequest(f"no trainable parameter named {name!r} in the trunk")
        if not isinstance(value, torch.Tensor) or value.shape != named[name].shape:
            raise InvalidRequest(
                f"parameter {name}: expected shape {list(named[name].shape)}, got {describe(value)}"
            )
        if not _finite_as(value, named[name]):
            raise InvalidRequest(
                f"parameter {name} holds NaN or inf{_as(value, named[name])}; refused"
            )


def check_buffers(
    buffers: Any, named: dict[str, torch.Tensor], what: str = "persistent buffer"
) -> None:
    """Refuse buffers to load that the trunk does not have, of another shape or kind, or
    non-finite (an integer counter may not become a float, and the other way round)."""
    if not isinstance(buffers, dict):
        raise InvalidRequest(f"the {what}s must map names to tensors")
    for name, value in buffers.items():
        if name not in named:
            raise InvalidRequest(f"no {what} named {name!r} in the trunk")
        held = named[name]
        if not isinstance(value, torch.Tensor) or value.shape != held.shape:
            raise InvalidRequest(
                f"{what} {name}: expected shape {list(held.shape)}, got {describe(value)}"
            )
        same_kind = value.is_floating_point() == held.is_floating_point() and (
            (value.dtype == torch.bool) == (held.dtype == torch.bool)
        )
        if not same_kind:
            raise InvalidRequest(f"{what} {name}: expected {held.dtype}, got {describe(value)}")
        if not _finite_as(value, held):
            raise InvalidRequest(f"{what} {name} holds NaN or inf{_as(value, held)}; refused")


def check_module_state(state: Any, module: torch.nn.Module) -> None:
    """Refuse a whole module state (a checkpoint's) that is not the module's own: names,
    shapes and kinds, finite floating tensors; before any of it is loaded (torch's own load
    copies what fits and then raises, leaving the module half loaded)."""
    if not isinstance(state, dict):
        raise InvalidRequest(f"the module's state is {describe(state)}, not a map")
    held = module.state_dict()
    missing, unexpected = sorted(set(held) - set(state)), sorted(set(state) - set(held))
    if missing or unexpected:
        raise InvalidRequest(
            f"the module's state does not fit the trunk: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]} (another trunk, or other --lora options)"
        )
    tensors = {name: value for name, value in held.items() if isinstance(value, torch.Tensor)}
    # shape, kind, finite as held; entries that are not tensors (a module's get_extra_state)
    # are the module's to read
    check_buffers({name: state[name] for name in tensors}, tensors, "module entry")


def _finite_as(value: torch.Tensor, held: torch.Tensor) -> bool:
    """Whether ``value`` is finite once stored in ``held``'s dtype: a float64 1e300 is finite,
    and inf in a float32 weight; an int32 100000 is inf in a float16 one."""
    if held.is_floating_point() and value.dtype != held.dtype:
        value = value.to(held.dtype)
    return finite_flags([value])[0]


def _as(value: torch.Tensor, held: torch.Tensor) -> str:
    if value.dtype == held.dtype:
        return ""
    return f" as the trunk's {str(held.dtype)[6:]} (sent as {str(value.dtype)[6:]})"


# The base class; LBFGS needs a closure, which only the client could evaluate.
_NOT_OPTIMIZERS = {"Optimizer", "LBFGS"}


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class of torch.optim a client named, if it may run on the server."""
    cls = getattr(torch.optim, name, None)
    if (
        name.startswith("_")
        or name in _NOT_OPTIMIZERS
        or not isinstance(cls, type)
        or not issubclass(cls, torch.optim.Optimizer)
    ):
        allowed = sorted(
            n
            for n, c in vars(torch.optim).items()
            if isinstance(c, type)
            and issubclass(c, torch.optim.Optimizer)
            and n not in _NOT_OPTIMIZERS
        )
        raise InvalidRequest(f"optimizer {name!r} is not allowed; use one of {', '.join(allowed)}")
    return cls


def check_finite_tree(value: Any, what: str) -> None:
    if isinstance(value, torch.Tensor):
        if not finite_flags([value])[0]:
            raise InvalidRequest(f"{what} holds NaN or inf; refused")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRequest(f"{what} holds {value}; refused")
    elif isinstance(value, dict):
        for item in value.values():
            check_finite_tree(item, what)
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_finite_tree(item, what)


def describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__


def is_plain(value: Any) -> bool:
    """A finite number, a bool, None, or a list or tuple of these (Adafactor's default eps is
    ``(None, 1e-3)``)."""
    if isinstance(value, (list, tuple)):
        return all(_plain_item(v) for v in value)
    return _plain_item(value)


def _plain_item(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, _PLAIN) or value is None


def unpack(data: bytes, what: str) -> Any:
    """A msgpack value sent in a control message (None when empty)."""
    try:
        return msgpack.unpackb(data, raw=False) if data else None
    except (ValueError, msgpack.UnpackException) as exc:
        raise InvalidRequest(f"{what} are not valid msgpack: {exc}") from exc


def plain_map(value: Any, what: str) -> dict[str, Any]:
    """Keyword arguments of plain finite values (None: no arguments)."""
    value = {} if value is None else value
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InvalidRequest(f"{what} must be a map of names to values")
    for key, item in value.items():
        if not is_plain(item):
            raise InvalidRequest(
                f"{what}: {key}={item!r} is not a finite number, bool, or list of these"
            )
    return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}


def plain_group(group: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in group.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (*_PLAIN, type(None), str)) or (
            isinstance(value, (list, tuple))
            and all(isinstance(v, (*_PLAIN, type(None))) for v in value)
        ):
            out[key] = value
    return out


def step_groups(groups: Any, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The hyperparameter updates a Step brings, one map per param group (None: none)."""
    if groups is None:
        groups = [{} for _ in optimizer.param_groups]
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise InvalidRequest(f"param_groups must be a list of {len(optimizer.param_groups)} maps")
    updates = []
    for group, current in zip(groups, optimizer.param_groups, strict=True):
        if not isinstance(group, dict):
            raise InvalidRequest("each param group must be a map of hyperparameters")
        update = {}
        for key, value in group.items():
            if key not in current or key == "params":
                continue  # e.g. initial_lr from a scheduler: a client-side detail
            if not is_plain(value) or value is None:
                raise InvalidRequest(
                    f"hyperparameter {key}={value!r}: expected a finite number, bool or a list "
                    "of these"
                )
            if isinstance(value, (list, tuple)) and len(value) > MAX_GROUP_SEQUENCE:
                # Kept in the group, and in every checkpoint, which could not be restored.
                raise InvalidRequest(
                    f"hyperparameter {key}: a sequence of {len(value)} items, more than "
                    f"{MAX_GROUP_SEQUENCE}"
                )
            update[key] = tuple(value) if isinstance(value, list) else value
        updates.append(update)
    return updates


# What a param group to load may hold besides its "params": torch's hyperparameters and the
# entries LR schedulers add (initial_lr, max_lr, base_momentum, ...) are a few dozen names of
# numbers, flags, short strings and short tuples (betas). Torch keeps every entry as sent, in
# every checkpoint, for the session's life: more is refused.
MAX_GROUP_ENTRIES = 64
MAX_GROUP_TEXT = 64  # characters of an entry's name, or of a string value
MAX_GROUP_SEQUENCE = 16  # items of a list or tuple value


def check_finite_groups(state: Any, what: str = "optimizer state") -> None:
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list):
        raise InvalidRequest(f"{what} must hold 'param_groups' (a list)")
    for group in groups:
        if not isinstance(group, dict):
            continue  # check_hyperparameters names it
        if len(group) > MAX_GROUP_ENTRIES + 1:
            raise InvalidRequest(
                f"{what}: a param group holds {len(group) - 1} entries besides its "
                f"params, more than {MAX_GROUP_ENTRIES}"
            )
        for key, value in group.items():
            if not isinstance(key, str) or len(key) > MAX_GROUP_TEXT:
                shown = key if isinstance(key, str) else describe(key)
                raise InvalidRequest(
                    f"{what}: a param group's entry named {str(shown)[:80]!r}: names "
                    f"must be strings of at most {MAX_GROUP_TEXT} characters"
                )
            if key == "params":
                continue
            if not is_plain(value) and not isinstance(value, str):
                raise InvalidRequest(f"{what}: {key}={value!r} is not finite and plain")
            if (isinstance(value, str) and len(value) > MAX_GROUP_TEXT) or (
                isinstance(value, (list, tuple)) and len(value) > MAX_GROUP_SEQUENCE
            ):
                raise InvalidRequest(
                    f"{what}: {key} holds a string of more than {MAX_GROUP_TEXT} "
                    f"characters or a sequence of more than {MAX_GROUP_SEQUENCE} items"
                )


# Entries of one parameter's optimizer state: torch's optimizers keep at most four (Adam with
# amsgrad: step, exp_avg, exp_avg_sq, max_exp_avg_sq).
MAX_STATE_ENTRIES = 8


def check_optimizer_state(state: Any, optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer state to load that holds more than an optimizer of these parameters
    keeps: an entry for a parameter id that no param group lists (torch keeps it as sent, for
    good), one that is not a map of names to tensors and numbers, or a tensor larger than its
    parameter. Such a state was kept, saved in every checkpoint, and broke moving the
    optimizer state (offloading an adapter). ``state``'s param groups are checked before."""
    saved = []
    for group in state["param_groups"]:
        ids = group.get("params") if isinstance(group, dict) else None
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise InvalidRequest("optimizer state: each param group's 'params' must list ints")
        saved += ids
    count = sum(len(group["params"]) for group in optimizer.param_groups)
    if len(saved) != count:
        raise InvalidRequest(
            f"optimizer state: its param groups list {len(saved)} parameters, the optimizer "
            f"has {count}"
        )
    by_id = params_by_saved_id(state, optimizer)
    entries_of = state.get("state")
    if not isinstance(entries_of, dict):  # torch's state_dict() always has it, even empty
        raise InvalidRequest("optimizer state: 'state' must map parameter ids to their state")
    for key, entries in entries_of.items():
        param = by_id.get(key)
        if param is None:
            raise InvalidRequest(f"optimizer state for parameter id {key!r}, which no group lists")
        if not isinstance(entries, dict) or len(entries) > MAX_STATE_ENTRIES:
            raise InvalidRequest(
                f"optimizer state of parameter id {key}: expected a map of at most "
                f"{MAX_STATE_ENTRIES} names to tensors and numbers, got {describe(entries)}"
            )
        for name, value in entries.items():
            if not isinstance(name, str):
                raise InvalidRequest(f"optimizer state of parameter id {key}: a key {name!r}")
            if isinstance(value, torch.Tensor):
                if value.numel() > max(1, param.numel()):
                    raise InvalidRequest(
                        f"optimizer state {name} of parameter id {key}: {describe(value)}, "
                        f"larger than its parameter ({param.numel()} elements)"
                    )
            elif not (value is None or isinstance(value, _PLAIN)):
                raise InvalidRequest(
                    f"optimizer state {name} of parameter id {key}: expected a tensor or a "
                    f"number, got {describe(value)}"
                )


def params_by_saved_id(state: Any, optimizer: torch.optim.Optimizer) -> dict[Any, Any]:
    """The parameter of ``optimizer`` that each id of a saved ``state`` names: by the ids'
    order in the saved param groups, as torch's ``load_state_dict`` maps them (the trunk's
    part of a whole model's optimizer holds ids 2..5, say), not by their value."""
    saved = [i for group in state.get("param_groups", ()) for i in group.get("params", ())]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return dict(zip(saved, params, strict=False))


def clone_tree(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: clone_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clone_tree(v) for v in value)
    return value
