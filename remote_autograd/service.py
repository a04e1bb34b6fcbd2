"""The gRPC servicer of the Trunk service: authentication, sessions, and one method per RPC.

The work behind the RPCs lives in the mixins: compute.py (Compute, Backward), optimizers.py
(ConfigureOptimizer, GradNorm, Step, GetState, LoadState) and checkpoint.py. Every exception
leaving an RPC becomes a gRPC status here (``_rpc``), with the error's class in the ``ra-error``
trailing metadata.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import torch
from google.protobuf.message import Message

from . import __version__, bulk, codec, frames
from ._proto import remote_autograd_pb2 as pb
from ._proto import remote_autograd_pb2_grpc as pb_grpc
from .cache import ContextCache, Session, SessionTable, StepTurns
from .checkpoint import CheckpointMixin
from .compute import REQUEST_ID, ComputeMixin
from .errors import (
    ERROR_METADATA_KEY,
    AuthenticationError,
    InvalidRequest,
    LimitExceeded,
    RemoteAutogradError,
    StaleContext,
)
from .optimizers import OptimizerMixin
from .options import ServerOptions
from .transport import AUTH_METADATA_KEY, SESSION_METADATA_KEY

__all__ = ["PROTOCOL_VERSION", "TrunkService", "tolerant"]

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1


def _rpc(method: Callable) -> Callable:
    """Turn any exception into a gRPC status with the error's class in trailing metadata."""

    def fail(self: TrunkService, context: grpc.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, RemoteAutogradError) and hasattr(exc, "status"):
            code, name, message = exc.status, type(exc).__name__, str(exc)
            # DEBUG, not WARNING: a client sending garbage must not be able to flood the log.
            log.debug(
                "%s from %s refused (%s): %s", method.__name__, context.peer(), code.name, message
            )
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
    if isinstance(request, Message):  # first: hasattr() below raises and catches on a message
        return request
    if isinstance(request, _Malformed):
        raise InvalidRequest(
            f"{method}: the request is not a valid protobuf message ({request.reason})"
        )
    if hasattr(request, "__next__"):  # a request stream: check each message as it arrives
        return _well_formed_stream(request, method)
    return request


def _well_formed_stream(messages: Iterator[Any], method: str) -> Iterator[Any]:
    for message in messages:
        yield _well_formed(message, method)


def tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
            return _Malformed(str(exc)[:200])

    return parse


def _streams_reply(method: Callable) -> Callable:
    method._streams_reply = True  # type: ignore[attr-defined]
    return method


class TrunkService(ComputeMixin, OptimizerMixin, CheckpointMixin, pb_grpc.TrunkServicer):
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
            max_sessions=options.max_sessions, ttl=options.session_ttl, on_drop=self._drop_session
        )
        self.bulk: bulk.BulkListener | None = None  # TrunkServer opens it beside the gRPC port
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
        # Only mutual TLS puts a client certificate's name in the auth context.
        peer = context.auth_context().get("x509_common_name") if self.options.client_ca else None
        if peer:
            identity += "/cn=" + b",".join(peer).decode(errors="replace")
        session_id = str(metadata.get(SESSION_METADATA_KEY, ""))
        if not REQUEST_ID.fullmatch(session_id):
            raise InvalidRequest(
                f"metadata {SESSION_METADATA_KEY!r} must be 1-64 characters of [0-9A-Za-z_-], "
                f"got {session_id[:80]!r}"
            )
        return self.sessions.get(f"{identity}/{session_id}")

    def _drop_session(self, key: str) -> None:
        self.contexts.drop_session(key)
        if self.bulk is not None:
            self.bulk.drop_session(key)

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
            bulk_port=self.bulk.port if self.bulk is not None else 0,
        )

    @_rpc
    def OpenBulk(self, request: pb.OpenBulkRequest, context: grpc.ServicerContext):
        session = self.session(context)
        if self.bulk is None:
            raise InvalidRequest("this server offers no bulk channel (InfoReply.bulk_port is 0)")
        ticket, connection_id = self.bulk.issue(session.key)
        return pb.OpenBulkReply(
            ticket=ticket, connection_id=connection_id, ticket_ttl_seconds=bulk.TICKET_TTL
        )

    @_rpc
    def Compute(self, request: pb.Frame, context: grpc.ServicerContext) -> pb.Frame:
        return self._unary(self._compute, "Compute", request, context)

    @_rpc
    @_streams_reply
    def ComputeStream(self, request_iterator: Any, context: grpc.ServicerContext):
        yield from self._streamed(self._compute, "ComputeStream", request_iterator, context)

    @_rpc
    def Backward(self, request: pb.Frame, context: grpc.ServicerContext) -> pb.Frame:
        return self._unary(self._backward, "Backward", request, context)

    @_rpc
    @_streams_reply
    def BackwardStream(self, request_iterator: Any, context: grpc.ServicerContext):
        yield from self._streamed(self._backward, "BackwardStream", request_iterator, context)

    def _unary(self, work: Callable, method: str, request: pb.Frame, context: grpc.ServicerContext):
        session = self.session(context)
        self._release_piggybacked(session, request.header)
        if request.header.bulk_connection:
            if self.bulk is None:
                raise InvalidRequest("this server offers no bulk channel")
            return bulk.serve_call(
                self.bulk,
                session.key,
                request.header,
                self.options.limits,
                context,
                reserve=lambda nbytes: self._inflight.reserve(nbytes, method),
                work=lambda received: work(session, received),
            )
        header, buffers = work(session, frames.receive_unary(request, self.options.limits))
        return frames.unary_message(header, buffers)

    def _streamed(
        self, work: Callable, method: str, request_iterator: Any, context: grpc.ServicerContext
    ) -> Iterator[pb.Frame]:
        session = self.session(context)
        with self._receive(request_iterator, method) as received:
            self._release_piggybacked(session, received.header)
            header, buffers = work(session, received)
        yield from frames.frame_messages(header, buffers, self.options.stream_chunk_bytes)

    def _release_piggybacked(self, session: Session, header: pb.Header) -> None:
        """Contexts the client let go of, riding on this call: freed before its frame arrives,
        so their buffers can take it."""
        if header.release_ids:
            self.contexts.release(session.key, list(header.release_ids))

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
        return self._configure_optimizer(self.session(context), request)

    @_rpc
    def ZeroGrad(self, request: pb.ZeroGradRequest, context: grpc.ServicerContext):
        session = self.session(context)
        with session.lock:
            session.apply_pending(request.mode, 0.0)
        return pb.ZeroGradReply()

    @_rpc
    def GradNorm(self, request: pb.GradNormRequest, context: grpc.ServicerContext):
        return self._grad_norm(self.session(context), request)

    @_rpc
    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepReply:
        return self._step(self.session(context), request)

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
        buffers = self._get_state(self.session(context), request)
        yield from frames.frame_messages(pb.Header(), buffers, self.options.stream_chunk_bytes)

    @_rpc
    def LoadState(self, request_iterator: Any, context: grpc.ServicerContext):
        session = self.session(context)
        with self._receive(request_iterator, "LoadState") as received:
            state = received.decode(self.decoder)
        return self._load_state(session, state)

    def stats(self) -> dict[str, int]:
        """Counts for tests and operators: cached contexts, their bytes, sessions."""
        return {
            "contexts": len(self.contexts),
            "context_bytes": self.contexts.nbytes,
            "sessions": len(self.sessions),
            "weights_version": self.weights_version,
            "inflight_bytes": self._inflight.used,
        }


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
