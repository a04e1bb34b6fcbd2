"""Forward and backward on the server: what happens on Compute and on Backward.

Compute runs the trunk and, for training, caches the graph under the request id; Backward runs
autograd from the cached outputs (the forward is never recomputed, unless the context was kept
for recompute), accumulates parameter gradients into the caller's session and returns input
gradients. A mixin of :class:`~remote_autograd.service.TrunkService`, whose state it uses:
``module``, ``params``, ``device``, ``dtype``, ``contexts``, ``turns``, ``decoder``,
``weights_version`` and the trunk lock.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import time
from collections.abc import Sequence
from typing import Any

import torch

from . import codec, frames
from ._proto import remote_autograd_pb2 as pb
from .cache import ForwardContext, Session
from .errors import InvalidRequest, StaleContext, TrunkError
from .state import TrunkState
from .tree import flatten, unflatten
from .validate import check_finite_grads, describe, finite_flags

__all__ = ["ComputeMixin"]

log = logging.getLogger(__name__)

REQUEST_ID = re.compile(r"^[0-9a-zA-Z_-]{1,64}$")


_UNCHANGED = contextlib.nullcontext()


def _grad_mode(enabled: bool) -> contextlib.AbstractContextManager:
    """enable_grad()/no_grad(), or nothing when the thread is in that mode already (gRPC's
    worker threads run in grad mode: a training forward needs no switch)."""
    if torch.is_grad_enabled() == enabled:
        return _UNCHANGED
    return torch.set_grad_enabled(enabled)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ComputeMixin(TrunkState):
    """Compute and Backward of :class:`~remote_autograd.service.TrunkService`."""

    def _compute(self, session: Session, received: frames.Received):
        header = received.header
        started = time.perf_counter()
        value = received.decode(self.decoder)
        if (
            not isinstance(value, dict)
            or not isinstance(value.get("args"), list)
            or not isinstance(value.get("kwargs"), dict)
            or not all(isinstance(k, str) for k in value["kwargs"])
        ):
            raise InvalidRequest("Compute expects a map {'args': list, 'kwargs': {str: value}}")
        template, tensors = flatten((value["args"], value["kwargs"]))
        needs = list(header.needs_input_grad) or [False] * len(tensors)
        if len(needs) != len(tensors):
            raise InvalidRequest(
                f"needs_input_grad has {len(needs)} flags for {len(tensors)} input tensors"
            )
        keep = header.keep_context or header.recompute
        if keep and not REQUEST_ID.fullmatch(header.request_id):
            raise InvalidRequest(
                f"request id must match {REQUEST_ID.pattern}, got {header.request_id!r}"
            )
        seed = header.rng_seed or secrets.randbits(63) or 1
        leaves = []
        for index, (tensor, need) in enumerate(zip(tensors, needs, strict=True)):
            leaf = codec.to_device(tensor, self.device)
            if need:
                if not leaf.is_floating_point():
                    raise InvalidRequest(f"input {index} is {leaf.dtype}: it cannot need a grad")
                leaf.requires_grad_(True)
            leaves.append(leaf)
        decoded = time.perf_counter()
        # A kept forward holds a lease until its Backward: no other session's Step lands in
        # between (see StepTurns). The context carries it once cached.
        lease = self.turns.lease(session.key) if keep else -1
        try:
            outputs, out_template, version = self._run_compute(
                session, header, template, leaves, tensors, seed, lease
            )
        except BaseException:
            self.turns.end(session.key, lease)
            raise
        computed = time.perf_counter()
        log.debug(
            "Compute %s (session %s): %d inputs, keep=%s, weights v%d",
            header.request_id[:12],
            session.key,
            len(tensors),
            keep,
            version,
        )
        reply_header = pb.Header(
            request_id=header.request_id,
            weights_version=version,
            rng_seed=seed,
            recomputed=header.recompute,
            server_id=self.server_id,
            compute_seconds=computed - decoded,
        )
        if outputs is None:
            reply_value = None  # a re-created context: the client has the outputs already
        else:
            reply_value = unflatten(out_template, [o.detach() for o in outputs])
        buffers = self._encode_reply(reply_value, header.reply_quantization, "Compute")
        reply_header.codec_seconds = (decoded - started) + (time.perf_counter() - computed)
        return reply_header, buffers

    def _run_compute(self, session, header, template, leaves, tensors, seed, lease):
        """The forward, and the context it leaves for Backward; returns (outputs or None,
        their template, weights version)."""
        keep = header.keep_context or header.recompute
        out_template = None
        # Kept for recompute (the server's option, or a client re-creating a lost context):
        # no graph is held; Backward runs the forward again with the same seed.
        lazy = header.recompute or (header.keep_context and self.options.recompute)
        outputs: list[torch.Tensor] | None = None
        with self._trunk_lock:
            version = self.weights_version
            if header.recompute and header.weights_version != version:
                raise StaleContext(
                    f"cannot re-create the forward of request {header.request_id[:12]}: it ran "
                    f"on weights version {header.weights_version}, the trunk is now at "
                    f"{version}; run the step's forward and backward again"
                )
            if not header.recompute:
                out_template, outputs = self._forward(
                    template,
                    leaves,
                    header.training,
                    seed if keep else None,
                    grad=keep and not lazy,
                )
        if keep:
            kept = None if lazy else outputs
            # The cache ends the lease when the context goes away (evicted, released...).
            self.contexts.put(
                ForwardContext(
                    request_id=header.request_id,
                    session=session.key,
                    inputs=leaves,
                    input_dtypes=[t.dtype for t in tensors],
                    outputs=kept,
                    nbytes=sum(_nbytes(t) for t in (*leaves, *(kept or ()))),
                    weights_version=version,
                    seed=seed,
                    template=template,
                    training=header.training,
                    backward_seq=header.backward_seq if header.recompute else 0,
                    lease=lease,
                )
            )
        return outputs, out_template, version

    def _forward(
        self,
        template: Any,
        leaves: list[torch.Tensor],
        training: bool,
        seed: int | None,
        *,
        grad: bool,
    ) -> tuple[Any, list[torch.Tensor]]:
        """Run the trunk (caller holds the trunk lock), its RNG seeded by ``seed`` if given."""
        args, kwargs = unflatten(template, [self._cast_in(t) for t in leaves])
        if self.module.training != training:  # train() walks every submodule: not per call
            self.module.train(training)
        with _grad_mode(grad):
            if seed is None:  # nothing will recompute this forward: no need to pin its RNG
                result = self.module(*args, **kwargs)
            else:
                result = self._seeded(seed, args, kwargs)
        out_template, outputs = flatten(result)
        if self.dtype is not None:
            back = next((t.dtype for t in leaves if t.is_floating_point()), None)
            if back is not None:
                outputs = [o.to(back) if o.is_floating_point() else o for o in outputs]
        return out_template, outputs

    def _seeded(self, seed: int, args: list[Any], kwargs: dict[str, Any]) -> Any:
        # A seed per forward makes dropout reproducible for a recompute, on any server process;
        # the process-wide generators are left as they were.
        if self.device.type != "cuda":
            # What fork_rng(devices=[]) does, without its accelerator lookups (a third of a
            # small Compute's forward): only the CPU generator is saved and restored.
            generator = torch.default_generator
            state = generator.get_state()
            generator.manual_seed(seed)
            try:
                return self.module(*args, **kwargs)
            finally:
                generator.set_state(state)
        devices = [self.device.index or torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices):
            torch.default_generator.manual_seed(seed)
            with torch.cuda.device(devices[0]):
                torch.cuda.manual_seed(seed)
            return self.module(*args, **kwargs)

    def _backward(self, session: Session, received: frames.Received):
        header = received.header
        started = time.perf_counter()
        context = self.contexts.get(session.key, header.request_id)
        with context.lock:
            if header.backward_seq == context.backward_seq and context.last_reply is not None:
                log.debug(
                    "Backward %s #%d: a retry, answered again",
                    header.request_id[:12],
                    header.backward_seq,
                )
                return context.last_reply  # a retry: same answer, nothing accumulates twice
            if header.backward_seq != context.backward_seq + 1:
                raise StaleContext(
                    f"Backward #{header.backward_seq} for request {header.request_id[:12]}: "
                    f"expected #{context.backward_seq + 1}"
                )
            value = received.decode(self.decoder)
            grads = value.get("grads") if isinstance(value, dict) else None
            if not isinstance(grads, list):
                raise InvalidRequest("Backward expects {'grads': [one tensor or None per output]}")
            needs = list(header.needs_input_grad)
            if len(needs) != len(context.inputs):
                raise InvalidRequest(
                    f"needs_input_grad has {len(needs)} flags for {len(context.inputs)} inputs"
                )
            for index, need in enumerate(needs):
                if need and not context.inputs[index].requires_grad:
                    raise InvalidRequest(f"input {index} was not sent as requiring a gradient")
            for index, grad in enumerate(grads):
                if grad is None:
                    continue
                if not isinstance(grad, torch.Tensor) or not grad.is_floating_point():
                    raise InvalidRequest(
                        f"gradient {index}: expected a floating tensor, got {describe(grad)}"
                    )
                if not finite_flags([grad])[0]:
                    raise InvalidRequest(
                        f"gradient {index} is not finite (NaN or inf): refused before it "
                        "reaches the trunk"
                    )
            decoded = time.perf_counter()
            wanted = [i for i, need in enumerate(needs) if need]
            # Same order as Step (session, then trunk), so the two cannot deadlock.
            with session.lock, self._trunk_lock:
                if context.weights_version != self.weights_version:
                    self._end_lease(context)
                    raise StaleContext(
                        f"Backward for request {header.request_id[:12]}: the trunk's weights "
                        f"were stepped (version {context.weights_version} -> "
                        f"{self.weights_version}) since its forward; run the forward again"
                    )
                outputs = context.outputs
                if outputs is None:
                    _, outputs = self._forward(
                        context.template,
                        context.inputs,
                        context.training,
                        context.seed,
                        grad=True,
                    )
                targets, grad_outputs = self._grad_pairs(outputs, grads)
                wrt = [context.inputs[i] for i in wanted] + [p for _, p in self.params]
                results: Sequence[torch.Tensor | None]
                if targets and wrt:
                    results = torch.autograd.grad(
                        targets,
                        wrt,
                        grad_outputs,
                        retain_graph=context.outputs is not None,
                        allow_unused=True,
                    )
                else:
                    results = (None,) * len(wrt)
                param_grads = results[len(wanted) :]
                check_finite_grads(self.params, param_grads)
                session.apply_pending(header.zero_grad, header.grad_scale)
                for (name, _), grad in zip(self.params, param_grads, strict=True):
                    if grad is not None:
                        held = session.grads.get(name)
                        session.grads[name] = grad if held is None else held.add_(grad)
                computed = time.perf_counter()
            input_grads: list[torch.Tensor | None] = [None] * len(context.inputs)
            for i, grad in zip(wanted, results[: len(wanted)], strict=True):
                input_grads[i] = None if grad is None else grad.to(context.input_dtypes[i])
            buffers = self._encode_reply(
                {"grads": input_grads}, header.reply_quantization, "Backward"
            )
            reply = (
                pb.Header(
                    request_id=header.request_id,
                    weights_version=context.weights_version,
                    recomputed=context.outputs is None,
                    server_id=self.server_id,
                    compute_seconds=computed - decoded,
                    codec_seconds=(decoded - started) + (time.perf_counter() - computed),
                ),
                buffers,
            )
            context.backward_seq = header.backward_seq
            context.last_reply = reply
            self._end_lease(context)
            log.debug(
                "Backward %s #%d (session %s): accumulated",
                header.request_id[:12],
                header.backward_seq,
                session.key,
            )
            return reply

    def _end_lease(self, context: ForwardContext) -> None:
        self.turns.end_context(context)

    def _grad_pairs(self, outputs: list[torch.Tensor], grads: list[Any]):
        if len(grads) != len(outputs):
            raise InvalidRequest(
                f"Backward got {len(grads)} gradients for a forward with {len(outputs)} outputs"
            )
        targets, grad_outputs = [], []
        for index, (output, grad) in enumerate(zip(outputs, grads, strict=True)):
            if grad is None:
                continue
            if grad.shape != output.shape:
                raise InvalidRequest(
                    f"gradient {index}: expected a tensor of shape {list(output.shape)}, "
                    f"got {describe(grad)}"
                )
            if output.requires_grad:
                targets.append(output)
                grad_outputs.append(codec.to_device(grad, self.device, output.dtype))
        return targets, grad_outputs

    def _cast_in(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dtype is not None and tensor.is_floating_point():
            return tensor.to(self.dtype)
        return tensor

    def _encode_reply(self, value: Any, quantization: str, method: str) -> list:
        try:
            encoder = codec.Encoder(
                compression=self.options.compression, quantization=quantization or "none"
            )
        except ValueError as exc:
            raise InvalidRequest(f"reply_quantization: {exc}") from exc
        try:
            return encoder.encode_buffers(value)
        except codec.CodecError as exc:
            raise TrunkError(
                f"{method}: the trunk returned a value that cannot be sent: {exc}"
            ) from exc
