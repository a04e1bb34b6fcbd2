"""The private autograd Function behind RemoteModule: Compute in forward, Backward in backward."""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.graph import get_gradient_edge

from . import memory
from .client import TrunkClient
from .errors import ContextNotFound
from .tree import flatten, unflatten

__all__: list[str] = []


class RemoteCall:
    """One forward through the trunk and everything its backward needs."""

    def __init__(
        self,
        client: TrunkClient,
        template: Any,
        *,
        keep_context: bool,
        training: bool,
        device: torch.device,
        autocast: str = "",
        frozen: Callable[[], bool] = lambda: False,
    ) -> None:
        self.client = client
        self.template = template
        self.keep_context = keep_context
        self.training = training
        self.device = device
        self.autocast = autocast  # the caller's torch.autocast dtype ("" = off), for the server
        # Whether the trunk is frozen (requires_grad_(False)), asked when the backward runs:
        # a local parameter frozen between forward and backward gets no gradient either.
        self.frozen = frozen
        self._pid = os.getpid()  # the process whose session holds the context
        self.request_id = secrets.token_hex(16)  # 32 hex digits, like uuid4().hex but cheaper
        self.output_template: Any = None
        self.backwards = 0
        self._inputs: tuple[torch.Tensor, ...] = ()  # detached: resent if the server loses them
        self._versions: list[int | None] = []  # their version counters when the forward ran
        self._needs: list[bool] = []
        self.seed = 0  # the server's RNG seed for this forward
        self.given_seeds: list[int] | None = None  # a recompute's: its first run's seed
        self.weights_version = 0  # the trunk's weights the forward ran on
        self.weights_id = ""  # and their id (a recompute must find these very weights)
        self.nonfinite = False  # the last backward's trunk gradients were NaN/inf (not kept)
        self.without_grad: list[bool] = []  # per output: needs no gradient (server's; [] unknown)
        self._released = False  # release() ran: a context re-created after it is released too
        # Held while a lost context is re-created and its Backward retried: the slices of one
        # micro_batches call share a lock, so under a tight context limit their re-created
        # contexts do not evict each other's (chunks.py).
        self.recovering: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()

    def seeds(self) -> list[int]:
        return [self.seed]

    def forward(self, tensors: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        if self.given_seeds:
            self.seed = self.given_seeds[0]
        args, kwargs = unflatten(self.template, tensors)
        # A recompute's inputs must be these (a kept forward's: inference tensors, which no
        # kept forward has, track no version).
        self._versions = [_version(t) for t in tensors] if self.keep_context else []
        needs = [t.requires_grad and t.is_floating_point() for t in tensors]
        self._needs = needs if self.keep_context else [False] * len(tensors)
        try:
            value, header = self.client.compute(
                self.request_id,
                list(args),
                kwargs,
                needs_input_grad=self._needs,
                keep_context=self.keep_context,
                training=self.training,
                autocast=self.autocast,
                rng_seed=self.seed or None,  # set before forward by a ChunkedCall (chunks.py)
            )
        except BaseException:
            # A reply this side refused, a call interrupted (Ctrl-C) or failed for good: the
            # server may have kept a forward (and its Step lease) that no Backward will use.
            if self.keep_context:
                self.release()
            raise
        self.seed = header.rng_seed
        self.weights_version = header.weights_version
        self.weights_id = header.weights_id
        self.without_grad = list(header.outputs_without_grad)
        self.output_template, outputs = flatten(value)
        return outputs  # on the CPU: remote_apply moves them (see there)

    def release(self) -> None:
        """The client's graph no longer needs this forward's context on the server (released
        only by the process that made it, not by a fork holding a copy of the graph)."""
        self.client.schedule_release(self.request_id, self._pid)
        self._released = True
        # Released after its backward (not at its forward, as under a non-reentrant
        # checkpoint, whose recompute's backward still needs them): nothing will be resent.
        # A loss kept for logging (``losses.append(loss)``) keeps this call reachable, and
        # must not keep its inputs step after step.
        if self.backwards:
            self._inputs, self._versions = (), []

    def _recompute(self) -> None:
        # The detached inputs share their tensors' version counters: one changed in place
        # since the forward would be recomputed as it is now, giving the gradients of another
        # forward. Locally the layer that saved it refuses the backward; so does this.
        if [_version(t) for t in self._inputs] != self._versions:
            raise RuntimeError(
                "an input of the RemoteModule's forward was modified by an inplace operation "
                "after the forward ran, and the server no longer holds the forward (expired, "
                "evicted, or restarted): it cannot be recomputed from those inputs. Clone the "
                "input before changing it, or keep the context (ServerOptions.context_ttl)"
            )
        args, kwargs = unflatten(self.template, self._inputs)
        self.client.recompute(
            self.request_id,
            list(args),
            kwargs,
            needs_input_grad=self._needs,
            training=self.training,
            seed=self.seed,
            weights_version=self.weights_version,
            weights_id=self.weights_id,
            backward_seq=self.backwards - 1,
            autocast=self.autocast,
        )

    def backward(
        self,
        grads: tuple[torch.Tensor | None, ...],
        needs_input_grad: tuple[bool, ...],
        parameters: bool = True,
    ) -> list[torch.Tensor | None]:
        """Gradients of the inputs; the trunk's parameters' gradients accumulate on the server
        unless the trunk is frozen or not ``parameters`` (this backward pass leaves them out)."""
        self.backwards += 1  # one number per backward pass, reused by retries of that pass
        frozen = self.frozen() or not parameters
        needs = [
            bool(n) and t.is_floating_point()
            for n, t in zip(needs_input_grad, self._inputs, strict=True)
        ]
        args = (self.request_id, self.backwards, list(grads), needs)
        # Quantized input gradients are dequantized where they are wanted (one GPU, if so).
        device = _one_device(self._inputs, needs)
        try:
            value, reply = self.client.backward(*args, freeze_parameters=frozen, device=device)
        except ContextNotFound:
            # Expired, evicted, or the server restarted: send the inputs again and let the
            # server recompute the forward (refused if the weights moved since).
            if not self.client.options.recover_contexts:
                raise
            with self.recovering:
                self._recompute()
                try:
                    value, reply = self.client.backward(
                        *args, freeze_parameters=frozen, device=device
                    )
                finally:
                    if self._released:
                        # Released at the forward (a non-reentrant checkpoint, or saved-tensor
                        # hooks that copy, drop the marker there): nothing else would release
                        # the re-created context, and each step would leave one behind.
                        self.client.schedule_release(self.request_id, self._pid)
        self.nonfinite = reply.nonfinite
        out: list[torch.Tensor | None] = []
        pairs = zip(value["grads"], self._inputs, needs_input_grad, strict=True)
        for grad, tensor, needed in pairs:
            if grad is None or not needed:
                out.append(None)
            else:
                out.append(memory.to_device(grad, tensor.device, tensor.dtype))
        return out


def _version(tensor: torch.Tensor) -> int | None:
    return None if tensor.is_inference() else tensor._version


def _one_device(tensors: tuple[torch.Tensor, ...], needs: list[bool]) -> torch.device | None:
    """The device of the tensors that need a gradient, if they share one (else None)."""
    devices = {t.device for t, need in zip(tensors, needs, strict=True) if need}
    return devices.pop() if len(devices) == 1 else None


class _RemoteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, call: Any, dummy: torch.Tensor, *tensors: torch.Tensor):
        # `dummy` requires grad whenever grad mode is on, so autograd records this node and calls
        # backward even when no input needs a gradient (a frozen bottom, or raw token ids in):
        # the trunk's own parameters still need their gradients.
        call._inputs = tuple(t.detach() for t in tensors)
        outputs = [_not_a_view(output) for output in call.forward(tensors)]
        ctx.call = call
        ctx.dummy = get_gradient_edge(dummy).node if dummy.requires_grad else None
        ctx.set_materialize_grads(False)  # unused outputs send None, not a tensor of zeros
        # As locally: integer outputs, and those the trunk gave without a graph (a detached
        # tensor, a buffer), need no gradient; a backward through them alone is refused.
        without = call.without_grad if len(call.without_grad) == len(outputs) else []
        ctx.mark_non_differentiable(
            *[
                o
                for i, o in enumerate(outputs)
                if not o.is_floating_point() or (without and without[i])
            ]
        )
        if call.keep_context:
            # A marker saved for backward: autograd frees it when the graph is freed, or right
            # after a backward without retain_graph. Either way the server may drop the context.
            marker = torch.empty(0)
            weakref.finalize(marker, call.release)
            ctx.save_for_backward(marker)
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None):
        # Grad mode is on in a backward exactly under create_graph=True. The server's gradients
        # have no graph here: a gradient penalty or a Hessian through the trunk would lose its
        # second-order terms without a word (torch's once_differentiable only refuses when the
        # incoming gradients require grad, which those of loss.sum() do not).
        if torch.is_grad_enabled():
            raise RuntimeError(
                "a backward with create_graph=True crosses a RemoteModule: the trunk's "
                "gradients cannot be differentiated again (no double backward through the "
                "trunk); take the gradient penalty with respect to the trunk's output, or "
                "backward without create_graph (docs/habits.md)"
            )
        call = ctx.call  # a RemoteCall or a ChunkedCall (chunks.py)
        if not call.keep_context:
            raise RuntimeError("this forward ran without grad mode; the server kept no context")
        # Reading the marker raises PyTorch's own "Trying to backward through the graph a
        # second time" once a backward without retain_graph has freed it: the trunk's
        # gradients must not accumulate twice where a local layer would have refused.
        ctx.saved_tensors  # noqa: B018
        input_grads = call.backward(grads, ctx.needs_input_grad[2:], _accumulates(ctx.dummy))
        # The dummy's gradient is the trunk's inf check: inf when this backward's trunk
        # gradients were not finite (the server kept none), else 0 (not NaN: anomaly mode
        # refuses a backward returning NaN). Summed into the module's flag, which
        # RemoteOptimizer lists as its parameter, GradScaler sees it (see optim.py). On the
        # CPU, as the dummy (module.py).
        flag = torch.full((1,), math.inf if call.nonfinite else 0.0, device="cpu")
        return (None, flag, *input_grads)


def _not_a_view(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or where it is a view (decoded outputs share one receive buffer) a tensor on
    the same memory that is not one. Autograd forbids changing a custom Function's view output
    in place, and a local layer's output may be changed so (``ReLU(inplace=True)`` on top)."""
    if not tensor._is_view():
        return tensor
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(
        tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride()
    )


def _accumulates(dummy: Any) -> bool:
    """Whether this backward pass accumulates into the trunk's parameters, as it would into a
    local layer's: ``loss.backward()`` does; ``torch.autograd.grad(loss, x)`` and
    ``loss.backward(inputs=[x])`` leave every parameter's ``.grad`` alone (a gradient penalty,
    an adversarial input), and so must the server. The dummy stands for the trunk's
    parameters: its AccumulateGrad node runs exactly when theirs would, and it is what a
    ``RemoteOptimizer`` lists as its parameter (for ``backward(inputs=...)`` to include)."""
    if dummy is None:
        return True
    try:
        return bool(torch._C._will_engine_execute_node(dummy))
    except RuntimeError:  # the dummy itself among autograd.grad()'s inputs: nothing accumulates
        return False


def remote_apply(call: Any, dummy: torch.Tensor, tensors: list[torch.Tensor]):
    outputs = _RemoteFunction.apply(call, dummy, *tensors)
    # The outputs leave the Function on the CPU and reach the caller's device by an ordinary
    # differentiable copy. So the gradients coming back are CPU tensors, and autograd runs the
    # Function's backward (which waits for the Backward RPC) on its CPU thread, not on the
    # GPU's one worker thread: a trunk served by this same process on the same GPU needs that
    # thread for its own backward meanwhile (they would deadlock).
    return tuple(memory.to_device(output, call.device) for output in outputs)
