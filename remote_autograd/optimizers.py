"""The sessions' optimizers on the server: create, gradient norms, step, state.

Each session has its own optimizer (its own momentum and Adam state) over the one shared set of
trunk parameters, and its own gradients; a Step applies that session's gradients once per step
number. A mixin of :class:`~remote_autograd.service.TrunkService`, whose state it uses.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import msgpack
import torch

from . import codec
from ._proto import remote_autograd_pb2 as pb
from .cache import Session
from .errors import InvalidRequest, StaleContext
from .state import TrunkState
from .validate import (
    check_finite_groups,
    check_finite_tree,
    clone_tree,
    decode_groups,
    describe,
    finite_flags,
    plain_group,
    plain_map,
)

__all__ = ["OptimizerMixin"]

log = logging.getLogger(__name__)

# The base class; LBFGS needs a closure, which only the client could evaluate.
_NOT_OPTIMIZERS = {"Optimizer", "LBFGS"}


class OptimizerMixin(TrunkState):
    """ConfigureOptimizer, GradNorm, Step, GetState and LoadState of TrunkService."""

    checkpoint: Callable[..., int]  # CheckpointMixin

    def _configure_optimizer(
        self, session: Session, request: pb.ConfigureOptimizerRequest
    ) -> pb.ConfigureOptimizerReply:
        """Create the session's optimizer: a class of torch.optim, by name, plain kwargs."""
        cls = getattr(torch.optim, request.name, None)
        if (
            request.name.startswith("_")
            or request.name in _NOT_OPTIMIZERS
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
            raise InvalidRequest(
                f"optimizer {request.name!r} is not allowed; use one of {', '.join(allowed)}"
            )
        kwargs = plain_map(request.options, "optimizer options")
        if not self.params:
            raise InvalidRequest("the trunk has no trainable parameters to optimize")
        try:
            optimizer = cls([p for _, p in self.params], **kwargs)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"{request.name}(**{kwargs!r}): {exc}") from exc
        with session.lock:
            session.optimizer = optimizer
            session.optimizer_name = request.name
            session.optimizer_options = kwargs
            session.last_step = 0
        group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        return pb.ConfigureOptimizerReply(param_group=msgpack.packb(plain_group(group)))

    def _grad_norm(self, session: Session, request: pb.GradNormRequest) -> pb.GradNormReply:
        """Per-parameter norms of the session's gradients, in the trunk's parameter order."""
        norm_type = request.norm_type or 2.0
        with session.lock:
            session.apply_pending(request.zero_grad, request.grad_scale)
            grads = [session.grads[n] for n, _ in self.params if n in session.grads]
            if not grads:
                return pb.GradNormReply(norms=[], dtype="float32")
            norms = torch._foreach_norm(grads, norm_type)
            return pb.GradNormReply(
                norms=[float(n) for n in norms], dtype=codec._DTYPE_NAMES[norms[0].dtype]
            )

    def _step(self, session: Session, request: pb.StepRequest) -> pb.StepReply:
        """Apply the session's optimizer once per step number (a repeat is a replay)."""
        with session.lock:
            optimizer = session.optimizer
            if optimizer is None:
                raise StaleContext("Step before ConfigureOptimizer: create a RemoteOptimizer first")
            if request.step == session.last_step and request.step > 0:
                return pb.StepReply(
                    step=request.step, weights_version=self.weights_version, replayed=True
                )
            if request.step != session.last_step + 1:
                raise StaleContext(
                    f"Step #{request.step} does not follow this session's last step "
                    f"#{session.last_step} (a server restarted from an older checkpoint "
                    f"resumes at step #{session.last_step}: continue training from there)"
                )
            if request.server_id and request.server_id != self.server_id:
                raise StaleContext(
                    f"Step #{request.step}: its gradients were accumulated by server process "
                    f"{request.server_id}, which is gone (this is {self.server_id}: a restart); "
                    "they are lost, so run this step's forward and backward again"
                )
            groups = decode_groups(request.param_groups, optimizer)
            if request.grad_scale and not math.isfinite(request.grad_scale):
                raise InvalidRequest(f"grad_scale must be finite, got {request.grad_scale}")
            waiting = self.turns.others_holding(session.key)
            if waiting:
                log.debug(
                    "Step #%d (session %s) waits for %d forwards of other sessions",
                    request.step,
                    session.key,
                    waiting,
                )
            self.turns.begin_step(session.key)
            stepped = False
            try:
                version = self._apply_step(session, optimizer, request, groups)
                stepped = True
            finally:
                self.turns.end_step(stepped=stepped)
            log.debug(
                "Step #%d (session %s) applied: weights v%d", request.step, session.key, version
            )
            return pb.StepReply(step=request.step, weights_version=version)

    def _apply_step(
        self,
        session: Session,
        optimizer: torch.optim.Optimizer,
        request: pb.StepRequest,
        groups: list[dict[str, Any]],
    ) -> int:
        """Apply the session's gradients (the caller holds the session lock and its turn)."""
        with self._trunk_lock:
            session.apply_pending(request.zero_grad, request.grad_scale)
            for group, update in zip(optimizer.param_groups, groups, strict=True):
                group.update(update)
            for name, param in self.params:
                param.grad = session.grads.get(name)
            try:
                optimizer.step()
            finally:
                for _, param in self.params:
                    param.grad = None
            self.weights_version += 1
            session.last_step = request.step
            every = self.options.checkpoint_every
            if every and self.options.checkpoint_path and self.weights_version % every == 0:
                self.checkpoint(on_error="log")
            return self.weights_version

    def _get_state(self, session: Session, request: pb.GetStateRequest) -> list:
        """A frame of the trainable parameters and/or the session's optimizer state."""
        state: dict[str, Any] = {"step": session.last_step, "parameters": None, "optimizer": None}
        with session.lock, self._trunk_lock:
            if request.parameters:
                state["parameters"] = {n: p.detach().clone() for n, p in self.params}
            if request.optimizer and session.optimizer is not None:
                state["optimizer"] = clone_tree(session.optimizer.state_dict())
        return codec.Encoder(compression=self.options.compression).encode_buffers(state)

    def _load_state(self, session: Session, state: Any) -> pb.LoadStateReply:
        """Load trainable parameters and/or the session's optimizer state."""
        if not isinstance(state, dict):
            raise InvalidRequest("LoadState expects a map with 'parameters', 'optimizer', 'step'")
        parameters = state.get("parameters")
        optimizer_state = state.get("optimizer")
        step = state.get("step")
        if parameters is not None:
            self._check_parameters(parameters)
        with session.lock:
            if optimizer_state is not None:
                if session.optimizer is None:
                    raise StaleContext("LoadState with optimizer state before ConfigureOptimizer")
                check_finite_groups(optimizer_state)
                check_finite_tree(optimizer_state.get("state"), "optimizer state")
                try:
                    with self._trunk_lock:
                        session.optimizer.load_state_dict(optimizer_state)
                except (KeyError, TypeError, ValueError) as exc:
                    raise InvalidRequest(f"optimizer state does not fit: {exc}") from exc
            if parameters is not None:
                with self._trunk_lock, torch.no_grad():
                    named = dict(self.params)
                    for name, value in parameters.items():
                        named[name].copy_(value)
                    self.weights_version += 1
            if type(step) is int and step >= 0:
                session.last_step = step
        return pb.LoadStateReply(
            parameters_loaded=len(parameters or {}), optimizer_loaded=optimizer_state is not None
        )

    def _check_parameters(self, parameters: Any) -> None:
        named = dict(self.params)
        if not isinstance(parameters, dict):
            raise InvalidRequest("'parameters' must map names to tensors")
        for name, value in parameters.items():
            if name not in named:
                raise InvalidRequest(f"no trainable parameter named {name!r} in the trunk")
            if not isinstance(value, torch.Tensor) or value.shape != named[name].shape:
                raise InvalidRequest(
                    f"parameter {name}: expected shape {list(named[name].shape)}, "
                    f"got {describe(value)}"
                )
            if not finite_flags([value])[0]:
                raise InvalidRequest(f"parameter {name} holds NaN or inf; refused")
