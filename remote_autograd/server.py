"""The trunk server: the gRPC servicer and :func:`serve`.

Compute runs the trunk and, for training, caches the graph under the request id; Backward runs
autograd from the cached outputs (the forward is never recomputed), accumulates parameter
gradients into the caller's session and returns input gradients; Step applies the session's
optimizer once per step number.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import math
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import grpc
import msgpack
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import __version__, codec, frames
from ._proto import remote_autograd_pb2 as pb
from ._proto import remote_autograd_pb2_grpc as pb_grpc
from .cache import ContextCache, ForwardContext, Session, SessionTable, StepTurns
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import (
    ERROR_METADATA_KEY,
    AuthenticationError,
    InvalidRequest,
    LimitExceeded,
    RemoteAutogradError,
    StaleContext,
    TrunkError,
)
from .options import ServerOptions
from .transport import AUTH_METADATA_KEY, SESSION_METADATA_KEY, create_server
from .tree import flatten, unflatten

__all__ = ["TrunkServer", "TrunkService", "serve"]

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Trunk"].full_name
_ID = re.compile(r"^[0-9a-zA-Z_-]{1,64}$")
_NOT_OPTIMIZERS = {"Optimizer", "LBFGS"}  # the base class; LBFGS needs a closure on the server
_PLAIN = (bool, int, float)


def _rpc(method: Callable) -> Callable:
    """Turn any exception into a gRPC status with the error's class in trailing metadata."""

    def fail(self: TrunkService, context: grpc.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, RemoteAutogradError) and hasattr(exc, "status"):
            code, name, message = exc.status, type(exc).__name__, str(exc)
            # DEBUG, not WARNING: a client sending garbage must not be able to flood the log.
            log.debug("%s from %s refused (%s): %s", method.__name__, context.peer(),
                      code.name, message)
        else:
            log.exception("%s failed in the trunk", method.__name__)
            code, name = grpc.StatusCode.INTERNAL, "TrunkError"
            message = f"{method.__name__}: the trunk raised {type(exc).__name__}: {exc}"
        context.set_trailing_metadata(((ERROR_METADATA_KEY, name),))
        context.abort(code, message)

    if getattr(method, "_streams_reply", False):

        @functools.wraps(method)
        def stream_wrapper(self: TrunkService, request: Any, context: grpc.ServicerContext):
            try:
                yield from method(self, _well_formed(request, method.__name__), context)
            except Exception as exc:  # noqa: BLE001 - every error becomes a status
                fail(self, context, exc)

        return stream_wrapper

    @functools.wraps(method)
    def wrapper(self: TrunkService, request: Any, context: grpc.ServicerContext):
        try:
            return method(self, _well_formed(request, method.__name__), context)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            fail(self, context, exc)

    return wrapper


class _Malformed:
    """Stands for a request message protobuf could not parse (see _add_trunk_service)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _well_formed(request: Any, method: str) -> Any:
    if isinstance(request, _Malformed):
        raise InvalidRequest(f"{method}: the request is not a valid protobuf message "
                             f"({request.reason})")
    if hasattr(request, "__next__"):  # a request stream: check each message as it arrives
        return _well_formed_stream(request, method)
    return request


def _well_formed_stream(messages: Iterator[Any], method: str) -> Iterator[Any]:
    for message in messages:
        yield _well_formed(message, method)


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
            return _Malformed(str(exc)[:200])

    return parse


def _add_trunk_service(servicer: pb_grpc.TrunkServicer, server: grpc.Server) -> None:
    """Register the generated handlers, except that a request protobuf cannot parse reaches
    the servicer (and is answered INVALID_ARGUMENT) instead of gRPC's INTERNAL and a logged
    traceback per message, which a client could use to flood the log."""

    class Capture:
        handlers: dict[str, Any] = {}

        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            pass

        def add_registered_method_handlers(self, name: str, handlers: dict[str, Any]) -> None:
            self.handlers = handlers

    capture = Capture()
    pb_grpc.add_TrunkServicer_to_server(servicer, capture)
    handlers = {
        name: handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
        for name, handler in capture.handlers.items()
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
    )
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _streams_reply(method: Callable) -> Callable:
    method._streams_reply = True  # type: ignore[attr-defined]
    return method


class TrunkService(pb_grpc.TrunkServicer):
    """Serves one ``nn.Module`` to any number of client sessions."""

    def __init__(self, module: torch.nn.Module, options: ServerOptions | None = None) -> None:
        self.options = options = options or ServerOptions()
        self.device = torch.device(options.device)
        self.dtype = codec.DTYPES[options.dtype] if options.dtype else None
        if self.dtype is not None and not self.dtype.is_floating_point:
            raise ValueError(f"ServerOptions.dtype must be floating, got {options.dtype}")
        self.module = module.to(self.device)
        if self.dtype is not None:
            self.module = self.module.to(self.dtype)
        self.params = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.turns = StepTurns(options.step_wait)
        self.contexts = ContextCache(
            max_contexts=options.max_contexts,
            max_bytes=options.max_context_bytes,
            ttl=options.context_ttl,
            max_per_session=options.max_session_contexts,
            on_drop=self._end_lease,
        )
        self.sessions = SessionTable(
            max_sessions=options.max_sessions,
            ttl=options.session_ttl,
            on_drop=self.contexts.drop_session,
        )
        self.decoder = codec.Decoder(limits=options.limits)
        self.weights_version = 0
        self.server_id = uuid.uuid4().hex[:16]  # a restarted server is a different process
        self.saved_version: int | None = None  # weights_version of the last checkpoint
        self._trunk_lock = threading.RLock()
        self._inflight = _ByteBudget(options.max_inflight_bytes)
        self._tokens = {
            hashlib.sha256(t.encode()).hexdigest()[:16]: t.encode() for t in options.tokens
        }
        if options.checkpoint_path:
            self._restore(options.checkpoint_path)

    # -- sessions and auth ------------------------------------------------------------------

    def session(self, context: grpc.ServicerContext) -> Session:
        metadata = dict(context.invocation_metadata())
        identity = "anonymous"
        if self._tokens:
            offered = str(metadata.get(AUTH_METADATA_KEY, ""))
            scheme, _, token = offered.partition(" ")
            matches = [
                name
                for name, known in self._tokens.items()
                if hmac.compare_digest(token.encode(), known)
            ]
            if scheme.lower() != "bearer" or not matches:
                raise AuthenticationError(
                    "missing or unknown bearer token: pass ClientOptions(token=...)"
                )
            identity = matches[0]
        peer = context.auth_context().get("x509_common_name")
        if peer:
            identity += "/cn=" + b",".join(peer).decode(errors="replace")
        session_id = str(metadata.get(SESSION_METADATA_KEY, ""))
        if not _ID.match(session_id):
            raise InvalidRequest(
                f"metadata {SESSION_METADATA_KEY!r} must be 1-64 characters of [0-9A-Za-z_-], "
                f"got {session_id[:80]!r}"
            )
        return self.sessions.get(f"{identity}/{session_id}")

    # -- RPCs -------------------------------------------------------------------------------

    @_rpc
    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoReply:
        self.session(context)
        limits = self.options.limits
        return pb.InfoReply(
            server_version=__version__,
            protocol_version=PROTOCOL_VERSION,
            quantizations=list(codec.QUANTIZATIONS),
            compressions=list(codec.COMPRESSIONS),
            max_payload_bytes=limits.max_payload_bytes,
            max_tensor_bytes=limits.max_tensor_bytes,
            max_tensors=limits.max_tensors,
            unary_payload_bytes=self.options.unary_payload_bytes,
            stream_chunk_bytes=self.options.stream_chunk_bytes,
            trainable_parameters=[name for name, _ in self.params],
            trainable_numel=sum(p.numel() for _, p in self.params),
            device=str(self.device),
            module_repr=type(self.module).__name__,
            context_ttl_seconds=self.options.context_ttl,
            server_id=self.server_id,
        )

    @_rpc
    def Compute(self, request: pb.Frame, context: grpc.ServicerContext) -> pb.Frame:
        session = self.session(context)
        received = frames.receive_unary(request, self.options.limits)
        header, buffers = self._compute(session, received)
        return frames.unary_message(header, buffers)

    @_rpc
    @_streams_reply
    def ComputeStream(self, request_iterator: Any, context: grpc.ServicerContext):
        session = self.session(context)
        with self._receive(request_iterator, "ComputeStream") as received:
            header, buffers = self._compute(session, received)
        yield from frames.frame_messages(header, buffers, self.options.stream_chunk_bytes)

    @_rpc
    def Backward(self, request: pb.Frame, context: grpc.ServicerContext) -> pb.Frame:
        session = self.session(context)
        received = frames.receive_unary(request, self.options.limits)
        header, buffers = self._backward(session, received)
        return frames.unary_message(header, buffers)

    @_rpc
    @_streams_reply
    def BackwardStream(self, request_iterator: Any, context: grpc.ServicerContext):
        session = self.session(context)
        with self._receive(request_iterator, "BackwardStream") as received:
            header, buffers = self._backward(session, received)
        yield from frames.frame_messages(header, buffers, self.options.stream_chunk_bytes)

    @contextmanager
    def _receive(self, request_iterator: Any, method: str) -> Iterator[frames.Received]:
        """Assemble a streamed frame within max_inflight_bytes (checked before allocating)."""
        messages = iter(request_iterator)
        first = next(messages, None)
        declared = first.header.payload_bytes if first is not None else 0
        # Over max_payload_bytes, frames.receive refuses it before allocating anything.
        reserve = declared if declared <= self.options.limits.max_payload_bytes else 0
        with self._inflight.reserve(reserve, method):
            yield frames.receive(
                [] if first is None else _chain(first, messages), self.options.limits
            )

    @_rpc
    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext):
        session = self.session(context)
        released = self.contexts.release(session.key, list(request.request_ids))
        return pb.ReleaseReply(released=released)

    @_rpc
    def ConfigureOptimizer(self, request: pb.ConfigureOptimizerRequest, context):
        session = self.session(context)
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
                if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
                and n not in _NOT_OPTIMIZERS
            )
            raise InvalidRequest(
                f"optimizer {request.name!r} is not allowed; use one of {', '.join(allowed)}"
            )
        kwargs = _plain_map(request.options, "optimizer options")
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
        return pb.ConfigureOptimizerReply(param_group=msgpack.packb(_plain_group(group)))

    @_rpc
    def ZeroGrad(self, request: pb.ZeroGradRequest, context: grpc.ServicerContext):
        session = self.session(context)
        with session.lock:
            _apply_pending(session, request.mode, 0.0)
        return pb.ZeroGradReply()

    @_rpc
    def GradNorm(self, request: pb.GradNormRequest, context: grpc.ServicerContext):
        session = self.session(context)
        norm_type = request.norm_type or 2.0
        with session.lock:
            _apply_pending(session, request.zero_grad, request.grad_scale)
            grads = [session.grads[n] for n, _ in self.params if n in session.grads]
            if not grads:
                return pb.GradNormReply(norms=[], dtype="float32")
            norms = torch._foreach_norm(grads, norm_type)
            return pb.GradNormReply(
                norms=[float(n) for n in norms], dtype=codec._DTYPE_NAMES[norms[0].dtype]
            )

    @_rpc
    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepReply:
        session = self.session(context)
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
            groups = _decode_groups(request.param_groups, optimizer)
            if request.grad_scale and not math.isfinite(request.grad_scale):
                raise InvalidRequest(f"grad_scale must be finite, got {request.grad_scale}")
            waiting = self.turns.others_holding(session.key)
            if waiting:
                log.debug("Step #%d (session %s) waits for %d forwards of other sessions",
                          request.step, session.key, waiting)
            self.turns.begin_step(session.key)
            stepped = False
            try:
                version = self._step(session, optimizer, request, groups)
                stepped = True
            finally:
                self.turns.end_step(stepped=stepped)
            log.debug("Step #%d (session %s) applied: weights v%d", request.step, session.key,
                      version)
            return pb.StepReply(step=request.step, weights_version=version)

    def _step(
        self,
        session: Session,
        optimizer: torch.optim.Optimizer,
        request: pb.StepRequest,
        groups: list[dict[str, Any]],
    ) -> int:
        """Apply the session's gradients (the caller holds the session lock and its turn)."""
        with self._trunk_lock:
            _apply_pending(session, request.zero_grad, request.grad_scale)
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

    @_rpc
    def Checkpoint(self, request: pb.CheckpointRequest, context: grpc.ServicerContext):
        self.session(context)
        if not self.options.checkpoint_path:
            raise StaleContext("this server has no checkpoint path (serve --checkpoint FILE)")
        version = self.checkpoint()
        return pb.CheckpointReply(path=self.options.checkpoint_path, weights_version=version)

    @_rpc
    @_streams_reply
    def GetState(self, request: pb.GetStateRequest, context: grpc.ServicerContext):
        session = self.session(context)
        state: dict[str, Any] = {"step": session.last_step, "parameters": None, "optimizer": None}
        with session.lock, self._trunk_lock:
            if request.parameters:
                state["parameters"] = {n: p.detach().clone() for n, p in self.params}
            if request.optimizer and session.optimizer is not None:
                state["optimizer"] = _clone_tree(session.optimizer.state_dict())
        buffers = codec.Encoder(compression=self.options.compression).encode_buffers(state)
        yield from frames.frame_messages(pb.Header(), buffers, self.options.stream_chunk_bytes)

    @_rpc
    def LoadState(self, request_iterator: Any, context: grpc.ServicerContext):
        session = self.session(context)
        with self._receive(request_iterator, "LoadState") as received:
            state = received.decode(self.decoder)
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
                _check_finite_groups(optimizer_state)
                _check_finite_tree(optimizer_state.get("state"), "optimizer state")
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

    # -- the work ---------------------------------------------------------------------------

    def _compute(self, session: Session, received: frames.Received):
        header = received.header
        started = time.perf_counter()
        if header.release_ids:
            self.contexts.release(session.key, list(header.release_ids))
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
        if keep and not _ID.match(header.request_id):
            raise InvalidRequest(f"request id must match {_ID.pattern}, got {header.request_id!r}")
        seed = header.rng_seed or secrets.randbits(63) or 1
        leaves = []
        for index, (tensor, need) in enumerate(zip(tensors, needs, strict=True)):
            leaf = tensor.to(self.device, non_blocking=True)
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
            header.request_id[:12], session.key, len(tensors), keep, version,
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
                    template, leaves, header.training, seed, grad=keep and not lazy
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
        self, template: Any, leaves: list[torch.Tensor], training: bool, seed: int, *, grad: bool
    ) -> tuple[Any, list[torch.Tensor]]:
        """Run the trunk (caller holds the trunk lock) with its RNG seeded by ``seed``."""
        args, kwargs = unflatten(template, [self._cast_in(t) for t in leaves])
        self.module.train(training)
        cuda = self.device.type == "cuda"
        devices = [self.device.index or torch.cuda.current_device()] if cuda else []
        # A seed per forward makes dropout reproducible for a recompute, on any server process;
        # fork_rng leaves the process-wide generators as they were.
        with torch.random.fork_rng(devices=devices), (
            torch.enable_grad() if grad else torch.no_grad()
        ):
            torch.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(devices[0]):
                    torch.cuda.manual_seed(seed)
            result = self.module(*args, **kwargs)
        out_template, outputs = flatten(result)
        back = next((t.dtype for t in leaves if t.is_floating_point()), None)
        if self.dtype is not None and back is not None:
            outputs = [o.to(back) if o.is_floating_point() else o for o in outputs]
        return out_template, outputs

    def _backward(self, session: Session, received: frames.Received):
        header = received.header
        started = time.perf_counter()
        context = self.contexts.get(session.key, header.request_id)
        with context.lock:
            if header.backward_seq == context.backward_seq and context.last_reply is not None:
                log.debug("Backward %s #%d: a retry, answered again", header.request_id[:12],
                          header.backward_seq)
                return context.last_reply  # a retry: same answer, nothing accumulates twice
            if header.backward_seq != context.backward_seq + 1:
                raise StaleContext(
                    f"Backward #{header.backward_seq} for request {header.request_id[:12]}: "
                    f"expected #{context.backward_seq + 1}"
                )
            value = received.decode(self.decoder)
            grads = value.get("grads") if isinstance(value, dict) else None
            if not isinstance(grads, list):
                raise InvalidRequest(
                    "Backward expects {'grads': [one tensor or None per output]}"
                )
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
                        f"gradient {index}: expected a floating tensor, got {_describe(grad)}"
                    )
                if not bool(torch.isfinite(grad).all()):
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
                        context.template, context.inputs, context.training, context.seed,
                        grad=True,
                    )
                targets, grad_outputs = self._grad_pairs(outputs, grads)
                wrt = [context.inputs[i] for i in wanted] + [p for _, p in self.params]
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
                _check_finite_grads(self.params, param_grads)
                _apply_pending(session, header.zero_grad, header.grad_scale)
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
            log.debug("Backward %s #%d (session %s): accumulated", header.request_id[:12],
                      header.backward_seq, session.key)
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
                    f"got {_describe(grad)}"
                )
            if output.requires_grad:
                targets.append(output)
                grad_outputs.append(grad.to(self.device, output.dtype, non_blocking=True))
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
                    f"got {_describe(value)}"
                )
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise InvalidRequest(f"parameter {name} holds NaN or inf; refused")

    def stats(self) -> dict[str, int]:
        """Counts for tests and operators: cached contexts, their bytes, sessions."""
        return {
            "contexts": len(self.contexts),
            "context_bytes": self.contexts.nbytes,
            "sessions": len(self.sessions),
            "weights_version": self.weights_version,
            "inflight_bytes": self._inflight.used,
        }

    # -- checkpoints --------------------------------------------------------------------------

    def checkpoint(self, *, on_error: str = "raise") -> int:
        """Save the trunk and every session's optimizer to ``checkpoint_path``; return the
        weights version saved. A consistent snapshot: no Step runs while it is written."""
        path = self.options.checkpoint_path
        if not path:
            raise ValueError("ServerOptions.checkpoint_path is not set")
        with self._trunk_lock:
            version = self.weights_version
            sessions = {}
            for session in self.sessions.values():
                if session.optimizer is not None:
                    sessions[session.key] = {
                        "step": session.last_step,
                        "optimizer": session.optimizer_name,
                        "options": session.optimizer_options,
                        "state": session.optimizer.state_dict(),
                    }
            state = {
                "weights_version": version,
                "module": dict(self.module.state_dict()),
                "sessions": sessions,
            }
            try:
                save_checkpoint(path, state)
            except OSError:
                if on_error == "raise":
                    raise
                log.exception("could not save the checkpoint to %s; training goes on", path)
                return self.saved_version or 0
            self.saved_version = version
        log.debug("checkpoint of weights v%d saved to %s", version, path)
        return version

    def _restore(self, path: str) -> None:
        state = load_checkpoint(path)
        if state is None:
            log.info("no checkpoint at %s yet: starting from the module's weights", path)
            return
        with torch.no_grad():
            self.module.load_state_dict(state["module"])
        self.weights_version = self.saved_version = int(state["weights_version"])
        for key, saved in state["sessions"].items():
            session = self.sessions.get(key)
            cls = getattr(torch.optim, saved["optimizer"])
            session.optimizer = cls([p for _, p in self.params], **saved["options"])
            session.optimizer.load_state_dict(saved["state"])
            session.optimizer_name = saved["optimizer"]
            session.optimizer_options = saved["options"]
            session.last_step = int(saved["step"])
        log.info(
            "resumed from checkpoint %s: weights v%d, %d sessions",
            path, self.weights_version, len(state["sessions"]),
        )


class _ByteBudget:
    """Bytes of streamed frames held by calls in flight, at most ``limit`` together."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    @contextmanager
    def reserve(self, nbytes: int, method: str) -> Iterator[None]:
        with self._lock:
            if self.used + nbytes > self.limit:
                raise LimitExceeded(
                    f"{method}: a frame of {nbytes} bytes would exceed max_inflight_bytes="
                    f"{self.limit} ({self.used} held by calls in flight); retry later"
                )
            self.used += nbytes
        try:
            yield
        finally:
            with self._lock:
                self.used -= nbytes


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _check_finite_grads(
    params: Sequence[tuple[str, torch.Tensor]], grads: Sequence[torch.Tensor | None]
) -> None:
    """Refuse a Backward whose parameter gradients hold NaN or inf, before accumulating."""
    present = [(name, g) for (name, _), g in zip(params, grads, strict=True) if g is not None]
    if not present:
        return
    finite = torch.stack([torch.isfinite(g).all() for _, g in present])
    if not bool(finite.all()):
        bad = [name for (name, _), ok in zip(present, finite.tolist(), strict=True) if not ok]
        raise InvalidRequest(
            f"this Backward gives non-finite (NaN or inf) gradients for trunk parameters "
            f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}: refused, nothing was "
            "accumulated (check the inputs and the loss)"
        )


def _check_finite_tree(value: Any, what: str) -> None:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise InvalidRequest(f"{what} holds NaN or inf; refused")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRequest(f"{what} holds {value}; refused")
    elif isinstance(value, dict):
        for item in value.values():
            _check_finite_tree(item, what)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_finite_tree(item, what)


def _apply_pending(session: Session, zero_grad: int, grad_scale: float) -> None:
    """zero_grad() and clip scaling the client deferred to this call, in that order."""
    if zero_grad == pb.ZERO_GRAD_TO_NONE:
        session.grads.clear()
    elif zero_grad == pb.ZERO_GRAD_TO_ZERO:
        for grad in session.grads.values():
            grad.zero_()
    if grad_scale and grad_scale != 1.0:
        if not math.isfinite(grad_scale):
            raise InvalidRequest(f"grad_scale must be finite, got {grad_scale}")
        grads = list(session.grads.values())
        if grads:
            torch._foreach_mul_(grads, torch.tensor(grad_scale, dtype=grads[0].dtype))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__


def _is_plain(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, _PLAIN) or value is None:
        return True
    return isinstance(value, (list, tuple)) and all(
        isinstance(v, _PLAIN) and (not isinstance(v, float) or math.isfinite(v)) for v in value
    )


def _plain_map(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = msgpack.unpackb(data, raw=False) if data else {}
    except (ValueError, msgpack.UnpackException) as exc:
        raise InvalidRequest(f"{what} are not valid msgpack: {exc}") from exc
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InvalidRequest(f"{what} must be a map of names to values")
    for key, item in value.items():
        if not _is_plain(item):
            raise InvalidRequest(
                f"{what}: {key}={item!r} is not a finite number, bool, or list of these"
            )
    return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}


def _plain_group(group: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in group.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (*_PLAIN, type(None), str)) or (
            isinstance(value, (list, tuple)) and all(isinstance(v, _PLAIN) for v in value)
        ):
            out[key] = value
    return out


def _decode_groups(data: bytes, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    try:
        groups = msgpack.unpackb(data, raw=False) if data else [{} for _ in optimizer.param_groups]
    except (ValueError, msgpack.UnpackException) as exc:
        raise InvalidRequest(f"param_groups are not valid msgpack: {exc}") from exc
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise InvalidRequest(
            f"param_groups must be a list of {len(optimizer.param_groups)} maps"
        )
    updates = []
    for group, current in zip(groups, optimizer.param_groups, strict=True):
        if not isinstance(group, dict):
            raise InvalidRequest("each param group must be a map of hyperparameters")
        update = {}
        for key, value in group.items():
            if key not in current or key == "params":
                continue  # e.g. initial_lr from a scheduler: a client-side detail
            if not _is_plain(value) or value is None:
                raise InvalidRequest(
                    f"hyperparameter {key}={value!r}: expected a finite number, bool or a list "
                    "of these"
                )
            update[key] = tuple(value) if isinstance(value, list) else value
        updates.append(update)
    return updates


def _check_finite_groups(state: Any) -> None:
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list):
        raise InvalidRequest("optimizer state must hold 'param_groups' (a list)")
    for group in groups:
        for key, value in (group.items() if isinstance(group, dict) else ()):
            if key != "params" and not _is_plain(value) and not isinstance(value, str):
                raise InvalidRequest(f"optimizer state: {key}={value!r} is not finite and plain")


def _clone_tree(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_tree(v) for v in value)
    return value


class TrunkServer:
    """A running trunk server: the bound ``address``/``port``, ``stop()``, ``wait()``."""

    def __init__(
        self,
        module: torch.nn.Module,
        address: str,
        options: ServerOptions | None = None,
        *,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
    ) -> None:
        self.options = options = options or ServerOptions()
        self.service = TrunkService(module, options)
        self._server, self.port = create_server(address, options, interceptors=interceptors)
        self.address = f"{address.rsplit(':', 1)[0]}:{self.port}"
        _add_trunk_service(self.service, self._server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self._stopped = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="ra-sweeper", daemon=True)

    def start(self) -> TrunkServer:
        self._server.start()
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._sweeper.start()
        log.info("trunk server listening on %s (device %s)", self.address, self.service.device)
        return self

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop taking calls, let calls in flight finish for ``grace`` seconds, then close
        (saving a last checkpoint when the weights moved since the previous one)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        service = self.service
        if self.options.checkpoint_path and service.saved_version != service.weights_version:
            service.checkpoint(on_error="log")
        log.info("trunk server on %s stopped", self.address)

    def wait(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)

    def stats(self) -> dict[str, int]:
        return self.service.stats()

    def _sweep(self) -> None:
        options, service = self.options, self.service
        period = max(0.05, min(5.0, options.context_ttl / 4, options.session_ttl / 4))
        if options.checkpoint_interval > 0:
            period = min(period, max(0.05, options.checkpoint_interval / 4))
        last_save = time.monotonic()
        while not self._stopped.wait(period):
            service.contexts.expire()
            service.sessions.expire()
            due = time.monotonic() - last_save >= options.checkpoint_interval
            if options.checkpoint_interval > 0 and options.checkpoint_path and due:
                last_save = time.monotonic()
                if service.saved_version != service.weights_version:
                    service.checkpoint(on_error="log")

    def __enter__(self) -> TrunkServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(
    module: torch.nn.Module,
    address: str = "127.0.0.1:0",
    *,
    options: ServerOptions | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> TrunkServer:
    """Serve ``module`` at ``address`` (port 0 picks a free port) and return the running server.

    ``interceptors`` are standard ``grpc.ServerInterceptor`` objects (logging, auditing...)."""
    return TrunkServer(module, address, options, interceptors=interceptors).start()


