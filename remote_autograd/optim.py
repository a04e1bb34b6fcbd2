"""RemoteOptimizer (a torch optimizer whose state and step live on the server) and
clip_grad_norm_ over local and remote parameters together."""

from __future__ import annotations

import contextlib
import fnmatch
import math
import numbers
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from . import codec
from .errors import SESSION_GONE, NotConfigured, StaleContext, TransportError
from .guard import IMMUTABLE_HYPERPARAMETERS
from .module import RemoteModule
from .validate import is_plain

__all__ = ["RemoteOptimizer", "clip_grad_norm_"]

_CLIENT_ONLY_KEYS = {"params", "initial_lr", "trunk_params"}
_KEPT_AS_CONFIGURED = {"params", *IMMUTABLE_HYPERPARAMETERS}


class RemoteOptimizer(torch.optim.Optimizer):
    """Runs ``optimizer_class(trunk_parameters, **kwargs)`` on the server for this session.

    It quacks like a torch optimizer: ``step()`` (the Step RPC, applied exactly once per step
    number), ``zero_grad()`` (free: it rides on the next call), ``param_groups`` whose
    hyperparameters a stock ``torch.optim.lr_scheduler`` may change (sent with every step), and
    ``state_dict()``/``load_state_dict()``. ``optimizer_class`` is a class of ``torch.optim``
    (or its name); keyword arguments must be plain numbers, bools or None, or tuples of these.

    ``param_groups`` gives groups by trunk parameter name, like torch's per-group options:
    ``[{"params": "blocks.0.*", "lr": 1e-4}, {"params": ["head.weight"], "weight_decay": 0}]``
    (``fnmatch`` patterns or lists of them). The groups come in that order, and the trainable
    parameters that no group names form one last group with the keyword arguments alone.
    Each local group lists its parameter names under ``"trunk_params"``.
    """

    def __init__(
        self,
        module: RemoteModule,
        optimizer_class: type[torch.optim.Optimizer] | str,
        *,
        param_groups: Sequence[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(module, RemoteModule):
            raise TypeError(
                f"RemoteOptimizer takes the RemoteModule whose trunk it trains, got "
                f"{type(module).__name__}; optimize local modules with a torch optimizer"
            )
        name = optimizer_class if isinstance(optimizer_class, str) else optimizer_class.__name__
        if (
            not isinstance(optimizer_class, str)
            and getattr(torch.optim, name, None) is not optimizer_class
        ):
            raise ValueError(
                f"{optimizer_class!r} is not a class of torch.optim: the server only builds "
                "optimizers from torch.optim by name"
            )
        for key, value in kwargs.items():
            if not is_plain(value):
                raise TypeError(
                    f"{name}({key}={value!r}): remote optimizer options must be plain numbers, "
                    "bools or None, or tuples of these"
                )
        self.module = module
        self.client = module.client
        self.optimizer_name = name
        groups = _named_groups(param_groups, list(module.client.info().trainable_parameters))
        resolved = self.client.configure_optimizer(name, kwargs, groups)
        # The server keeps one optimizer per session, the one made last: this one, from here.
        replaced = self.client.current_optimizer()
        self.client.current_optimizer = weakref.ref(self)
        local = []
        for index, group in enumerate(resolved):
            hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in group.items()}
            # The module's flag is the one "parameter": GradScaler.unscale_ checks it for inf
            # and multiplies it by 1/scale, which step() then applies to the trunk's gradients.
            hyper["trunk_params"] = list(group["params"])
            hyper["params"] = [module._dummy] if index == 0 else []
            local.append(hyper)
        defaults = {k: v for k, v in local[-1].items() if k not in ("params", "trunk_params")}
        # The entries the server's optimizer keeps: a loaded state sends them whatever they
        # hold, and beyond them only numbers (LR schedulers' max_lr...), not a user's notes.
        self._server_keys = frozenset(key for group in resolved for key in group)
        super().__init__(local, defaults)
        if replaced is not None:
            # Its flag parameter goes: GradScaler must not unscale the trunk's gradients
            # through an optimizer that can no longer step them.
            for group in replaced.param_groups:
                group["params"] = []
        module.reset_flag()
        self._step_count = 0
        self._configured = True  # add_param_group() refuses from here
        _warn_if_data_parallel(module.client.address)
        # Inside stepping(), step() sends the Step from a thread and leaves its reply here.
        self._stepping = False
        self._in_block = False  # inside stepping(), with a step sent
        self._reply: Future[Any] | None = None
        # A step that got no answer (deadline, server unavailable, interrupted) may have been
        # applied: (its number, the error, the client's gradient events then), settled by
        # asking the server before the next step. A refused step is settled the same way.
        self._unsettled: tuple[int, BaseException | None, int] | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_configured", False):  # torch's __init__ adds the groups this way
            raise TypeError(
                "RemoteOptimizer.add_param_group(): the server's optimizer was configured "
                "with its parameter groups at construction (by trunk parameter name); create "
                "a new RemoteOptimizer with param_groups=[...] instead"
            )
        super().add_param_group(param_group)

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """Apply the session's accumulated trunk gradients on the server."""
        if closure is not None:
            raise ValueError(
                "RemoteOptimizer.step() takes no closure: the loss lives on the client, so "
                "optimizers that re-evaluate it (LBFGS) cannot run on the server"
            )
        self._check_current("step")
        if self.client._closed:  # nothing goes out: not a step that may have been applied
            self.client._connect()  # raises the closed client's TransportError
        if not math.isfinite(_take_unscale(self.module)):
            raise FloatingPointError(
                "the trunk's gradients of this step are not finite (NaN or inf; the server kept "
                "none of them): nothing was stepped. Call zero_grad() and go on, or let "
                "torch.amp.GradScaler skip such steps (scaler.step(optimizer))"
            )
        if self._unsettled is not None and self._settled():
            return  # this call redid a step the server had applied: not applied twice
        self._step_count += 1
        try:
            if self._stepping:  # inside stepping(): answered when its block ends
                hyper = self._hyperparameters()
                self._reply = self.client.step_in_background(self._step_count, hyper)
            else:
                self.client.step(self._step_count, self._hyperparameters())
        except Warning:  # raised (-W error) once the step was applied: it counts
            raise
        except BaseException as exc:
            if isinstance(exc, NotConfigured) and self.client.forked:
                exc.add_note(
                    "this process is a fork of the one that made this RemoteOptimizer: the "
                    "optimizer belongs to the parent's session, and this process has a "
                    "session of its own; create a RemoteOptimizer here to train from it"
                )
            self._failed(exc)
            raise

    def _failed(self, exc: BaseException) -> None:
        """Step #n failed. Refused by the server: not applied, and its number is n again;
        after a refusal for its number (a server restarted from an older checkpoint), the
        next step asks. No answer: maybe applied; the next step asks."""
        number = self._step_count
        unanswered = isinstance(exc, TransportError) or not isinstance(exc, Exception)
        if not unanswered and not isinstance(exc, StaleContext):
            self._step_count -= 1  # refused, or failed here before it went out
            return
        self._unsettled = (number, exc, self.client.grad_events)
        if unanswered:
            exc.add_note(
                f"step #{number} got no answer: the server may have applied it. The next "
                "step() asks the server: it is not applied twice, and a step that was "
                "applied after all is warned of (docs/habits.md, Resuming training)"
            )

    def _settled(self) -> bool:
        """Ask the server for this session's last step after a step that failed; returns
        whether this call, a redo of that step with nothing changed since, is done."""
        number, error, events = self._unsettled or (0, None, 0)
        last = int(self.client.get_state(parameters=False, optimizer=False)["step"])
        self._unsettled = None
        self._step_count = last
        if last < number or isinstance(error, StaleContext):
            return False  # not applied: the next number is last + 1
        self.client.settled_step(last)
        warnings.warn(
            f"step #{number}, which raised {type(error).__name__}, had been applied by the "
            "server after all; "
            + (
                "this step() (nothing changed since) is not applied again"
                if self.client.grad_events == events
                else f"this step() is step #{last + 1}"
            ),
            RuntimeWarning,
            stacklevel=4,  # the caller of step(), through torch's step hooks
        )
        if self.client.grad_events == events:
            self.client.drop_grad_ops()  # the zero_grad/clip scale put back went with it
            return True
        return False

    @contextlib.contextmanager
    def stepping(self, scaler: torch.amp.GradScaler | None = None) -> Iterator[None]:
        """``with trunk_opt.stepping(): opt.step()``: the trunk's step runs on the server while
        the block runs here, so the two optimizers step at the same time, not one after the
        other.

        Entering calls ``step()`` (or ``scaler.step(trunk_opt)``, which may skip it), so step
        hooks and LR schedulers see a step as usual, and the step takes the hyperparameters,
        zero_grad() and clipping done so far. What the block changes (a scheduler's LR, a
        zero_grad()) is the next step's, as after a ``step()`` that had returned. A call to the
        trunk in the block waits for the step first. The step's error is raised when the block
        ends, after the block ran (calls in the block ran on the unstepped weights): the
        block's own optimizer has then stepped and the trunk's has not, so a loop that redoes a
        failed step (``StaleContext``) steps one after the other instead (docs/habits.md, "Both
        optimizers at once").
        """
        self._stepping, self._reply = True, None
        try:
            if scaler is None:
                self.step()
            else:
                scaler.step(self)
        finally:
            self._stepping = False
        reply, self._reply = self._reply, None  # None: the scaler skipped the step
        number = self._step_count
        self._in_block = reply is not None  # its step's outcome is settled when it ends
        try:
            yield
        except BaseException as exc:
            self._in_block = False
            error = self._answer(reply)
            if error is not None:
                exc.add_note(f"The trunk's step #{number} failed too: {error}")
            raise
        self._in_block = False
        error = self._answer(reply)
        if error is not None:
            raise error

    def _answer(self, reply: Future[Any] | None) -> BaseException | None:
        """Wait for the answer to a step sent by stepping(); a failed one is not counted."""
        error = None if reply is None else reply.exception()
        if error is not None:
            self._failed(error)
        return error

    def __getstate__(self) -> Any:
        # Optimizer's own would copy the hyperparameters and lose the session: a copy that
        # seems to work until its step().
        raise TypeError(
            "a RemoteOptimizer cannot be copied or pickled: its state lives on the server, in "
            "this client's session. Save optimizer.state_dict() and load it into a new "
            "RemoteOptimizer (see docs/habits.md, Resuming training)"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the session's trunk gradients (sent with the next Backward, GradNorm or Step)."""
        self.module.zero_grad(set_to_none)

    def _check_current(self, what: str) -> None:
        if self.client.current_optimizer() is not self:
            raise RuntimeError(
                f"{what}() of a RemoteOptimizer that a newer RemoteOptimizer of the same "
                "RemoteModule replaced: the server keeps one optimizer per session, the one "
                "made last. Use that one; for other options on some parameters, give one "
                "RemoteOptimizer param_groups"
            )

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The server-side optimizer state, with this side's current hyperparameters."""
        self._check_current("state_dict")
        state = self.client.get_state(parameters=False, optimizer=True)
        optimizer_state = state["optimizer"]
        if optimizer_state is None:
            raise NotConfigured(
                f"state_dict() of a RemoteOptimizer whose server session on "
                f"{self.client.address} holds no optimizer: {SESSION_GONE}"
            )
        for remote, local in zip(optimizer_state["param_groups"], self.param_groups, strict=True):
            remote.update({k: v for k, v in local.items() if k != "params"})
        # The server's last step, not this side's count: after a step that failed, they may
        # differ until the next step() asks.
        remote_step = int(state["step"])
        if self._unsettled is not None and isinstance(self._unsettled[1], StaleContext):
            # Refused for what the server holds (gradients a restart lost, another step
            # number, another optimizer): its state is not this optimizer's step yet.
            raise StaleContext(
                f"state_dict(): the last step() was refused ({self._unsettled[1]}); redo that "
                "step, then save"
            )
        if self._unsettled is None and not self._in_block and remote_step != self._step_count:
            # A server restarted from an older checkpoint: its state is of an earlier step
            # than the model beside it, and a checkpoint of both would not resume as trained.
            raise StaleContext(
                f"state_dict(): the server on {self.client.address} holds this session at step "
                f"#{remote_step}, this optimizer has stepped #{self._step_count}: the server "
                "resumed from an older checkpoint and lost the steps after it. Go on training "
                f"from step #{remote_step} (the next step() says so too) and save after it"
            )
        optimizer_state["remote_step"] = remote_step
        return optimizer_state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self._check_current("load_state_dict")
        state = dict(state_dict)
        step = int(state.pop("remote_step", 0))
        server_state = {
            "state": state["state"],
            "param_groups": [
                {
                    key: _number(value)
                    for key, value in group.items()
                    if key in self._server_keys or _sent(_number(value))
                    if key not in ("initial_lr", "trunk_params")
                }
                for group in state["param_groups"]
            ],
        }
        self.client.load_state({"parameters": None, "optimizer": server_state, "step": step})
        for local, loaded in zip(self.param_groups, state["param_groups"], strict=True):
            # Not the flags the server keeps as configured (fused, foreach...): sent with every
            # Step, a loaded one that differs would have every Step refused.
            local.update({k: v for k, v in loaded.items() if k not in _KEPT_AS_CONFIGURED})
        self._step_count, self._unsettled = step, None
        self.client.settled_step(step)  # and dropout seeds (ClientOptions.seed) from there

    def _hyperparameters(self) -> list[dict[str, Any]]:
        groups = []
        for group in self.param_groups:
            plain = {}
            for key, value in group.items():
                if key in _CLIENT_ONLY_KEYS:
                    continue
                value = _number(value)
                if _sent(value):  # non-finite numbers too: the server refuses them by name
                    plain[key] = value
                elif key in self._server_keys and value is not None and not isinstance(value, str):
                    # One the server's optimizer steps with, which no number can be made of
                    # (an array, a Decimal): left out, the server would step with the old.
                    raise TypeError(
                        f"param group entry {key}={value!r} of a RemoteOptimizer: the server's "
                        "optimizer steps with plain numbers (a float, a one-element tensor, a "
                        "numpy scalar), bools, and tuples of them"
                    )
            groups.append(plain)
        return groups

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={v}" for k, v in self._hyperparameters()[0].items())
        return f"RemoteOptimizer({self.optimizer_name}, {self.module.address!r}, {hyper})"


def _model_parts(model: torch.nn.Module) -> list[torch.Tensor | RemoteModule]:
    """The model's parameters in ``model.parameters()`` order (modules pre-order, each one's own
    parameters first), with each RemoteModule in its trunk's place."""
    parts: list[torch.Tensor | RemoteModule] = []
    seen: set[int] = set()  # ids of modules and parameters already taken

    def walk(module: torch.nn.Module) -> None:
        if id(module) in seen:  # a shared module counts once, as in parameters()
            return
        seen.add(id(module))
        if isinstance(module, RemoteModule):
            parts.append(module)
            return
        for param in module.parameters(recurse=False):
            if id(param) not in seen:  # shared parameters count once, as in parameters()
                seen.add(id(param))
                parts.append(param)
        for child in module.children():
            walk(child)

    walk(model)
    return parts


def _named_groups(
    groups: Sequence[dict[str, Any]] | None, names: list[str]
) -> list[dict[str, Any]] | None:
    """Param groups with their name patterns expanded to the trunk's parameter names."""
    if groups is None:
        return None
    named = []
    for index, group in enumerate(groups):
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"param group {index} must be a dict with 'params' (names or patterns)")
        patterns = group["params"]
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        members: list[str] = []
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise TypeError(
                    f"param group {index}: 'params' are trunk parameter names or patterns "
                    f"(str), got {type(pattern).__name__}: the trunk's tensors live on the server"
                )
            matched = [n for n in names if fnmatch.fnmatchcase(n, pattern) and n not in members]
            if not matched:
                raise ValueError(
                    f"param group {index}: {pattern!r} matches no trainable parameter of the "
                    f"trunk (it has {', '.join(names[:8])}{' ...' if len(names) > 8 else ''})"
                )
            members.extend(matched)
        for key, value in group.items():
            if key != "params" and not is_plain(value):
                raise TypeError(
                    f"param group {index}: {key}={value!r}: remote optimizer options must be "
                    "plain numbers, bools or None, or tuples of these"
                )
        named.append({**group, "params": sorted(members, key=names.index)})
    return named


def _take_unscale(module: RemoteModule) -> float:
    """Apply what ``GradScaler.unscale_`` did to the module's flag since the last call to the
    trunk's gradients (it rides on the next call); returns the flag: 1.0 when nothing was
    pending, NaN or inf when a backward gave non-finite trunk gradients."""
    flag = module._dummy.grad
    if flag is None:
        return 1.0
    value = float(flag.sum())
    if math.isfinite(value) and value != 1.0:
        module.client.scale_grads_later(value)
        flag.fill_(1.0)
    return value


def _number(value: Any) -> Any:
    """A hyperparameter as the wire carries it: a one-element tensor (an LR held as a tensor)
    or a numpy scalar (an LR table of np.float32, an np.bool_) as the Python number it holds,
    lists and tuples item by item; anything else as it is. Such values were once left out of
    a Step without a word: the server kept stepping with the old learning rate."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (list, tuple)):
        items = [_number(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        return value.item()  # a numpy scalar (no import of numpy here)
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value) if isinstance(value, numbers.Real) else value


def _sent(value: Any) -> bool:
    """Whether a param group entry travels with a Step: numbers, bools and tuples of them (and
    of None: Adafactor's eps). A user's own entries of other kinds (a group's name, notes) stay
    on this side."""
    return isinstance(value, (bool, int, float)) or (
        isinstance(value, (list, tuple))
        and all(isinstance(v, (bool, int, float)) or v is None for v in value)
    )


def _warn_if_data_parallel(address: str) -> None:
    """Data-parallel training (DistributedDataParallel over the client's parts) would step the
    shared trunk once per process, each with its own process's gradients: say so."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world > 1:
        warnings.warn(
            f"torch.distributed runs {world} processes here, and each one's RemoteOptimizer "
            f"steps the trunk at {address} with that process's gradients alone (a session "
            f"each): the trunk takes {world} unaveraged steps per step of a data-parallel "
            "loop, unlike DistributedDataParallel's one averaged step. Train the trunk from "
            "one process (docs/habits.md, 'Data parallelism on the client')",
            stacklevel=3,
        )


@torch.no_grad()
def clip_grad_norm_(
    parameters: torch.nn.Module | Iterable[torch.Tensor | RemoteModule],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over local parameters and remote trunks together.

    Pass the whole model (``clip_grad_norm_(model, 1.0)``): its parameters are taken in the
    order of ``model.parameters()``, each RemoteModule standing for its trunk's parameters where
    the unsplit model would have them. ``torch.nn.utils.clip_grad_norm_(model.parameters())``
    cannot do this: a RemoteModule holds no parameters here, so torch's function would clip
    the local parts by their norm alone. Or list the parts in the order of the unsplit model,
    e.g.
    ``[*bottom.parameters(), trunk, *top.parameters()]``: each RemoteModule stands for its
    trunk's parameters, and a tensor listed twice (a weight the bottom and the top tie) counts
    once, as in the unsplit model's ``parameters()``. The norms are stacked in that order (by
    dtype first where there are several), as torch does for the unsplit
    model, and the remote gradients are scaled by the same coefficient on the server (it rides
    on the next Backward, GradNorm or Step). Returns the total norm. As torch's, it takes one
    tensor too; ``foreach`` is accepted for torch's signature (the local gradients are always
    scaled with the foreach kernels).
    """
    norm_type = float(norm_type)
    if isinstance(parameters, torch.nn.Module):
        parts: list[Any] = _model_parts(parameters)
    elif isinstance(parameters, torch.Tensor):
        parts = [parameters]  # list() of a tensor would be its rows, none with a .grad
    else:
        # A tensor listed twice counts once, as in model.parameters(): the bottom's and the
        # top's parameters hold a tied weight (embeddings and LM head) both.
        unique: dict[int, Any] = {}
        parts = [unique.setdefault(id(p), p) for p in parameters if id(p) not in unique]
    norms: list[torch.Tensor] = []
    local: list[torch.Tensor] = []
    remotes: list[RemoteModule] = []
    for part in parts:
        if isinstance(part, RemoteModule):
            if not math.isfinite(_take_unscale(part)):  # gradients the server did not keep
                # An overflow counts as inf, as inf gradients do in torch: the coefficient is
                # 0 and the local gradients are zeroed, not made NaN, for an optimizer whose
                # GradScaler saw no overflow of its own to step (its unscale_ came first).
                norms.append(torch.tensor(math.inf))
            remote_norms, dtypes = part.client.grad_norms(norm_type)
            norms.extend(
                torch.tensor(n, dtype=codec.DTYPES[d])
                for n, d in zip(remote_norms, dtypes, strict=True)
            )
            remotes.append(part)
        elif part.grad is not None:
            norms.extend(torch._foreach_norm([part.grad], norm_type))
            local.append(part.grad)
    if not norms:
        return torch.tensor(0.0)
    first_device = local[0].device if local else torch.device("cpu")
    total_norm = torch.linalg.vector_norm(
        torch.stack([norms[i].to(first_device) for i in _torch_order(norms, first_device)]),
        norm_type,
    )
    if error_if_nonfinite and not bool(torch.isfinite(total_norm)):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is non-finite, so it cannot "
            "be clipped; pass error_if_nonfinite=False to scale by it anyway"
        )
    clip_coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    if local:
        by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for grad in local:
            by_device.setdefault((grad.device, grad.dtype), []).append(grad)
        for (device, _), grads in by_device.items():
            torch._foreach_mul_(grads, clip_coef.to(device))
    coefficient = float(clip_coef)
    for remote in remotes:
        if math.isfinite(coefficient):
            remote.client.scale_grads_later(coefficient)
        else:  # NaN gradients here: the trunk's would be NaN too; its step() refuses them
            _flag_nonfinite(remote)
    return total_norm


def _torch_order(norms: list[torch.Tensor], device: torch.device) -> list[int]:
    """The order in which torch's clip_grad_norm_ would stack these norms for the unsplit
    model on one device: grouped by dtype (by its own grouping function, whose order is that
    of a hash map), in the parameters' order within a group. Of one dtype: as they are."""
    if len({n.dtype for n in norms}) == 1:
        return list(range(len(norms)))
    proxies = [torch.empty(0, dtype=n.dtype, device=device) for n in norms]
    grouped = _group_tensors_by_device_and_dtype([proxies], with_indices=True)  # type: ignore[list-item]
    return [index for _, (_, indices) in grouped.items() for index in indices]


def _flag_nonfinite(module: RemoteModule) -> None:
    """Mark the trunk's gradients of this step non-finite, as a backward the server kept no
    gradients of does (function.py): GradScaler skips its step, step() alone raises."""
    flag = module._dummy.grad if module._dummy.grad is not None else module.reset_flag()
    flag.fill_(math.inf)
