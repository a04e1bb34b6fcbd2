"""What keeps one session from ruining the shared trunk: bounded hyperparameters and
``grad_scale``, gradients that stay finite when accumulated, and optimizer steps that apply
only when everything they produce is finite and of a sane size (otherwise rolled back exactly).

Every refusal raises InvalidRequest naming the hyperparameter, option or parameter.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .errors import InvalidRequest, RemoteError, TrunkError
from .fingerprint import persistent_buffers
from .options import ServerOptions
from .ranks import ONE, Ranks, is_sharded, local
from .sessions import Session, ZeroGrad, scale_tensor
from .validate import finite_flags

__all__ = [
    "IMMUTABLE_HYPERPARAMETERS",
    "StepBackup",
    "accumulate",
    "check_finite_weights",
    "check_grad_scale",
    "check_hyperparameters",
    "check_updates",
    "guarded_step",
    "keep_configured_flags",
    "pending_grads",
]

log = logging.getLogger(__name__)

# Flags that change what the optimizer keeps in its state or how it runs: set them when
# configuring the optimizer, not in a Step (amsgrad switched on mid-run finds no max_exp_avg_sq).
IMMUTABLE_HYPERPARAMETERS = frozenset(
    {"amsgrad", "capturable", "differentiable", "foreach", "fused"}
)

_BOOL_OR_NONE = frozenset({"foreach", "fused"})
_BOOLS = frozenset(
    {"amsgrad", "maximize", "nesterov", "centered", "decoupled_weight_decay", "capturable"}
    | {"differentiable"}
)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _interval(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    def check(value: Any) -> bool:
        if not _number(value):
            return False
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return above and below

    left, right = "(" if low_open else "[", ")" if high_open else "]"
    return check, f"a number in {left}{low:g}, {high:g}{right}"


def _pair(check: Callable[[Any], bool], text: str, length: int = 2):
    def pair(value: Any) -> bool:
        return isinstance(value, (list, tuple)) and len(value) == length and all(map(check, value))

    return pair, f"{length} numbers, each {text}"


_UNIT, _UNIT_TEXT = _interval(0.0, 1.0)
_NON_NEGATIVE, _NON_NEGATIVE_TEXT = _interval(0.0, math.inf)
_BETA, _BETA_TEXT = _interval(0.0, 1.0, high_open=True)


def _eps(value: Any) -> bool:
    if isinstance(value, (list, tuple)):  # Adafactor's (eps1 or None, eps2)
        return len(value) == 2 and all(v is None or _UNIT(v) for v in value)
    return _UNIT(value)


def _etas(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(map(_number, value))
        and 0.0 < value[0] < 1.0 < value[1] <= 10.0
    )


def _step_sizes_rule(max_lr: float):
    def check(value: Any) -> bool:
        return (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(map(_number, value))
            and 0.0 <= value[0] <= value[1] <= max_lr
        )

    return check, f"(min, max) with 0 <= min <= max <= max_lr={max_lr:g}"


def _rules(optimizer: str, options: ServerOptions) -> dict[str, tuple[Callable[[Any], bool], str]]:
    """Each hyperparameter's allowed values, by its meaning in torch.optim."""
    lr, lr_text = _interval(0.0, options.max_lr)
    rules = {
        "lr": (lr, f"{lr_text} (ServerOptions.max_lr, serve --max-lr)"),
        "weight_decay": (_NON_NEGATIVE, _NON_NEGATIVE_TEXT),
        "momentum": (_UNIT, _UNIT_TEXT),
        "dampening": (_UNIT, _UNIT_TEXT),
        "betas": _pair(_BETA, _BETA_TEXT),
        "eps": (_eps, "a number in [0, 1] (Adafactor: a pair of these or None)"),
        "alpha": (_UNIT, _UNIT_TEXT),  # RMSprop's smoothing constant
        "rho": (_UNIT, _UNIT_TEXT),
        "lr_decay": (_NON_NEGATIVE, _NON_NEGATIVE_TEXT),
        "initial_accumulator_value": (_NON_NEGATIVE, _NON_NEGATIVE_TEXT),
        "lambd": (_NON_NEGATIVE, _NON_NEGATIVE_TEXT),
        "t0": (_NON_NEGATIVE, _NON_NEGATIVE_TEXT),
        "momentum_decay": (_NON_NEGATIVE, _NON_NEGATIVE_TEXT),
        "etas": (_etas, "(etaminus, etaplus) with 0 < etaminus < 1 < etaplus <= 10"),
        "step_sizes": _step_sizes_rule(options.max_lr),
        "beta2_decay": _interval(-math.inf, 0.0),
        "d": _interval(0.0, math.inf, low_open=True),
        "ns_steps": (
            lambda v: type(v) is int and 1 <= v <= 100,
            "a whole number of Newton-Schulz iterations in [1, 100]",
        ),
        "ns_coefficients": _pair(_number, "finite", 3),
    }
    if optimizer == "ASGD":
        rules["alpha"] = (_NON_NEGATIVE, _NON_NEGATIVE_TEXT)  # a power of the eta decay here
    return rules


def check_hyperparameters(
    optimizer: str,
    groups: Sequence[dict[str, Any]],
    options: ServerOptions,
    *,
    current: Sequence[dict[str, Any]] | None = None,
    call: str = "a Step",
) -> None:
    """Refuse hyperparameters outside what their meaning allows. ``groups`` are the values the
    optimizer would step with; ``current``, when given, the values it has now (``call``, a Step
    or a LoadState, may not change the flags in IMMUTABLE_HYPERPARAMETERS)."""
    rules = _rules(optimizer, options)
    for index, group in enumerate(groups):
        where = f"{optimizer} param group {index}"
        if not isinstance(group, dict):
            raise InvalidRequest(f"{where}: expected a map of hyperparameters")
        for key, value in group.items():
            if key == "params" or value is None and key in _BOOL_OR_NONE | {"adjust_lr_fn"}:
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if key in _BOOLS or key in _BOOL_OR_NONE:
                if not isinstance(value, bool):
                    raise InvalidRequest(
                        f"hyperparameter {key}={value!r} of {where}: expected a bool"
                    )
            elif key in rules:
                check, text = rules[key]
                if not check(value):
                    raise InvalidRequest(
                        f"hyperparameter {key}={value!r} of {where}: expected {text}"
                    )
            elif isinstance(value, (int, float)) and not math.isfinite(value):
                raise InvalidRequest(f"hyperparameter {key}={value!r} of {where}: not finite")
            if current is not None and index < len(current) and key in IMMUTABLE_HYPERPARAMETERS:
                before = current[index].get(key)
                if value != before:
                    raise InvalidRequest(
                        f"hyperparameter {key} of {where} cannot change in {call} ({before!r} -> "
                        f"{value!r}): configure a new RemoteOptimizer with {key}={value!r}"
                    )
        lr, decay = group.get("lr"), group.get("weight_decay")
        if _number(lr) and _number(decay) and float(lr) * float(decay) > 1.0:  # type: ignore[arg-type]
            raise InvalidRequest(
                f"hyperparameters lr={lr!r} and weight_decay={decay!r} of {where}: lr x "
                "weight_decay must be at most 1 (beyond it, decay alone flips the weights' sign "
                "and grows them every step)"
            )


def check_updates(
    optimizer: torch.optim.Optimizer, updates: Sequence[dict[str, Any]], options: ServerOptions
) -> None:
    """Refuse a Step's hyperparameter updates that would leave a group out of bounds."""
    current = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    merged = [{**group, **update} for group, update in zip(current, updates, strict=True)]
    check_hyperparameters(type(optimizer).__name__, merged, options, current=current)


def keep_configured_flags(groups: Sequence[Any], current: Sequence[dict[str, Any]]) -> None:
    """In the param groups of a state being loaded, the flags of IMMUTABLE_HYPERPARAMETERS as
    the optimizer was configured: ``foreach`` and ``fused`` always (they choose how a step runs,
    and the configured choice stands), the others where the state leaves them out or None.
    A state that sets one of those others differently is refused by check_hyperparameters:
    amsgrad switched on by a state without its ``max_exp_avg_sq`` would fail every Step."""
    for group, configured in zip(groups, current, strict=False):
        if not isinstance(group, dict):
            continue  # refused by check_hyperparameters
        for key in IMMUTABLE_HYPERPARAMETERS & configured.keys():
            if key in _BOOL_OR_NONE or group.get(key) is None:
                group[key] = configured[key]


def check_grad_scale(grad_scale: float, options: ServerOptions, method: str) -> None:
    """``grad_scale`` of a Backward, GradNorm or Step: 0 (not set) or in (0, max_grad_scale]."""
    if grad_scale == 0.0:
        return
    if not math.isfinite(grad_scale):
        raise InvalidRequest(f"{method}: grad_scale must be finite, got {grad_scale!r}")
    if not 0.0 < grad_scale <= options.max_grad_scale:
        raise InvalidRequest(
            f"{method}: grad_scale must be in (0, max_grad_scale={options.max_grad_scale:g}], "
            f"got {grad_scale!r} (ServerOptions.max_grad_scale, serve --max-grad-scale; "
            "clip_grad_norm_ only scales gradients down)"
        )


def _scaled(grads: Sequence[torch.Tensor], grad_scale: float) -> list[torch.Tensor]:
    """``grad * grad_scale`` as new tensors, the same arithmetic as Session.apply_pending."""
    if not grads or not grad_scale or grad_scale == 1.0:
        return list(grads)
    return list(torch._foreach_mul(list(grads), scale_tensor(grad_scale)))


def _refuse_non_finite(
    names: Sequence[str],
    tensors: Sequence[torch.Tensor],
    message: str,
    error: type[RemoteError] = InvalidRequest,
    ranks: Ranks = ONE,
) -> None:
    flags = finite_flags(tensors)
    if ranks.any(not all(flags)):
        bad = [name for name, ok in zip(names, flags, strict=True) if not ok]
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise error(message.format(shown or "(on another rank)"))


def accumulate(
    session: Session,
    param_grads: dict[str, torch.Tensor],
    zero_grad: int,
    grad_scale: float,
    ranks: Ranks = ONE,
    params: Sequence[tuple[str, torch.Tensor]] = (),
) -> None:
    """Add one Backward's parameter gradients to the session's, after the zero_grad and scale
    the client deferred to it. A sum that overflows to inf (each share finite, say two output
    gradients of 2e38) refuses the Backward with nothing changed. Where each rank holds a part
    of the sum (``ranks.parts``: ddp), the parts' sum is checked too; ``params`` then names the
    trunk's parameters in one order on every rank.

    In place when the largest magnitudes show no sum can come near the dtype's range (one read
    of the held and new gradients); otherwise the sums are built beside the held gradients and
    swapped in only once all are finite."""
    keep = zero_grad == ZeroGrad.KEEP
    both = [name for name in param_grads if name in session.grads] if keep else []
    scale = grad_scale if grad_scale else 1.0
    shapes = dict(params)
    # The sums that may overflow: a held and a new gradient, and under ddp every parameter's
    # parts over the ranks (the same list on every rank).
    names = list(shapes) if ranks.parts else both
    risky: list[str] = []
    if names:
        held = dict(zip(both, _max_abs([session.grads[n] for n in both]), strict=True))
        fresh = [n for n in names if n in param_grads]
        new = dict(zip(fresh, _max_abs([param_grads[n] for n in fresh]), strict=True))
        if ranks.parts:  # held only: kept and scaled, or dropped by the zero_grad
            only_held = [n for n in names if keep and n in session.grads and n not in new]
            maxima = _max_abs([session.grads[n] for n in only_held])
            held.update(zip(only_held, maxima, strict=True))
        bounds = ranks.totals([held.get(n, 0.0) * scale + new.get(n, 0.0) for n in names])
        risky = [
            name
            for name, bound in zip(names, bounds, strict=True)
            if not bound <= 0.5 * torch.finfo(_dtype(name, session, param_grads, shapes)).max
        ]
    # Every rank of a sharded trunk takes the same way: the other one checks with the others.
    if not ranks.any(bool(risky)):
        _add_in_place(session, param_grads, zero_grad, grad_scale)
        return
    message = (
        "this Backward would make the session's accumulated gradients of trunk parameters {} "
        "non-finite (the sum of several Backwards{} overflows): refused, nothing was "
        "accumulated; call zero_grad() and go on"
    )
    sums = _scaled([session.grads[name] for name in both], grad_scale)
    sums = [torch.add(held, param_grads[name]) for held, name in zip(sums, both, strict=True)]
    _refuse_non_finite(both, sums, message.format("{}", ""), ranks=ranks)
    if ranks.parts:  # the parts each rank holds after this Backward, added up
        after = dict(zip(both, sums, strict=True))
        parts = []
        for name in risky:
            if name in after:
                parts.append(after[name])
            elif keep and name in session.grads:
                parts.extend(_scaled([session.grads[name]], grad_scale))
            elif name in param_grads:
                parts.append(param_grads[name])
            else:
                parts.append(torch.zeros_like(shapes[name]))
        totals = ranks.total_tensors(parts)
        _refuse_non_finite(risky, totals, message.format("{}", ", or of the ranks' parts,"))
    if not both:  # nothing was built beside: add in place
        _add_in_place(session, param_grads, zero_grad, grad_scale)
        return
    others = [session.grads[name] for name in session.grads if name not in param_grads]
    if others and grad_scale and grad_scale != 1.0:  # the check passed: scale them in place
        torch._foreach_mul_(others, scale_tensor(grad_scale))
    session.grads.update(zip(both, sums, strict=True))
    for name, grad in param_grads.items():
        session.grads.setdefault(name, grad)


def _add_in_place(
    session: Session, param_grads: dict[str, torch.Tensor], zero_grad: int, grad_scale: float
) -> None:
    session.apply_pending(zero_grad, grad_scale)
    for name, grad in param_grads.items():
        held = session.grads.get(name)
        session.grads[name] = grad if held is None else held.add_(grad)


def _dtype(
    name: str,
    session: Session,
    param_grads: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
) -> torch.dtype:
    for tensors in (session.grads, param_grads, params):
        if name in tensors:
            return tensors[name].dtype
    raise KeyError(name)


def pending_grads(
    session: Session, zero_grad: int, grad_scale: float, ranks: Ranks = ONE
) -> dict[str, torch.Tensor]:
    """The gradients a Step applies: the session's after the deferred zero_grad and scale,
    computed beside them (the session keeps its own until the Step succeeds)."""
    if zero_grad == ZeroGrad.TO_NONE:
        return {}
    names = list(session.grads)
    held = [session.grads[name] for name in names]
    if zero_grad == ZeroGrad.TO_ZERO:
        return {name: torch.zeros_like(grad) for name, grad in zip(names, held, strict=True)}
    scaled = _scaled(held, grad_scale)
    if grad_scale > 1.0:  # Backward checked the sums; only scaling up can overflow them
        _refuse_non_finite(
            names,
            scaled,
            "Step refused: the session's accumulated gradients of trunk parameters {} times "
            f"grad_scale={grad_scale!r} are not finite; nothing was changed, call zero_grad() "
            "and go on",
            ranks=ranks,
        )
    return dict(zip(names, scaled, strict=True))


def _max_abs(tensors: Sequence[torch.Tensor]) -> list[float]:
    """Each tensor's largest magnitude (NaN where it holds NaN), with one synchronisation per
    (device, dtype) group: on a GPU one fused ``_foreach_norm(inf)`` kernel per group, on the
    CPU ``aminmax`` per tensor (one pass, about twice as fast as the norm there; see
    validate.finite_flags)."""
    tensors = [local(t) for t in tensors]  # a DTensor: this rank's shard (ranks.max combines)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(tensors):
        if tensor.numel():  # an empty tensor's largest magnitude is 0
            groups.setdefault((tensor.device, tensor.dtype), []).append(index)
    out = [0.0] * len(tensors)
    for (device, _), indices in groups.items():
        group = [tensors[i].detach() for i in indices]
        if device.type == "cpu":
            ends = [torch.aminmax(t) for t in group]
            norms = [torch.maximum(low.abs(), high.abs()) for low, high in ends]
        else:
            norms = list(torch._foreach_norm(group, math.inf))
        values = torch.stack(norms).double().tolist()
        for index, value in zip(indices, values, strict=True):
            out[index] = value
    return out


class StepBackup:
    """Buffers a guarded step copies what it changes into, kept from one step to the next.

    One step runs at a time (under the trunk lock), so one set serves every session: as many
    buffers of each shape as one step needs (the parameters and one optimizer's state). Fresh
    allocations for every step cost page faults on the CPU, 30x the copy itself (measured).
    """

    def __init__(self) -> None:
        self._pool: dict[tuple[torch.Size, torch.dtype, torch.device], list[torch.Tensor]] = {}
        self._copies = 0  # calls of copy() so far
        self._used: collections.deque[int] = collections.deque(maxlen=16)  # bytes, last steps
        self._taken_at: dict[tuple[torch.Size, torch.dtype, torch.device], int] = {}
        # Each parameter's largest |value| after the last step, with the tensor's version
        # counter then (any later in-place change, a LoadState or a rollback, bumps it; a fused
        # optimizer's kernel does not, but every step that stands is remembered anew).
        self._max: dict[int, tuple[int, float]] = {}
        self._prepared: _Prepared | None = None  # the copy prepare() takes between steps
        self.reused = 0  # how many tensors the last copy() found copied already (prepare())

    def max_abs(
        self, tensors: Sequence[torch.Tensor], copies: Sequence[torch.Tensor]
    ) -> list[float]:
        """Each tensor's largest magnitude: remembered if it did not change since, else
        measured on its copy."""
        values: list[float | None] = []
        for tensor in tensors:
            known = self._max.get(id(tensor))
            version = local(tensor)._version  # a DTensor's own counter misses its shard's steps
            values.append(known[1] if known and known[0] == version else None)
        missing = [i for i, value in enumerate(values) if value is None]
        for index, value in zip(missing, _max_abs([copies[i] for i in missing]), strict=True):
            values[index] = value
        return [float(value) for value in values]  # type: ignore[arg-type]

    def remember(self, tensors: Sequence[torch.Tensor], maxima: Sequence[float]) -> None:
        for tensor, value in zip(tensors, maxima, strict=True):
            self._max[id(tensor)] = (local(tensor)._version, value)

    def copy(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Copies of ``tensors`` (of a DTensor: its shard) in the kept buffers (valid until the
        next copy() or prepare()). The tensors that prepare() copied into the same buffers and
        that have not changed since are not copied again."""
        prepared, self._prepared = self._prepared, None  # one copy() uses it up
        if prepared is not None:
            prepared.thread.join()
        shards = [local(t) for t in tensors]
        buffers = self._buffers(shards)
        ready = (
            [False] * len(shards) if prepared is None else prepared.ready(tensors, shards, buffers)
        )
        self.reused = sum(ready)
        _copy_into(
            [b for b, done in zip(buffers, ready, strict=True) if not done],
            [t for t, done in zip(shards, ready, strict=True) if not done],
        )
        return buffers

    def prepare(self, tensors: Sequence[torch.Tensor]) -> None:
        """Start copying ``tensors`` now, on a thread of its own, for the next copy().

        Called once a step stands: until the next step nothing changes what that step will
        copy (forwards and backwards only read the weights), so the copy runs after the
        answer, beside whatever the trunk does next, not inside the next Step (for GPT-2's 9
        blocks on one CPU thread: 79 of the Step's ~185 ms). copy() waits for the thread, then
        takes only what it holds as it still is: the same tensor, with the same version counter,
        in the same buffer. PyTorch's in-place ops bump the counter; a fused optimizer's kernel
        does not, but an optimizer steps only inside guarded_step, after its copy(). Any other
        write that bypasses the counter (``param.data = ...``) must call forget() first. On a
        GPU the copy is a kernel queued on the stream already: nothing is prepared. Best
        effort: a thread or buffer that cannot be had leaves nothing prepared, and the next
        copy() copies everything itself."""
        self.forget()
        shards = [local(t) for t in tensors]
        if not shards or any(t.device.type != "cpu" for t in shards):
            return
        try:
            self._prepared = _Prepared(tensors, shards, self._buffers(shards, trim=False))
        except Exception:  # the step has stood: this must not fail it (MemoryError, no thread)
            log.warning("no copy between steps: the next Step takes it itself", exc_info=True)

    def forget(self) -> None:
        """Drop the prepared copy (after a write that its version counters cannot see)."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            prepared.thread.join()

    def _buffers(self, tensors: Sequence[torch.Tensor], trim: bool = True) -> list[torch.Tensor]:
        """A kept buffer for each of ``tensors``, the same one for the same place in a list of
        the same shapes; then (``trim``: a step's copy, not a prepared one) the pool is trimmed
        to what the last steps took."""
        taken: dict[tuple[torch.Size, torch.dtype, torch.device], int] = {}
        buffers = []
        for tensor in tensors:
            key = (tensor.shape, tensor.dtype, tensor.device)
            pool = self._pool.setdefault(key, [])
            index = taken[key] = taken.get(key, -1) + 1
            if index == len(pool):
                pool.append(torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device))
            buffers.append(pool[index])
        if trim:
            self._copies += 1
        self._taken_at.update(dict.fromkeys(taken, self._copies))
        if trim:
            self._trim(sum(b.numel() * b.element_size() for b in buffers), taken)
        return buffers

    def _trim(self, used: int, taken: dict[Any, int]) -> None:
        """Keep at most twice what the largest of the last 16 steps used (sessions whose
        optimizers hold other shapes and amounts of state alternate, and each finds its
        buffers): the shapes taken longest ago go first, then the buffers of this step's
        shapes beyond what it took. A state loaded in ever new shapes must not grow the pool
        for good."""
        self._used.append(used)
        budget = 2 * max(self._used)
        held = self.nbytes()
        for key in sorted(self._pool, key=self._taken_at.__getitem__):
            if held <= budget:
                break
            if self._taken_at[key] == self._copies:
                surplus = self._pool[key][taken[key] + 1 :]
                del self._pool[key][taken[key] + 1 :]
            else:
                surplus = self._pool.pop(key)
                del self._taken_at[key]
            held -= sum(b.numel() * b.element_size() for b in surplus)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for pool in self._pool.values() for b in pool)


class _Prepared:
    """A copy StepBackup.prepare() takes on a thread of its own. It holds the tensors weakly
    once copied: an optimizer dropped with its session is not kept alive until the next step."""

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        shards: list[torch.Tensor],
        buffers: list[torch.Tensor],
    ) -> None:
        # The tensors themselves name them: a DTensor's to_local() is a new view each call.
        self.tensors = [weakref.ref(t) for t in tensors]
        self.versions = [t._version for t in shards]  # a view shares its base's counter
        self.buffers = buffers
        self.done = False  # set by the thread once every tensor is copied
        # Not a daemon: the interpreter waits for it at exit, as a copy cut off in C++ by the
        # interpreter's end aborts the process.
        self.thread = threading.Thread(
            target=self._run, args=(shards,), name="ra-step-backup", daemon=False
        )
        self.thread.start()

    def _run(self, shards: list[torch.Tensor]) -> None:
        try:
            _copy_into(self.buffers, shards)
            self.done = True
        except Exception:  # out of memory: copy() then copies everything itself
            log.debug("the step backup's copy between steps failed", exc_info=True)

    def ready(
        self,
        tensors: Sequence[torch.Tensor],
        shards: Sequence[torch.Tensor],
        buffers: Sequence[torch.Tensor],
    ) -> list[bool]:
        """For each of ``tensors`` (whose shards go into ``buffers``), whether this copy holds
        it as it is now, in that buffer (the thread has ended)."""
        if not self.done:
            return [False] * len(tensors)
        held = {id(buffer): i for i, buffer in enumerate(self.buffers)}
        ready = []
        for now, shard, buffer in zip(tensors, shards, buffers, strict=True):
            i = held.get(id(buffer))
            ready.append(
                i is not None and self.tensors[i]() is now and shard._version == self.versions[i]
            )
        return ready


def _copy_into(buffers: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor]) -> None:
    if buffers:
        with torch.no_grad():
            torch._foreach_copy_(list(buffers), [t.detach() for t in tensors])


def _state_slots(
    optimizer: torch.optim.Optimizer, tensors: Sequence[torch.Tensor]
) -> list[tuple[torch.Tensor, str, torch.Tensor]]:
    """The optimizer's state tensors of ``tensors``: (parameter, key, tensor), in order."""
    return [
        (param, key, value)
        for param in tensors
        for key, value in optimizer.state.get(param, {}).items()
        if isinstance(value, torch.Tensor)
    ]


def _state_snapshot(
    optimizer: torch.optim.Optimizer,
    tensors: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    backup: StepBackup,
) -> tuple[dict[Any, dict[str, Any]], list[torch.Tensor], list[torch.Tensor]]:
    """The optimizer state of ``tensors`` (the parameters a step moves), its tensors copied
    into ``backup``; the parameters' copies; and copies of ``grads``. The parameters and the
    state come first, in the order :func:`_backed_up` gives StepBackup.prepare()."""
    state = {p: dict(entries) for p in tensors if (entries := optimizer.state.get(p)) is not None}
    slots = _state_slots(optimizer, tensors)
    copies = backup.copy([*_backed_up(tensors, slots), *grads])
    first_grad = len(tensors) + len(slots)
    for (param, key, _), copy in zip(slots, copies[len(tensors) : first_grad], strict=True):
        state[param][key] = copy
    return state, copies[: len(tensors)], copies[first_grad:]


def _backed_up(
    tensors: Sequence[torch.Tensor], slots: Sequence[tuple[torch.Tensor, str, torch.Tensor]]
) -> list[torch.Tensor]:
    return [*tensors, *(value for _, _, value in slots)]


def _may_write_grads(optimizer: torch.optim.Optimizer, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether ``step()`` may change the gradients it is given: torch's foreach paths do
    (SGD with Nesterov momentum, Rprop, Adagrad maximizing with weight decay...), as does an
    optimizer seen doing it before (``_ra_writes_grads``, set by guarded_step)."""
    if getattr(optimizer, "_ra_writes_grads", False):
        return True
    on_cuda = any(local(t).device.type == "cuda" for t in tensors)
    return any(
        g.get("foreach") or (g.get("foreach", False) is None and on_cuda)
        for g in optimizer.param_groups
    )


def _restore_state(
    optimizer: torch.optim.Optimizer,
    tensors: Sequence[torch.Tensor],
    snapshot: dict[Any, dict[str, Any]],
) -> None:
    for param in tensors:
        if param in snapshot:  # own tensors: the backup's buffers serve the next step
            now = optimizer.state.get(param, {})
            restored = {}
            for key, value in snapshot[param].items():
                held = now.get(key)
                if is_sharded(held):
                    with torch.no_grad():  # a DTensor (FSDP): its shard back in place
                        local(held).copy_(value)
                    restored[key] = held
                else:
                    restored[key] = value.clone() if isinstance(value, torch.Tensor) else value
            optimizer.state[param] = restored
        else:
            optimizer.state.pop(param, None)  # state the refused step created (its first step)


_NOT_THE_INPUTS = (
    torch.distributed.DistError,
    torch.OutOfMemoryError,
    *((torch.AcceleratorError,) if hasattr(torch, "AcceleratorError") else ()),
)


def guarded_step(
    optimizer: torch.optim.Optimizer,
    params: Sequence[tuple[str, torch.nn.Parameter]],
    grads: dict[str, torch.Tensor],
    updates: Sequence[dict[str, Any]],
    options: ServerOptions,
    backup: StepBackup | None = None,
    ranks: Ranks = ONE,
) -> None:
    """``optimizer.step()`` with ``grads`` and the hyperparameter ``updates`` (checked already by
    check_updates), kept only if every parameter and optimizer-state value it produces is
    finite and no parameter tensor grows past ``options.max_weight_growth``; otherwise the
    parameters, the optimizer state and its hyperparameters are restored exactly and
    InvalidRequest names the parameter.

    Costs a copy of what the step changes (the parameters that have a gradient, as torch's
    optimizers skip the others, and their optimizer state) into ``backup``'s kept buffers, and
    one max-magnitude pass over them with one synchronisation per device and dtype. On a CPU
    the copy is mostly taken after the last step that stood, on a thread (StepBackup.prepare)."""
    moving = [(name, param) for name, param in params if name in grads]
    names = [name for name, _ in moving]
    tensors = [param for _, param in moving]
    backup = backup or StepBackup()
    saved_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    given = [grads[name] for name in names]
    # The session's gradients must be as they were after a refused step: copied too where
    # the optimizer may write them.
    kept = given if _may_write_grads(optimizer, tensors) else []
    old_state, old_params, old_grads = _state_snapshot(optimizer, tensors, kept, backup)
    versions = [local(g)._version for g in given]
    old_max = ranks.max(backup.max_abs(tensors, old_params))

    def roll_back() -> None:
        with torch.no_grad():
            torch._foreach_copy_([local(t).detach() for t in tensors], old_params)
            if old_grads:
                torch._foreach_copy_([local(g) for g in kept], old_grads)
        _restore_state(optimizer, tensors, old_state)
        for group, saved in zip(optimizer.param_groups, saved_groups, strict=True):
            group.update(saved)
        if grads_lost():
            raise InvalidRequest(
                f"Step refused, and {type(optimizer).__name__}.step() had changed the "
                "session's gradients as it ran: they cannot be applied again. The weights "
                "and the optimizer are as they were; call zero_grad() and redo the step's "
                "forward and backward"
            )

    def grads_lost() -> bool:
        # The optimizer changed the gradients with no copy to put back: it is backed up from
        # its next step on.
        lost = not old_grads and any(
            local(g)._version != v for g, v in zip(given, versions, strict=True)
        )
        if lost:
            optimizer._ra_writes_grads = True  # type: ignore[attr-defined]
        return lost

    for group, update in zip(optimizer.param_groups, updates, strict=True):
        group.update(update)
    for param, grad in zip(tensors, given, strict=True):
        param.grad = grad
    try:
        try:
            optimizer.step()
        except (
            RuntimeError,
            ValueError,
            TypeError,
            KeyError,
            IndexError,
            AssertionError,
            ArithmeticError,  # a hyperparameter the checks let pass overflows (ASGD's alpha)
        ) as exc:
            # Not the session's doing: a lost rank, a device out of memory or failing.
            if isinstance(exc, _NOT_THE_INPUTS):
                raise
            # A loaded state that does not fit (a momentum buffer of another shape), or an
            # option this device cannot run (capturable on a CPU): the session's to fix.
            raise InvalidRequest(
                f"Step refused: {type(optimizer).__name__}.step() raised "
                f"{type(exc).__name__}: {exc}; nothing was changed. Configure the optimizer "
                "again (or load an optimizer state that fits this trunk)"
            ) from exc
        problem, new_max = _problem(optimizer, names, tensors, old_max, options, ranks)
    except BaseException:
        roll_back()
        raise
    finally:
        for param in tensors:
            param.grad = None
    if problem:
        roll_back()
        raise InvalidRequest(f"Step refused: {problem}; nothing was changed")
    grads_lost()  # a step that stood: only learnt from
    backup.remember(tensors, new_max)
    # What the next step copies first, copied while the trunk waits for the next call.
    backup.prepare(_backed_up(tensors, _state_slots(optimizer, tensors)))


def _problem(
    optimizer: torch.optim.Optimizer,
    names: Sequence[str],
    tensors: Sequence[torch.Tensor],
    old_max: Sequence[float],
    options: ServerOptions,
    ranks: Ranks = ONE,
) -> tuple[str | None, list[float]]:
    """Why the step just taken must not stand (or None), and the parameters' new maxima."""
    state_names, state_tensors = [], []
    for name, param in zip(names, tensors, strict=True):
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                state_names.append(f"{key} of {name}")
                state_tensors.append(value)
    # Over every rank: a sharded trunk's ranks all reach this verdict and keep or roll back.
    maxima = ranks.max(_max_abs([*tensors, *state_tensors]))
    new_max, state_max = maxima[: len(tensors)], maxima[len(tensors) :]
    bad = [name for name, m in zip(names, new_max, strict=True) if not math.isfinite(m)]
    if bad:
        return f"it would make trunk parameters {', '.join(bad[:5])} non-finite", new_max
    bad = [name for name, m in zip(state_names, state_max, strict=True) if not math.isfinite(m)]
    if bad:
        return f"it would make the optimizer state {', '.join(bad[:5])} non-finite", new_max
    growth = options.max_weight_growth
    for name, before, after in zip(names, old_max, new_max, strict=True):
        if growth and after > growth * max(before, 1.0):
            return (
                f"it would grow trunk parameter {name} from max |w| = {before:.3g} to "
                f"{after:.3g}, more than max_weight_growth={growth:g} x max(1, {before:.3g}) "
                "(ServerOptions.max_weight_growth): lower the learning rate or the gradients"
            ), new_max
    return None, new_max


def floating_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The persistent floating buffers a training forward moves (BatchNorm's statistics)."""
    return [(n, b) for n, b in persistent_buffers(module) if b.is_floating_point()]


def buffer_snapshot(module: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of the persistent buffers (counters too), for :func:`restore_buffers`."""
    return [(b, b.clone()) for _, b in persistent_buffers(module)]


def restore_buffers(kept: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put the buffers of a :func:`buffer_snapshot` back as they were."""
    with torch.no_grad():
        for buffer, value in kept:
            buffer.copy_(value)


def check_finite_buffers(buffers: Sequence[tuple[str, torch.Tensor]], ranks: Ranks = ONE) -> None:
    """Refuse a training forward that left the trunk's floating buffers (BatchNorm's running
    statistics) with NaN or inf: finite inputs out of range (1e200) can do it, and every
    session's eval outputs would then be ruined. The caller puts the buffers back."""
    _refuse_non_finite(
        [name for name, _ in buffers],
        [buffer for _, buffer in buffers],
        "this training forward would make the trunk's {} non-finite (inputs out of the range "
        "the trunk can take): refused, the buffers are as they were",
        ranks=ranks,
    )


def check_finite_weights(state: dict[str, torch.Tensor], ranks: Ranks = ONE) -> None:
    """Refuse (TrunkError) to save a module state with NaN or inf in a floating tensor."""
    names = [n for n, t in state.items() if isinstance(t, torch.Tensor)]
    _refuse_non_finite(
        names,
        [state[n] for n in names],
        "the trunk's {} hold NaN or inf: no checkpoint is written from them (the last one is kept)",
        TrunkError,
        ranks,
    )
