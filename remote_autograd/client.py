"""The only place RPCs are issued: :class:`TrunkClient`, one session with one trunk server.

The client holds the call logic: request and session ids, retries, deferred work (releases,
``zero_grad()`` and clip scales riding on the next call), dropout seeds. How a call's frames
travel (unary, stream, bulk) is exchange.py's; how values become frames is codec.py's.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import multiprocessing
import multiprocessing.util
import os
import queue
import secrets
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, NamedTuple, TypeVar

import grpc
import msgpack
import torch

from . import codec, forking, frames
from ._proto import remote_autograd_pb2 as pb
from ._proto import remote_autograd_pb2_grpc as pb_grpc
from .addresses import accepts_connections, check_address, unreachable_reason
from .bulk import BulkBroken
from .errors import (
    ERROR_METADATA_KEY,
    AuthenticationError,
    ServerUnavailable,
    StaleContext,
    SteppedTrunkWarning,
    TransportError,
    TrunkMismatch,
    from_rpc_error,
)
from .exchange import CallStats, FrameExchange
from .fingerprint import fingerprint_differences, fingerprint_digest
from .options import ClientOptions
from .transport import (
    AUTH_METADATA_KEY,
    SESSION_METADATA_KEY,
    bulk_client_tls,
    create_channel,
    tls_refusal,
)

__all__ = ["CallStats", "TrunkClient"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_CONTROL_TIMEOUT = 30.0
# Calls with deadlines of their own, not ClientOptions.timeout.
_CONTROL_CALLS = frozenset({"Info", "OpenBulk", "Release", "ConfigureOptimizer", "Checkpoint"})
_RELEASE_DELAY = 0.05  # seconds a release waits to ride on the next call before its own RPC
_UNREACHABLE_GRACE = 1.0  # seconds a refused connection / unknown host is retried (a restart)
_IDLE_CHECK = 5.0  # seconds a release thread waits before it checks its client is alive
_END_SESSION_TIMEOUT = 2.0  # close() and exit end the session best effort, this long at most
_NAMED_VALUES = 2  # the protocol version from which servers read named tuples and ModelOutputs


class _StepRequest(NamedTuple):
    message: pb.StepRequest
    zero: pb.ZeroGradMode  # the deferred zero_grad() and clip scale it carries, put back if
    scale: float  # it fails


class TrunkClient:
    """A session with one trunk server. Thread-safe; cheap until the first call."""

    def __init__(self, address: str, options: ClientOptions | None = None) -> None:
        self.address = address = check_address(address)
        self.options = options = options or ClientOptions()
        self.stats = CallStats()
        self._new_session()
        self._encoders = {
            "activation": codec.Encoder(
                compression=options.compression, quantization=options.activation_quantization
            ),
            "gradient": codec.Encoder(
                compression=options.compression, quantization=options.gradient_quantization
            ),
        }
        self._decoder = codec.Decoder(limits=options.limits)
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.TrunkStub | None = None
        self._info: pb.InfoReply | None = None
        self._frames = self._frame_exchange()
        # Deferred work that rides on the next call instead of costing a round trip.
        self._pending_releases: list[str] = []
        self._pending_zero: pb.ZeroGradMode = pb.ZERO_GRAD_NONE
        self._pending_scale = 1.0
        # Set when the Backward carrying them has been answered: a Backward of another thread
        # that arrived first would have its gradients zeroed (or scaled) with the earlier ones.
        self._grad_ops_carried: threading.Event | None = None
        self._release_wakeup = threading.Event()
        self._release_thread: threading.Thread | None = None
        self._closed = False
        # Where this session is, for the trunk's RNG seeds (see _next_seed).
        self._steps_done = 0
        self._forwards_since_zero_grad = 0
        self._eval_forwards = 0  # since zero_grad(): their seeds are of a series of their own
        # zero_grad()s and Backwards so far: did the gradients change since a failed step?
        self.grad_events = 0
        # The server process that holds the gradients of the step in progress ("" = none yet).
        self._grads_server_id = ""
        self._optimizer_id = ""  # the configuration Steps step (ConfigureOptimizerRequest)
        # Whether this session has run a forward or loaded state: a trunk stepped by others
        # before either is worth a warning (_check_fresh).
        self._started = False
        # The session holds one optimizer, the one configured last: a weak reference to its
        # RemoteOptimizer, set by it, so an older one can tell that it was replaced.
        self.current_optimizer: Callable[[], Any] = lambda: None
        # A Step in flight from step_in_background(): its thread and its future.
        self._stepping: tuple[threading.Thread, Future[pb.StepReply]] | None = None
        self._pid = os.getpid()  # the process that opened the session (see forking.py)
        self.forked = False  # this process is a fork of the one that opened the first session
        forking.on_fork_in_child(self, TrunkClient._after_fork_in_child)
        _LIVE.add(self)
        # A client dropped without close() (a deepcopy evaluated and thrown away) ends its
        # session when it is collected, as a local copy frees everything when dropped.
        self._leftovers = _Leftovers(self)
        weakref.finalize(self, _end_dropped_session, self._leftovers).atexit = False  # _LIVE's

    def _new_session(self) -> None:
        self.session_id = uuid.uuid4().hex
        self._metadata: tuple[tuple[str, str], ...] = ((SESSION_METADATA_KEY, self.session_id),)
        if self.options.token:
            self._metadata += ((AUTH_METADATA_KEY, f"Bearer {self.options.token}"),)

    def _frame_exchange(self) -> FrameExchange:
        # Its methods weakly: the exchange holding them would put the client in a cycle, and
        # a client in a cycle ends its session (the finalizer above) only at the garbage
        # collector's next full run; dropped eval copies then piled up against max_sessions.
        return FrameExchange(
            self.address,
            self.options,
            self.stats,
            kw=_weakly(self._kw),
            open_ticket=_weakly(self._open_bulk_ticket),
            refresh_info=_weakly(self._refresh_info),
        )

    def _after_fork_in_child(self) -> None:
        """This process is a fork of the one that opened the session (forking.py): the
        channel, bulk connections and contexts are the parent's; a new session opens lazily
        if this process uses the trunk."""
        forking.keep_inherited(self._channel, self._stub, self._frames)
        self._lock = threading.Lock()
        self._channel, self._stub = None, None
        self._new_session()
        self._frames = self._frame_exchange()
        self._pending_releases = []
        self._pending_zero, self._pending_scale = pb.ZERO_GRAD_NONE, 1.0
        self._grad_ops_carried = None
        self._release_wakeup = threading.Event()
        self._release_thread = None
        self._steps_done = self._forwards_since_zero_grad = self._eval_forwards = 0
        self._grads_server_id = ""
        self._optimizer_id = ""  # the new session holds no optimizer
        self._stepping = None  # the parent's thread did not come along
        self._pid = os.getpid()
        self.forked = True
        self._leftovers.take(self)  # this process's session, not opened yet

    # -- connection -------------------------------------------------------------------------

    def _connect(self) -> pb_grpc.TrunkStub:
        with self._lock:
            if self._closed:
                raise TransportError(
                    f"the client for {self.address} is closed: create a new RemoteModule",
                    status=grpc.StatusCode.CANCELLED,
                )
            if self._stub is None:
                self._channel = self._leftovers.channel = create_channel(self.address, self.options)
                self._stub = pb_grpc.TrunkStub(self._channel)
                if multiprocessing.parent_process() is not None:
                    # multiprocessing's children (DataLoader workers) leave through os._exit,
                    # past atexit (_close_live_clients): their exit runs multiprocessing's
                    # finalizers instead. Each worker's session once stayed until
                    # session_ttl, and epochs of workers filled max_sessions.
                    ref = weakref.ref(self)
                    multiprocessing.util.Finalize(None, _close_at_exit, (ref,), exitpriority=0)
            return self._stub

    def info(self) -> pb.InfoReply:
        """The server's handshake reply (fetched once, waiting up to ``connect_timeout``)."""
        if self._info is None:
            info = self._handshake(self._connect())
            self._check_fingerprint(info)
            self._info = info
        return self._info

    def _handshake(self, stub: pb_grpc.TrunkStub) -> pb.InfoReply:
        """The first Info call, repeated while the server is not up for ``connect_timeout``;
        a refused connection or a host name that does not resolve fails within about a
        second. One plain call: no connectivity-polling thread (see forking.py)."""
        started = time.monotonic()
        deadline = started + self.options.connect_timeout
        delay = 0.05
        tls_checked = False
        while True:
            try:
                with forking.calls_in_flight(self.options.connect_timeout):
                    reply = stub.Info(
                        pb.InfoRequest(), **self._kw(max(deadline - time.monotonic(), 0.01))
                    )
                self.stats.calls += 1
                return reply
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                # A trunk server answered (its error class rides along): one shutting down,
                # say. Waiting out connect_timeout would only hide that answer.
                answered = isinstance(exc, grpc.Call) and any(
                    key == ERROR_METADATA_KEY for key, _ in exc.trailing_metadata() or ()
                )
                if answered or code not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise from_rpc_error(exc, method="Info", address=self.address) from exc
                details = (exc.details() if isinstance(exc, grpc.Call) else None) or ""
                reason = unreachable_reason(details)
                now = time.monotonic()
                if (
                    reason
                    and now - started >= _UNREACHABLE_GRACE
                    and not accepts_connections(self.address)
                ):
                    raise ServerUnavailable(
                        f"cannot reach a trunk server at {self.address}: {reason}. Is the "
                        f"server running, and is the address right? (gRPC: {details})"
                    ) from exc
                if not tls_checked:
                    tls_checked = self._raise_tls_refusal(exc)
                if now + delay >= deadline:
                    hint = "is it running?"
                    if self.options.root_certificates is not None and "Socket closed" in details:
                        hint = (
                            "is it running, and does it accept this client's certificate, or "
                            "its lack of one? (a server that requires another closes the "
                            "connection after the TLS handshake, as one not up yet behind a "
                            "TLS proxy does)"
                        )
                    raise ServerUnavailable(
                        f"no trunk server answered at {self.address} within "
                        f"{self.options.connect_timeout:g} s (ClientOptions.connect_timeout); "
                        f"{hint} (gRPC: {details})"
                    ) from exc
            time.sleep(delay)
            delay = min(2 * delay, 0.5)

    def _check_fingerprint(self, info: pb.InfoReply) -> None:
        """Refuse a server whose trunk is not the one ClientOptions.fingerprint describes."""
        expected = self.options.fingerprint
        if expected is None or expected == info.fingerprint:
            return
        if not info.fingerprint:
            raise TrunkMismatch(
                f"the server at {self.address} sends no trunk fingerprint (an older version?); "
                "ClientOptions.fingerprint cannot be checked: leave it None to skip the check"
            )
        differences = fingerprint_differences(expected, info.fingerprint)
        raise TrunkMismatch(
            f"the trunk served at {self.address} ({info.module_repr}, fingerprint "
            f"{fingerprint_digest(info.fingerprint)}) is not the expected one (fingerprint "
            f"{fingerprint_digest(expected)}, ClientOptions.fingerprint): "
            + ("; ".join(differences) or "they differ in layout only")
            + ". Start the server with the same model, layers and adapters as this client."
        )

    def _check_fresh(self) -> None:
        """Warn once, at this session's first training forward, when the trunk was stepped
        before this session met it (another run trained it, or the server resumed from its
        checkpoint) and the session loaded no state of its own (a resume) before."""
        if self._started:
            return
        self._started = True
        version = self.info().weights_version
        if version:
            warnings.warn(
                f"the trunk at {self.address} is at weights version {version}: other sessions "
                "have already changed it, so this run starts from their weights, not from the "
                "module's initial ones. Load your checkpoint (model.load_state_dict) or restart "
                "the server for a fresh trunk; when resuming on purpose, filter "
                "remote_autograd.SteppedTrunkWarning",
                SteppedTrunkWarning,
                stacklevel=4,
            )

    def close(self) -> None:
        """End the server session (best effort) and close the channel."""
        self._await_step()
        with self._lock:
            self._closed = self._leftovers.done = True
            channel, self._channel, self._stub = self._channel, None, None
        self._release_wakeup.set()
        thread = self._release_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=_CONTROL_TIMEOUT)  # a Release in flight finishes first
        self._frames.close()
        if channel is not None:
            # The session's contexts, gradients and optimizer go with it: no Release needed.
            self._end_session(pb_grpc.TrunkStub(channel))
            channel.close()

    def _end_session(self, stub: pb_grpc.TrunkStub) -> None:
        if self._pid != os.getpid():
            return  # a fork's copy: the session is the parent's
        try:
            with forking.calls_in_flight(_END_SESSION_TIMEOUT):
                stub.EndSession(pb.EndSessionRequest(), **self._kw(_END_SESSION_TIMEOUT))
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._flush_releases(stub)  # an older server: release the contexts at least
            # Not fatal: the server drops idle sessions on its own (ServerOptions.session_ttl).
            log.debug("EndSession on %s failed: %s", self.address, exc)

    def _raise_tls_refusal(self, exc: grpc.RpcError) -> bool:
        """Under TLS, a server certificate that does not verify (or a server whose alert
        names this client's certificate) reads to gRPC as a server that is down, for all of
        connect_timeout: one handshake of our own says so at once. Returns whether it was
        tried (something accepted the connection)."""
        if self.options.root_certificates is None:  # plain text: nothing to check
            return True
        accepts = accepts_connections(self.address)  # None: a gRPC target URI, not checked
        if not accepts:
            return accepts is None
        context = bulk_client_tls(self.options)  # built once something accepts
        verdict = None if context is None else tls_refusal(self.address, context)
        if verdict is None:
            return True
        kind, reason = verdict
        if kind == "plain":
            raise ServerUnavailable(
                f"the TLS handshake with {self.address} failed: {reason}; the port does not "
                "speak TLS (a plain-text server? leave ClientOptions.root_certificates unset "
                "for it)"
            ) from exc
        raise AuthenticationError(
            f"the TLS handshake with {self.address} failed: {reason}. The server's "
            "certificate did not verify against ClientOptions.root_certificates (and the "
            "host name), or the server refused this client's certificate"
        ) from exc

    def _kw(self, timeout: float | None = None) -> dict[str, Any]:
        return {"timeout": timeout or self.options.timeout, "metadata": self._metadata}

    def _call(self, method: str, invoke: Callable[[], T], *, retry: bool = True) -> T:
        """Run one RPC, retrying UNAVAILABLE where repeating is safe; translate errors.

        Every call retried here is idempotent on the server: Compute re-creates the context
        under the same request id, Backward carries its sequence number and Step its step
        number (a repeat is answered from the first result), GradNorm carrying a deferred
        zero_grad or clip scale its ops_id (applied once), the rest set state.
        """
        attempts = 1 + (self.options.retries if retry else 0)
        delay = self.options.retry_backoff
        attempt = 1
        while True:
            try:
                with forking.calls_in_flight(self.options.timeout):
                    result = invoke()
                self.stats.calls += 1
                return result
            except BulkBroken as exc:
                if attempt == attempts:
                    raise  # a ServerUnavailable already
                log.debug("%s to %s: %s; retry %d", method, self.address, exc, attempt)
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                if code != grpc.StatusCode.UNAVAILABLE or attempt == attempts:
                    timeout = None if method in _CONTROL_CALLS else self.options.timeout
                    error = from_rpc_error(
                        exc, method=method, address=self.address, timeout=timeout
                    )
                    raise error from exc
                log.debug(
                    "%s to %s unavailable; retry %d in %.2fs", method, self.address, attempt, delay
                )
                time.sleep(delay)
                delay = min(delay * 2, self.options.retry_backoff_max)
            attempt += 1

    # -- tensors ----------------------------------------------------------------------------

    def _exchange(
        self,
        method: str,
        header: pb.Header,
        value: Any,
        kind: str,
        device: torch.device | None = None,
    ) -> tuple[Any, pb.Header]:
        """Send one frame, receive one frame (the exchange picks unary, stream or bulk); a
        quantized reply is dequantized on ``device`` if it is a GPU (codec.Decoder.decode)."""
        info = self.info()
        stub = self._stub or self._connect()  # _connect() takes the lock: only when needed
        named = info.protocol_version >= _NAMED_VALUES  # does the server read them?
        buffers = self._encoders[kind].encode_buffers(value, named=named, staged=True)
        header.release_ids.extend(self._take_releases())
        invoke = self._frames.invoker(stub, info, method, header, buffers)
        received = self._call(method, invoke)
        self._frames.received(method, info, sum(map(len, buffers)), received.header)
        server_id = received.header.server_id
        if self.options.fingerprint and server_id and server_id != self.info().server_id:
            self._refresh_info()  # another server process answered: is it the same trunk?
        return received.decode(self._decoder, device=device), received.header

    def _open_bulk_ticket(self, timeout: float) -> tuple[bytes, str]:
        """A ticket for a new bulk connection, asked for within ``timeout`` (the opening's):
        retried while the server is unavailable (a restart), each try within what is left."""
        stub = self._connect()
        deadline = time.monotonic() + min(timeout, _CONTROL_TIMEOUT)

        def ask() -> pb.OpenBulkReply:
            left = max(deadline - time.monotonic(), 0.001)
            return stub.OpenBulk(pb.OpenBulkRequest(), **self._kw(left))

        reply = self._call("OpenBulk", ask)
        return reply.ticket, reply.connection_id

    def _refresh_info(self) -> pb.InfoReply:
        stub = self._connect()
        info = self._call("Info", lambda: stub.Info(pb.InfoRequest(), **self._kw(30)))
        self._check_fingerprint(info)  # a restarted server may serve another trunk
        self._info = info
        return self._info

    def compute(
        self,
        request_id: str,
        args: list[Any],
        kwargs: dict[str, Any],
        *,
        needs_input_grad: list[bool],
        keep_context: bool,
        training: bool,
        autocast: str = "",
        rng_seed: int | None = None,
    ) -> tuple[Any, pb.Header]:
        self._await_step()
        if keep_context:  # a training forward (an inference client is not warned)
            self._check_fresh()
        header = pb.Header(
            request_id=request_id,
            keep_context=keep_context,
            training=training,
            needs_input_grad=needs_input_grad,
            reply_quantization=self.options.activation_quantization,
            rng_seed=self._next_seed(training) if rng_seed is None else rng_seed,
            autocast_dtype=autocast,
            named_values=True,
        )
        return self._exchange("Compute", header, {"args": args, "kwargs": kwargs}, "activation")

    def recompute(
        self,
        request_id: str,
        args: list[Any],
        kwargs: dict[str, Any],
        *,
        needs_input_grad: list[bool],
        training: bool,
        seed: int,
        weights_version: int,
        weights_id: str,
        backward_seq: int,
        autocast: str = "",
    ) -> pb.Header:
        """Re-create a forward context the server lost from the inputs kept here; the server
        runs the forward again (same seed, so dropout matches) when the Backward comes."""
        self._await_step()
        header = pb.Header(
            request_id=request_id,
            recompute=True,
            training=training,
            needs_input_grad=needs_input_grad,
            rng_seed=seed,
            weights_version=weights_version,
            weights_id=weights_id,
            backward_seq=backward_seq,
            autocast_dtype=autocast,
        )
        log.info(
            "forward context %s was lost on %s; resending its inputs to recompute it",
            request_id[:12],
            self.address,
        )
        _, reply = self._exchange("Compute", header, {"args": args, "kwargs": kwargs}, "activation")
        return reply

    def _next_seed(self, training: bool = True) -> int:
        """The seed of the next forward's dropout: with options.seed, a function of the seed,
        the steps done and the forwards since zero_grad(), so a step redone from its
        zero_grad() after a fault draws the same dropout as the first try. Eval forwards
        (which draw only from layers that drop in eval mode too) count in a series of their
        own: a validation pass between steps leaves the training forwards' masks alone."""
        if self.options.seed is None:
            return 0  # the server picks one and tells us
        self._await_step()  # a Step in flight moves the counters (micro_batches slices ask here)
        with self._lock:
            if training:
                key = f"{self.options.seed}:{self._steps_done}:{self._forwards_since_zero_grad}"
                self._forwards_since_zero_grad += 1
            else:
                key = f"{self.options.seed}:{self._steps_done}:eval:{self._eval_forwards}"
                self._eval_forwards += 1
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        return (int.from_bytes(digest, "big") >> 1) or 1

    def backward(
        self,
        request_id: str,
        seq: int,
        grads: list[Any],
        needs_input_grad: list[bool],
        *,
        freeze_parameters: bool = False,
        device: torch.device | None = None,  # where the input gradients are wanted
    ) -> tuple[Any, pb.Header]:
        self._await_step()
        self.grad_events += 1
        zero, scale, carried = self._take_grad_ops_in_order()
        try:  # from the taking on: an interrupt anywhere must set the event
            header = pb.Header(
                request_id=request_id,
                backward_seq=seq,
                needs_input_grad=needs_input_grad,
                reply_quantization=self.options.gradient_quantization,
                zero_grad=zero,
                grad_scale=scale,
                freeze_parameters=freeze_parameters,
                report_nonfinite=True,  # the client decides at step() (GradScaler skips it)
            )
            value, reply = self._exchange("Backward", header, {"grads": grads}, "gradient", device)
        except BaseException:
            self._restore_grad_ops(zero, scale)
            raise
        finally:
            if carried is not None:
                carried.set()  # the others go: after this one's zero_grad, or retaking it
        with self._lock:
            if not self._grads_server_id:
                self._grads_server_id = reply.server_id
        return value, reply

    # -- contexts ---------------------------------------------------------------------------

    def schedule_release(self, request_id: str, pid: int | None = None) -> None:
        """The client's graph no longer needs this context. Safe from any thread or finalizer.
        ``pid``: the process that created it; only that one releases it (not a fork of it)."""
        if self._closed or (pid is not None and pid != os.getpid()):
            return
        self._pending_releases.append(request_id)  # list.append is atomic
        if self._release_thread is None:
            with self._lock:
                if self._release_thread is None:
                    # It holds the client weakly: a dropped client is collected (and its
                    # session ended), and the thread ends with it.
                    self._release_thread = threading.Thread(
                        target=_release_loop,
                        args=(weakref.ref(self), self._release_wakeup),
                        name="ra-release",
                        daemon=True,
                    )
                    self._release_thread.start()
        self._release_wakeup.set()

    def _take_releases(self) -> list[str]:
        # The release thread and a caller may both take: pop() is atomic, emptiness is not
        # (an id appended right after this check rides on a later call or the release thread).
        if not self._pending_releases:
            return []
        taken = []
        while True:
            try:
                taken.append(self._pending_releases.pop())
            except IndexError:
                return taken

    def _flush_releases(self, stub: pb_grpc.TrunkStub) -> None:
        ids = self._take_releases()
        if not ids:
            return
        try:
            with forking.calls_in_flight(_CONTROL_TIMEOUT):
                stub.Release(pb.ReleaseRequest(request_ids=ids), **self._kw(_CONTROL_TIMEOUT))
        except grpc.RpcError as exc:
            # Not fatal: the server expires contexts on its own (ServerOptions.context_ttl).
            log.debug("Release of %d contexts failed: %s", len(ids), exc)

    # -- gradients and the optimizer ----------------------------------------------------------

    def zero_grad_later(self, set_to_none: bool) -> None:
        """Defer zero_grad() to the next Backward, GradNorm or Step of this session."""
        with self._lock:
            self.grad_events += 1
            self._pending_zero = pb.ZERO_GRAD_TO_NONE if set_to_none else pb.ZERO_GRAD_TO_ZERO
            self._pending_scale = 1.0
            self._grads_server_id = ""  # gradients held anywhere so far no longer count
            self._forwards_since_zero_grad = self._eval_forwards = 0

    def scale_grads_later(self, scale: float) -> None:
        """Defer multiplying the session's gradients by ``scale`` (gradient clipping). A scale
        of 0 (an infinite total norm, or ``max_norm=0``) defers filling them with zeros: 0 on
        the wire means "no scale"."""
        with self._lock:
            if scale == 0.0:
                if self._pending_zero == pb.ZERO_GRAD_NONE:
                    self._pending_zero = pb.ZERO_GRAD_TO_ZERO
                self._pending_scale = 1.0
            else:
                self._pending_scale *= scale

    def _take_grad_ops(self) -> tuple[pb.ZeroGradMode, float]:
        with self._lock:
            taken = (self._pending_zero, self._pending_scale)
            self._pending_zero, self._pending_scale = pb.ZERO_GRAD_NONE, 1.0
            return taken

    def _take_grad_ops_in_order(self) -> tuple[pb.ZeroGradMode, float, threading.Event | None]:
        """A Backward's deferred zero_grad()/clip scale, taken so that the server applies
        them before the gradients of any Backward sent after them: one that carries them
        gets an event to set once answered, and Backwards of other threads wait for it (a
        failed one put them back: one of those takes them)."""
        while True:
            with self._lock:
                zero, scale = self._pending_zero, self._pending_scale
                if zero != pb.ZERO_GRAD_NONE or scale != 1.0:
                    self._pending_zero, self._pending_scale = pb.ZERO_GRAD_NONE, 1.0
                    carried = self._grad_ops_carried = threading.Event()
                    return zero, scale, carried
                carrier = self._grad_ops_carried
                if carrier is None or carrier.is_set():
                    return zero, scale, None
            carrier.wait()

    def drop_grad_ops(self) -> None:
        self._take_grad_ops()

    def settled_step(self, step: int) -> None:
        """Step ``step`` was applied (found out after its call failed)."""
        with self._lock:
            self._grads_server_id = ""
            self._steps_done = step
            self._forwards_since_zero_grad = self._eval_forwards = 0

    def _restore_grad_ops(self, zero: pb.ZeroGradMode, scale: float) -> None:
        with self._lock:
            if self._pending_zero == pb.ZERO_GRAD_NONE:
                self._pending_zero = zero
                self._pending_scale *= scale

    def apply_grad_ops(self) -> None:
        """Send a deferred zero_grad()/clip scale now (on a GradNorm), before Backwards that
        may arrive in any order (concurrent micro-batches)."""
        with self._lock:
            pending = self._pending_zero != pb.ZERO_GRAD_NONE or self._pending_scale != 1.0
        if pending:
            self.grad_norms(2.0)

    def configure_optimizer(
        self, name: str, kwargs: dict[str, Any], groups: list[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        """Create the session's optimizer; returns its param groups' resolved
        hyperparameters, each with "params": its trunk parameter names."""
        self._await_step()
        stub = self._connect()
        self.info()
        optimizer_id = secrets.token_hex(8)
        request = pb.ConfigureOptimizerRequest(
            name=name,
            options=msgpack.packb(kwargs),
            param_groups=msgpack.packb(groups) if groups else b"",
            none_in_tuples=True,
            optimizer_id=optimizer_id,
        )
        reply = self._call(
            "ConfigureOptimizer",
            lambda: stub.ConfigureOptimizer(request, **self._kw(_CONTROL_TIMEOUT)),
        )
        self._optimizer_id = optimizer_id
        if not reply.param_groups:  # a server from before param groups: one group of all
            group = msgpack.unpackb(reply.param_group, raw=False)
            return [{**group, "params": list(self.info().trainable_parameters)}]
        return msgpack.unpackb(reply.param_groups, raw=False)

    def grad_norms(self, norm_type: float) -> tuple[list[float], list[str]]:
        """Each trunk gradient's norm, and the dtype of each gradient."""
        self._await_step()
        stub = self._connect()
        # In order, as a Backward takes them: the Backwards of other threads (micro_batches
        # slices after apply_grad_ops) wait until the server has applied them.
        zero, scale, carried = self._take_grad_ops_in_order()
        try:  # from the taking on: an interrupt anywhere must set the event
            # A deferred zero_grad/scale is applied by the server on arrival: named, so that
            # a retry (a lost reply) does not apply it twice.
            ops_id = "" if zero == pb.ZERO_GRAD_NONE and scale == 1.0 else secrets.token_hex(8)
            request = pb.GradNormRequest(
                norm_type=norm_type,
                zero_grad=zero,
                grad_scale=scale,
                ops_id=ops_id,
                server_id=self._grads_server_id,
            )
            reply = self._call_carrying(
                "GradNorm", lambda: stub.GradNorm(request, **self._kw()), zero, scale
            )
        finally:
            if carried is not None:
                carried.set()
        norms = list(reply.norms)
        return norms, list(reply.dtypes) or [reply.dtype] * len(norms)  # an older server: one

    def step(self, step: int, param_groups: list[dict[str, Any]]) -> pb.StepReply:
        self._await_step()
        return self._send_step(self._step_request(step, param_groups))

    def step_in_background(
        self, step: int, param_groups: list[dict[str, Any]]
    ) -> Future[pb.StepReply]:
        """The same Step, sent from a thread of its own; its future holds the reply or error.

        The request is built here, on the caller's thread: the zero_grad() and clip scale
        deferred so far ride on it, and any made while it is in flight belong to the next
        call, as they would after a ``step()`` that had returned. Every other call of this
        session waits for the reply first (``_await_step``), so nothing overtakes the step.
        """
        self._await_step()
        request = self._step_request(step, param_groups)
        future: Future[pb.StepReply] = Future()

        def send() -> None:
            try:
                future.set_result(self._send_step(request))
            except BaseException as exc:  # noqa: BLE001 - the future carries it to the caller
                future.set_exception(exc)

        thread = threading.Thread(target=send, name="ra-step", daemon=True)
        try:
            thread.start()
        except BaseException:
            self._restore_grad_ops(request.zero, request.scale)
            raise
        self._stepping = (thread, future)
        return future

    def _await_step(self) -> None:
        """Wait for a Step sent by ``step_in_background`` (its error is its future's)."""
        stepping = self._stepping
        if stepping is not None and stepping[0] is not threading.current_thread():
            stepping[1].exception()  # blocks until the reply or the error; at once after

    def _step_request(self, step: int, param_groups: list[dict[str, Any]]) -> _StepRequest:
        self._connect()  # refuses on a closed client before the deferred work is taken
        zero, scale = self._take_grad_ops()
        message = pb.StepRequest(
            step=step,
            param_groups=msgpack.packb(param_groups),
            zero_grad=zero,
            grad_scale=scale,
            server_id=self._grads_server_id,
            optimizer_id=self._optimizer_id,
        )
        return _StepRequest(message, zero, scale)

    def _send_step(self, prepared: _StepRequest) -> pb.StepReply:
        stub = self._connect()
        request, zero, scale = prepared
        step = request.step
        reply = self._call_carrying("Step", lambda: stub.Step(request, **self._kw()), zero, scale)
        self.settled_step(step)
        if reply.waited_forwards:
            self._count_step_wait(step, reply)
        return reply

    def _count_step_wait(self, step: int, reply: pb.StepReply) -> None:
        """The Step waited for other sessions' kept forwards: counted; warned if it ran out
        the server's budget (their Backward will be refused as stale; see docs/security.md)."""
        self.stats.step_waits += 1
        self.stats.step_wait_seconds += reply.wait_seconds
        if not reply.wait_expired:
            log.debug("Step #%d waited %.3f s for other sessions", step, reply.wait_seconds)
            return
        self.stats.step_waits_expired += 1
        message = (
            f"Step #{step} waited {reply.wait_seconds:.2f} s, the server's whole step_wait "
            f"budget, for {reply.waited_forwards} forward(s) of other sessions that got no "
            "Backward, then stepped anyway (another client between forward and backward, or "
            "gone); counted in TrunkClient.stats.step_waits_expired"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _call_carrying(
        self, method: str, invoke: Callable[[], Any], zero: Any, scale: float
    ) -> Any:
        """A call that carries the deferred zero_grad/clip scale: put back if it fails. A
        refusal for gradients this server does not hold (StaleContext: a restart lost them)
        also stops checking them: the step is redone from its forward, on this server."""
        try:
            return self._call(method, invoke)
        except StaleContext:
            self._restore_grad_ops(zero, scale)
            self.forget_gradients()
            raise
        except BaseException:
            self._restore_grad_ops(zero, scale)
            raise

    def forget_gradients(self) -> None:
        """The step in progress is abandoned (its gradients were lost): stop checking them."""
        with self._lock:
            self._grads_server_id = ""

    def checkpoint(self) -> pb.CheckpointReply:
        """Ask the server to save its checkpoint now."""
        self._await_step()
        stub = self._connect()
        return self._call(
            "Checkpoint",
            lambda: stub.Checkpoint(pb.CheckpointRequest(), **self._kw(_CONTROL_TIMEOUT)),
        )

    def get_state(
        self, *, parameters: bool, optimizer: bool, buffers: bool = False
    ) -> dict[str, Any]:
        self._await_step()
        stub = self._connect()
        request = pb.GetStateRequest(parameters=parameters, optimizer=optimizer, buffers=buffers)
        received = self._call(
            "GetState",
            lambda: frames.receive(stub.GetState(request, **self._kw()), self.options.limits),
        )
        # Ordinary tensors, as a local module's state_dict() gives under inference_mode too:
        # an inference tensor cannot be trained after load_state_dict(..., assign=True).
        with torch.inference_mode(False):
            return received.decode(self._decoder)

    def load_state(self, state: dict[str, Any]) -> pb.LoadStateReply:
        self._await_step()
        stub = self._connect()
        info = self.info()
        buffers = codec.Encoder(compression=self.options.compression).encode_buffers(state)
        self._started = True  # a resume: the weights are this session's own from here
        return self._call(
            "LoadState",
            lambda: stub.LoadState(
                frames.frame_messages(pb.Header(), buffers, info.stream_chunk_bytes), **self._kw()
            ),
        )


def _weakly(method: Callable[..., T]) -> Callable[..., T]:
    """``method`` (bound to a client), callable without keeping the client alive."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any, **kwargs: Any) -> T:
        bound = ref()
        if bound is None:  # only its own exchange calls it, so the client is in use
            raise ReferenceError("the TrunkClient was garbage collected")
        return bound(*args, **kwargs)

    return call


def _release_loop(ref: weakref.ref[TrunkClient], wakeup: threading.Event) -> None:
    """A client's release thread: Release RPCs for contexts no Compute carried away soon. It
    ends within _IDLE_CHECK seconds of its client being collected (the client's finalizer
    takes no lock, so it does not wake it)."""
    while True:
        if not wakeup.wait(_IDLE_CHECK):
            if ref() is None:
                return
            continue
        wakeup.clear()
        time.sleep(_RELEASE_DELAY)  # give the next Compute a chance to carry them
        client = ref()
        if client is None or client._closed:
            return
        stub = client._stub
        if stub is not None and client._pending_releases:
            client._flush_releases(stub)
        del client  # not held while waiting


class _Leftovers:
    """What ends a client's session when the client is collected without close(): the
    channel and metadata of that session, without the client itself."""

    def __init__(self, client: TrunkClient) -> None:
        self.take(client)

    def take(self, client: TrunkClient) -> None:
        """Stand for ``client``'s session in this process (again after a fork)."""
        # Not its bulk connections: the frame exchange holds the client's bound methods, so
        # holding it here would keep the client from ever being collected. Their sockets
        # close when the exchange is collected with the client.
        self.channel: grpc.Channel | None = client._channel
        self.metadata = client._metadata
        self.pid = os.getpid()
        self.done = False  # closed, or already handed to the ender


def _end_dropped_session(leftovers: _Leftovers) -> None:
    """The finalizer of a client collected without close(). It runs wherever the collector
    happens to run, even in a thread that holds some lock of ours, so it only puts the
    session on a queue (SimpleQueue.put is safe there) for a thread of its own to end."""
    if leftovers.done or leftovers.pid != os.getpid():  # closed, or a fork's copy
        return
    leftovers.done = True
    _DROPPED.put(leftovers)
    with _ENDER_LOCK:
        global _ender
        if _ender is None or not _ender.is_alive():
            ender = threading.Thread(target=_end_dropped_sessions, name="ra-ender", daemon=True)
            try:
                ender.start()
            except RuntimeError:  # the interpreter is shutting down: session_ttl ends it
                return
            _ender = ender


def _end_dropped_sessions() -> None:
    while True:
        leftovers = _DROPPED.get()
        channel = leftovers.channel
        if leftovers.pid != os.getpid():
            continue  # queued in the parent before this process forked: the parent's
        if channel is None:
            continue  # it never called the server
        try:
            with forking.calls_in_flight(_END_SESSION_TIMEOUT):
                pb_grpc.TrunkStub(channel).EndSession(
                    pb.EndSessionRequest(),
                    timeout=_END_SESSION_TIMEOUT,
                    metadata=leftovers.metadata,
                )
        except grpc.RpcError as exc:  # the server drops idle sessions on its own
            log.debug("EndSession of a dropped client failed: %s", exc)
        channel.close()


_DROPPED: queue.SimpleQueue[_Leftovers] = queue.SimpleQueue()
_ENDER_LOCK = threading.RLock()  # a collection inside the hold may run the finalizer again
_ender: threading.Thread | None = None


def _new_ender_after_fork() -> None:
    # A fork while another thread held the lock would leave it held for good in the child;
    # the parent's queue and thread are the parent's.
    global _DROPPED, _ENDER_LOCK, _ender
    _DROPPED, _ENDER_LOCK, _ender = queue.SimpleQueue(), threading.RLock(), None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_ender_after_fork)


# Clients alive in this process: at exit each ends its server session (close()), so short
# scripts do not hold sessions until the server's session_ttl.
_LIVE: weakref.WeakSet[TrunkClient] = weakref.WeakSet()


def _close_at_exit(ref: weakref.ref[TrunkClient]) -> None:
    client = ref()
    if client is not None and not client._closed:
        try:
            client.close()  # sends nothing if this process never opened a session
        except Exception as exc:  # noqa: BLE001 - exit goes on
            log.debug("closing the client of %s at exit failed: %s", client.address, exc)


@atexit.register
def _close_live_clients() -> None:
    for client in list(_LIVE):
        if not client._closed:
            try:
                client.close()
            except Exception as exc:  # noqa: BLE001 - exit goes on
                log.debug("closing the client of %s at exit failed: %s", client.address, exc)
