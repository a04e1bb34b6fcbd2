"""The gRPC servicer of the Trunk service: a thin shell around the trunk engine.

Each RPC authenticates the caller, finds its session, turns the request into a plain call of
:class:`~remote_autograd.engine.TrunkEngine` (engine.py does the work), and moves the frames
in and out: one message, a stream of chunks, or the bulk channel (bulk.py). Every exception
leaving an RPC becomes a gRPC status here (``_rpc``), with the error's class in the
``ra-error`` trailing metadata.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import grpc
import msgpack
from google.protobuf.message import Message

from . import __version__, bulk, cancellation, codec, frames, throttle
from ._proto import remote_autograd_pb2 as pb
from ._proto import remote_autograd_pb2_grpc as pb_grpc
from .calls import BackwardCall, ComputeCall, GradNormCall, StepCall
from .engine import TrunkEngine

if TYPE_CHECKING:
    from .adapters import AdapterEngine
from .errors import (
    ERROR_METADATA_KEY,
    AuthenticationError,
    InvalidRequest,
    LimitExceeded,
    RemoteAutogradError,
    ServerUnavailable,
    TrunkError,
)
from .sessions import ANONYMOUS, Session, ZeroGrad, identity_of, session_key
from .tokens import REFUSAL, BearerTokens
from .transport import SESSION_METADATA_KEY
from .tree import flatten
from .validate import autocast_dtype, unpack

__all__ = ["PROTOCOL_VERSION", "TrunkService", "tolerant"]

log = logging.getLogger(__name__)

# 2: the server reads named tuples and ModelOutputs in requests (codec ExtType 3), and sends
# them to a client whose Compute asks for them (Header.named_values).
PROTOCOL_VERSION = 2


# The status message travels in HTTP/2 trailers, which gRPC caps at 8 KiB by default (and
# percent-encodes): a longer one (a torch error listing every backend) would reach the client
# as "Stream removed" instead.
_MAX_DETAILS = 2000


def _rpc(method: Callable) -> Callable:
    """Turn any exception into a gRPC status with the error's class in trailing metadata."""

    def fail(self: TrunkService, context: grpc.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, grpc.RpcError):
            # Raised by a request stream whose caller cancelled or ran out of time: an
            # expected end, nobody to answer.
            log.debug("%s from %s: the caller went away mid-call", method.__name__, context.peer())
            return
        if isinstance(exc, RemoteAutogradError) and hasattr(exc, "status"):
            code, name, message = exc.status, type(exc).__name__, str(exc)
            # DEBUG, not WARNING: a client sending garbage must not be able to flood the log.
            log.debug(
                "%s from %s refused (%s): %s", method.__name__, context.peer(), code.name, message
            )
        else:
            throttle.log_trunk_failure(log, method.__name__, exc)
            code, name = grpc.StatusCode.INTERNAL, "TrunkError"
            message = f"{method.__name__}: the trunk raised {type(exc).__name__}: {exc}"
        if len(message) > _MAX_DETAILS:
            cut = len(message) - _MAX_DETAILS
            message = f"{message[:_MAX_DETAILS]} ... ({cut} more characters)"
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


# The typed subjectAltName properties gRPC reports, and the names openssl gives their types.
_SAN_KINDS = {"peer_dns": "DNS", "peer_uri": "URI", "peer_ip": "IP", "peer_email": "email"}


def certificate_name(auth: dict[str, list[bytes]]) -> str:
    """What names a verified client certificate in the caller's identity: its common name;
    without one (a certificate that names its holder by subjectAltName alone), its alternative
    names, each with its type; without either, its SHA-256 fingerprint (of the DER bytes, as
    ``openssl x509 -fingerprint -sha256`` prints it). Certificates without a CN must not all
    become one identity: they would share one adapter and one share of the server."""

    def named(key: str) -> list[bytes]:  # gRPC gives a certificate without a CN one empty CN
        return [value for value in auth.get(key, ()) if value]

    if names := named("x509_common_name"):
        return "/cn=" + b",".join(names).decode(errors="replace")
    # Typed and escaped, so that DNS:10.0.0.1 is not IP:10.0.0.1, nor one name "a,b" two.
    sans = sorted(
        f"{kind}:" + value.decode(errors="replace").replace("%", "%25").replace(",", "%2C")
        for key, kind in _SAN_KINDS.items()
        for value in named(key)
    )
    if sans:
        return "/san=" + ",".join(sans)
    try:
        der = ssl.PEM_cert_to_DER_cert(b"".join(named("x509_pem_cert")).decode())
    except (UnicodeDecodeError, ValueError):
        der = b""
    if not der:
        raise AuthenticationError("the client certificate names no one (no CN, SAN or certificate)")
    return "/sha256=" + hashlib.sha256(der).hexdigest()


def _holds_none(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and any(item is None for item in value)


def _session_id(context: grpc.ServicerContext) -> str:
    """The session id the call names (its metadata), as sent: the engine checks it."""
    return str(dict(context.invocation_metadata()).get(SESSION_METADATA_KEY, ""))


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


class TrunkService(pb_grpc.TrunkServicer):
    """The Trunk service over one :class:`~remote_autograd.engine.TrunkEngine`."""

    def __init__(self, engine: TrunkEngine | AdapterEngine) -> None:
        self.engine = engine
        self.options = options = engine.options
        self.bulk: bulk.BulkListener | None = None  # TrunkServer opens it beside the gRPC port
        self.decoder = codec.Decoder(limits=options.limits)
        self.trunk_device = engine.runner.device  # where quantized call tensors dequantize
        self._inflight = _ByteBudget(
            options.max_inflight_bytes, options.max_identity_inflight_bytes
        )
        self._decoding = _ByteBudget(options.max_decoding_bytes, name="max_decoding_bytes")
        self.tokens = BearerTokens(options.tokens)  # the server's TokenGate checks them too
        engine.session_listeners.append(self._drop_bulk)
        cancellation.install(engine.module)  # an abandoned call stops between layers

    # -- who is calling -------------------------------------------------------------------------

    def identity(self, context: grpc.ServicerContext) -> str:
        """The caller's authenticated identity: a token's fingerprint ("anonymous" on a
        server without tokens) and, under mutual TLS, the client certificate's name."""
        identity = ANONYMOUS
        if self.tokens:  # checked before the call took a thread too (tokens.TokenGate)
            name = self.tokens.identity(context.invocation_metadata())
            if name is None:
                raise AuthenticationError(REFUSAL)
            identity = name
        if self.options.client_ca:  # only mutual TLS puts a client certificate in the context
            identity += certificate_name(context.auth_context())
        return identity

    def session(self, context: grpc.ServicerContext) -> Session:
        return self.engine.session(self.identity(context), _session_id(context))

    def _drop_bulk(self, session_key: str) -> None:
        if self.bulk is not None:
            self.bulk.drop_session(session_key)

    # -- RPCs -------------------------------------------------------------------------------

    @_rpc
    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoReply:
        # Authenticated, but no session: Info alone holds no slot.
        identity = self.identity(context)
        limits = self.options.limits
        trunk = self.engine.info(identity)
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
            trainable_parameters=trunk.trainable_parameters,
            trainable_numel=trunk.trainable_numel,
            device=trunk.device,
            module_repr=trunk.module_name,
            context_ttl_seconds=self.options.context_ttl,
            server_id=trunk.server_id,
            bulk_port=self.bulk.port if self.bulk is not None else 0,
            fingerprint=trunk.fingerprint,
            weights_version=trunk.weights_version,
            buffers=trunk.buffers,
            dtype=trunk.dtype,
            world_size=trunk.world_size,
            parallel=trunk.parallel,
            batch_statistics=trunk.batch_statistics,
        )

    @_rpc
    def OpenBulk(self, request: pb.OpenBulkRequest, context: grpc.ServicerContext):
        session = self.session(context)
        if self.bulk is None:
            raise InvalidRequest("this server offers no bulk channel (InfoReply.bulk_port is 0)")
        ticket, connection_id = self.bulk.issue(session.key)
        # A session that ended meanwhile voided its tickets, all but this one if it ended
        # before the ticket was issued: a connection opened with it would belong to nothing.
        if not self.engine.sessions.holds(session):
            self.bulk.void(connection_id)
            raise ServerUnavailable("the session ended while its bulk ticket was issued")
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

    @_rpc
    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext):
        # No session is created to release nothing: a client's release thread outliving its
        # server (a restart, a new server on the same port) would fill the table.
        identity, session_id = self.identity(context), _session_id(context)
        if session_key(identity, session_id) not in self.engine.sessions:
            return pb.ReleaseReply(released=0)
        session = self.engine.session(identity, session_id)
        released = self.engine.release(session, list(request.request_ids))
        return pb.ReleaseReply(released=released)

    @_rpc
    def EndSession(self, request: pb.EndSessionRequest, context: grpc.ServicerContext):
        # No session is created just to end it.
        ended = self.engine.end_session(self.identity(context), _session_id(context))
        return pb.EndSessionReply(ended=ended)

    @_rpc
    def ConfigureOptimizer(self, request: pb.ConfigureOptimizerRequest, context):
        options = unpack(request.options, "optimizer options")
        groups = unpack(request.param_groups, "param_groups") if request.param_groups else None
        resolved = self.engine.configure_optimizer(
            self.session(context), request.name, options, groups, request.optimizer_id[:64]
        )
        if not request.none_in_tuples:
            resolved = [{k: v for k, v in g.items() if not _holds_none(v)} for g in resolved]
        return pb.ConfigureOptimizerReply(
            param_group=msgpack.packb({k: v for k, v in resolved[0].items() if k != "params"}),
            param_groups=msgpack.packb(resolved),
        )

    @_rpc
    def GradNorm(self, request: pb.GradNormRequest, context: grpc.ServicerContext):
        call = GradNormCall(
            norm_type=request.norm_type or 2.0,
            zero_grad=int(ZeroGrad.from_wire(request.zero_grad)),
            grad_scale=request.grad_scale,
            ops_id=request.ops_id[:64],
            server_id=request.server_id[:64],
        )
        norms, dtypes = self.engine.grad_norms(self.session(context), call)
        names = [codec.dtype_name(dtype) for dtype in dtypes]
        return pb.GradNormReply(norms=norms, dtype=names[0] if names else "float32", dtypes=names)

    @_rpc
    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepReply:
        call = StepCall(
            step=request.step,
            param_groups=unpack(request.param_groups, "param_groups"),
            zero_grad=ZeroGrad.from_wire(request.zero_grad),
            grad_scale=request.grad_scale,
            server_id=request.server_id,
            optimizer_id=request.optimizer_id[:64],
        )
        result = self.engine.step(self.session(context), call)
        return pb.StepReply(
            step=result.step,
            weights_version=result.weights_version,
            replayed=result.replayed,
            wait_seconds=result.wait.seconds,
            waited_forwards=result.wait.forwards,
            wait_expired=result.wait.expired,
        )

    @_rpc
    def Checkpoint(self, request: pb.CheckpointRequest, context: grpc.ServicerContext):
        version = self.engine.requested_checkpoint(self.session(context))
        return pb.CheckpointReply(path=self.options.checkpoint_path, weights_version=version)

    @_rpc
    @_streams_reply
    def GetState(self, request: pb.GetStateRequest, context: grpc.ServicerContext):
        session = self.session(context)
        state = self.engine.get_state(
            session,
            parameters=request.parameters,
            optimizer=request.optimizer,
            buffers=request.buffers,
        )
        # The reply holds a copy of the weights until the client has read it all: counted as
        # frames in flight are, or replies nobody reads would hold a copy each.
        # Against the whole budget, not the identity's share: a state may be larger than
        # the share (1 GiB), and nothing would ever make room for it.
        nbytes = sum(t.numel() * t.element_size() for t in flatten(state)[1])
        with self._inflight.reserve(nbytes, "GetState", None, what="a reply of"):
            buffers = codec.Encoder(compression=self.options.compression).encode_buffers(state)
            del state
            yield from frames.frame_messages(pb.Header(), buffers, self.options.stream_chunk_bytes)

    @_rpc
    def LoadState(self, request_iterator: Any, context: grpc.ServicerContext):
        session = self.session(context)
        with (
            self._receive(request_iterator, "LoadState", identity_of(session.key)) as received,
            self._decoded(session, received, "LoadState", None) as state,
        ):
            loaded, optimizer_loaded, buffers_loaded = self.engine.load_state(session, state)
        return pb.LoadStateReply(
            parameters_loaded=loaded,
            optimizer_loaded=optimizer_loaded,
            buffers_loaded=buffers_loaded,
        )

    # -- Compute and Backward: header <-> call, frames <-> values ---------------------------------

    def _compute(self, session: Session, received: frames.Received):
        header = received.header
        started = time.perf_counter()
        call = ComputeCall(
            request_id=header.request_id,
            training=header.training,
            needs_input_grad=list(header.needs_input_grad),
            keep_context=header.keep_context,
            recompute=header.recompute,
            rng_seed=header.rng_seed,
            weights_version=header.weights_version,
            weights_id=header.weights_id[:64],
            backward_seq=header.backward_seq,
            autocast=autocast_dtype(header.autocast_dtype),
        )
        encoder = self._reply_encoder(header.reply_quantization)  # refused before it runs
        with self._decoded(session, received, "Compute", self.trunk_device) as value:
            decoded = time.perf_counter()
            result = self.engine.compute(session, call, value)
        computed = time.perf_counter()
        try:
            buffers = self._encode_reply(encoder, result.value, "Compute", header.named_values)
        except BaseException:  # no client will send the Backward of a forward it never got
            self.engine.release(session, [header.request_id])
            raise
        reply = pb.Header(
            request_id=header.request_id,
            weights_version=result.weights_version,
            weights_id=result.weights_id,
            rng_seed=result.seed,
            recomputed=result.recomputed,
            server_id=self.engine.server_id,
            compute_seconds=result.compute_seconds,
            codec_seconds=(decoded - started) + (time.perf_counter() - computed),
            outputs_without_grad=result.without_grad,
        )
        return reply, buffers

    def _backward(self, session: Session, received: frames.Received):
        header = received.header
        started = time.perf_counter()
        call = BackwardCall(
            request_id=header.request_id,
            seq=header.backward_seq,
            needs_input_grad=list(header.needs_input_grad),
            zero_grad=ZeroGrad.from_wire(header.zero_grad),
            grad_scale=header.grad_scale,
            freeze_parameters=header.freeze_parameters,
            report_nonfinite=header.report_nonfinite,
        )
        encoder = self._reply_encoder(header.reply_quantization)  # refused before it runs
        with self._decoded(session, received, "Backward", self.trunk_device) as value:
            decoded = time.perf_counter()
            cancellation.check("Backward")  # the forward's layers check again if recomputed
            result = self.engine.backward(session, call, value)
        computed = time.perf_counter()
        buffers = self._encode_reply(encoder, {"grads": result.grads}, "Backward")
        reply = pb.Header(
            request_id=header.request_id,
            weights_version=result.weights_version,
            recomputed=result.recomputed,
            server_id=self.engine.server_id,
            compute_seconds=result.compute_seconds,
            codec_seconds=(decoded - started) + (time.perf_counter() - computed),
            nonfinite=result.nonfinite,
        )
        return reply, buffers

    @contextmanager
    def _decoded(
        self,
        session: Session,
        received: frames.Received,
        method: str,
        device: Any,
    ) -> Iterator[Any]:
        """The frame's values, while the call uses them. What decoding adds to the frame's own
        bytes (LZ4 data decompressed, lossy codecs widened: up to max_decoded_bytes from a frame
        of a few KiB) is held in max_decoding_bytes meanwhile, counted before it is allocated."""
        growth = self.decoder.growth(received.buffer)
        what = "decoding its frame needs"
        with self._decoding.reserve(growth, method, what=what, beyond=" beyond the frame"):
            yield received.decode(self.decoder, device=device)

    def _reply_encoder(self, quantization: str) -> codec.Encoder:
        try:
            return codec.Encoder(
                compression=self.options.compression, quantization=quantization or "none"
            )
        except ValueError as exc:
            raise InvalidRequest(f"reply_quantization: {exc}") from exc

    @staticmethod
    def _encode_reply(encoder: codec.Encoder, value: Any, method: str, named: bool = False) -> list:
        try:
            return encoder.encode_buffers(value, named=named, staged=True)
        except codec.CodecError as exc:
            raise TrunkError(
                f"{method}: the trunk returned a value that cannot be sent: {exc}"
            ) from exc

    # -- moving frames --------------------------------------------------------------------------

    def _unary(self, work: Callable, method: str, request: pb.Frame, context: grpc.ServicerContext):
        with cancellation.watching(context):
            return self._unary_watched(work, method, request, context)

    def _unary_watched(self, work: Callable, method: str, request: pb.Frame, context):
        session = self.session(context)
        self._release_piggybacked(session, request.header)
        if request.header.bulk_connection:
            if self.bulk is None:  # a client of this address before a restart without one
                raise ServerUnavailable(
                    "this server offers no bulk channel (InfoReply.bulk_port is 0): the "
                    "client finds out and sends this call's frames in gRPC messages"
                )
            return bulk.serve_call(
                self.bulk,
                session.key,
                request.header,
                self.options.limits,
                context,
                reserve=lambda nbytes: self._inflight.reserve(
                    nbytes, method, identity_of(session.key)
                ),
                work=lambda received: work(session, received),
            )
        header, buffers = work(session, frames.receive_unary(request, self.options.limits))
        return frames.unary_message(header, buffers)

    def _streamed(
        self, work: Callable, method: str, request_iterator: Any, context: grpc.ServicerContext
    ) -> Iterator[pb.Frame]:
        session = self.session(context)
        with (
            self._receive(request_iterator, method, identity_of(session.key)) as received,
            cancellation.watching(context),
        ):
            self._release_piggybacked(session, received.header)
            cancellation.check(method)
            header, buffers = work(session, received)
        yield from frames.frame_messages(header, buffers, self.options.stream_chunk_bytes)

    def _release_piggybacked(self, session: Session, header: pb.Header) -> None:
        """Contexts the client let go of, riding on this call: freed before its frame arrives,
        so their buffers can take it."""
        if header.release_ids:
            self.engine.release(session, list(header.release_ids))

    @contextmanager
    def _receive(
        self, request_iterator: Any, method: str, owner: str | None = None
    ) -> Iterator[frames.Received]:
        """Assemble a streamed frame within max_inflight_bytes (checked before allocating)."""
        messages = iter(request_iterator)
        first = next(messages, None)
        declared = first.header.payload_bytes if first is not None else 0
        # Over max_payload_bytes, frames.receive refuses it before allocating anything.
        reserve = declared if declared <= self.options.limits.max_payload_bytes else 0
        with self._inflight.reserve(reserve, method, owner):
            yield frames.receive(
                [] if first is None else _chain(first, messages), self.options.limits
            )

    def stats(self) -> dict[str, int]:
        """Counts for tests and operators: the engine's, and bytes of frames in flight."""
        return {
            **self.engine.stats(),
            "inflight_bytes": self._inflight.used,
            "decoding_bytes": self._decoding.used,
        }


class _ByteBudget:
    """Bytes held by calls in flight, at most ``limit`` together (the option ``name``) and
    ``owner_limit`` for one authenticated identity (``owner``; None: no share of its own)."""

    def __init__(
        self, limit: int, owner_limit: int | None = None, name: str = "max_inflight_bytes"
    ) -> None:
        self.limit = limit
        self.name = name
        self.owner_limit = owner_limit or limit
        self.used = 0
        self._owners: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def reserve(
        self,
        nbytes: int,
        method: str,
        owner: str | None = None,
        what: str = "a frame of",
        beyond: str = "",
    ) -> Iterator[None]:
        if nbytes > self.limit:  # no wait would help: say so, not "retry later"
            raise LimitExceeded(
                f"{method}: {what} {nbytes} bytes{beyond}, more than {self.name}={self.limit} "
                "allows at all; send smaller calls (micro_batches) or raise the limit"
            )
        if owner is not None and nbytes > self.owner_limit:
            raise LimitExceeded(
                f"{method}: {what} {nbytes} bytes{beyond}, more than "
                f"max_identity_inflight_bytes={self.owner_limit} allows one identity at all; "
                "send smaller calls (micro_batches) or raise the limit"
            )
        with self._lock:
            if self.used + nbytes > self.limit:
                raise LimitExceeded(
                    f"{method}: {what} {nbytes} bytes, which would exceed {self.name}="
                    f"{self.limit} ({self.used} held by calls in flight); retry later"
                )
            held = self._owners.get(owner, 0) if owner is not None else 0
            if owner is not None and held + nbytes > self.owner_limit:
                raise LimitExceeded(
                    f"{method}: {what} {nbytes} bytes, which would exceed "
                    f"max_identity_inflight_bytes={self.owner_limit} ({held} held by this "
                    "identity's calls in flight); retry later"
                )
            self.used += nbytes
            if owner is not None:
                self._owners[owner] = held + nbytes
        try:
            yield
        finally:
            with self._lock:
                self.used -= nbytes
                if owner is not None:
                    left = self._owners.pop(owner) - nbytes
                    if left > 0:
                        self._owners[owner] = left


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest
