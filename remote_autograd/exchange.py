"""How one call's frames travel between client and server: one gRPC message, a stream of gRPC
messages, or the bulk channel. The client-side mirror of the service's frame moving.

:class:`FrameExchange` chooses the way for each call and returns the call as a function
``invoke() -> frames.Received``, which :class:`~remote_autograd.client.TrunkClient` runs under
its retries: the exchange knows nothing of ids, sessions or retries, and the codec nothing of
either.

- **unary**: the frame fits one message (``InfoReply.unary_payload_bytes``) and the last
  reply of this method did too;
- **stream**: ``ComputeStream`` / ``BackwardStream``, the frame in ``stream_chunk_bytes`` chunks;
- **bulk**: frames of ``ClientOptions.bulk_min_bytes`` or more (or whose reply was that large)
  on a TCP connection beside the unary call (bulk.py), when the server offers one. A port
  that cannot be reached is asked for again (a restarted server listens on a new one); if the
  new one cannot be reached either, large frames use gRPC streams for
  ``ClientOptions.bulk_retry_interval`` seconds before the channel is tried again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from . import frames
from ._proto import remote_autograd_pb2 as pb
from ._proto import remote_autograd_pb2_grpc as pb_grpc
from .addresses import bulk_host
from .bulk import BulkClient
from .errors import DeadlineExceeded, LimitExceeded, RemoteError
from .options import ClientOptions
from .transport import bulk_client_tls, fits_unary

__all__ = ["CallStats", "FrameExchange"]

log = logging.getLogger(__name__)


class CallStats:
    """Bytes and seconds spent by one client; the training command shows these."""

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.calls = 0
        self.bulk_calls = 0  # calls whose frames went over the bulk channel
        self.server_compute_seconds = 0.0
        self.server_codec_seconds = 0.0
        self.step_waits = 0  # Steps that waited for other sessions' forwards (StepReply)
        self.step_wait_seconds = 0.0  # seconds they waited, together
        self.step_waits_expired = 0  # of them, those that ran out the server's step_wait budget

    def as_dict(self) -> dict[str, float]:
        return dict(vars(self))


class FrameExchange:
    """Chooses how each call's frames travel, and keeps the bulk channel of one server."""

    def __init__(
        self,
        address: str,
        options: ClientOptions,
        stats: CallStats,
        *,
        kw: Callable[..., dict[str, Any]],
        open_ticket: Callable[[float], tuple[bytes, str]],
        refresh_info: Callable[[], pb.InfoReply],
    ) -> None:
        self.address = address
        self.options = options
        self.stats = stats
        self._kw = kw  # timeout and metadata of a call (the given timeout, or the options')
        self._open_ticket = open_ticket  # an OpenBulk RPC
        self._refresh_info = refresh_info  # an Info RPC (a restarted server's new bulk port)
        self._lock = threading.Lock()
        self._big_reply: dict[str, bool] = {}
        self._bulk: BulkClient | None = None
        self._bulk_off = not options.bulk
        self._bulk_retry_at = 0.0  # monotonic time before which the bulk channel is not tried

    def invoker(
        self,
        stub: pb_grpc.TrunkStub,
        info: pb.InfoReply,
        method: str,
        header: pb.Header,
        buffers: list,
    ) -> Callable[[], frames.Received]:
        """The call ``method`` sending ``header`` and ``buffers``, ready to run (and rerun)."""
        size = sum(map(len, buffers))
        big_reply = self._big_reply.get(method, False)
        streamed = not fits_unary(size, info.unary_payload_bytes) or big_reply
        bulk = None
        if size >= self.options.bulk_min_bytes or big_reply:
            bulk = self._bulk_client(info)
        plain = self._plain_invoker(stub, info, method, header, buffers, streamed)
        if bulk is None:
            return plain
        rpc = getattr(stub, method)

        def invoke() -> frames.Received:
            # One deadline for the whole call, a new bulk connection's opening included (a
            # firewalled port, or a hung server's OpenBulk, once stalled a call past it).
            timeout = self.options.timeout
            deadline = None if timeout is None else time.monotonic() + timeout
            # Half of it at most: the other half is left for gRPC messages if it fails.
            connection = self._bulk_connection(bulk, None if timeout is None else timeout / 2)
            left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            if connection is None:
                return plain(left)
            received = bulk.call(connection, rpc, header, buffers, **self._kw(left))
            self.stats.bulk_calls += 1
            return received

        return invoke

    def received(self, method: str, info: pb.InfoReply, sent: int, reply: pb.Header) -> None:
        """Account for a completed call, and remember whether its reply was large."""
        self._big_reply[method] = not fits_unary(reply.payload_bytes, info.unary_payload_bytes)
        self.stats.bytes_sent += sent
        self.stats.bytes_received += reply.payload_bytes
        self.stats.server_compute_seconds += reply.compute_seconds
        self.stats.server_codec_seconds += reply.codec_seconds

    def close(self) -> None:
        if self._bulk is not None:
            self._bulk.close()

    def _plain_invoker(
        self,
        stub: pb_grpc.TrunkStub,
        info: pb.InfoReply,
        method: str,
        header: pb.Header,
        buffers: list,
        streamed: bool,
    ) -> Callable[..., frames.Received]:
        """The call in gRPC messages: one unary message, or a stream of chunks; given a
        ``timeout``, within it (what a bulk call's deadline has left), else the options'."""
        limits = self.options.limits
        if streamed:
            stream = getattr(stub, method + "Stream")

            def invoke_stream(timeout: float | None = None) -> frames.Received:
                messages = frames.frame_messages(header, buffers, info.stream_chunk_bytes)
                return frames.receive(stream(messages, **self._kw(timeout)), limits)

            return invoke_stream
        unary = getattr(stub, method)
        message: list[pb.Frame] = []  # made on the first try: a bulk call may never need it

        def invoke_unary(timeout: float | None = None) -> frames.Received:
            if not message:
                message.append(frames.unary_message(header, buffers))
            return frames.receive_unary(unary(message[0], **self._kw(timeout)), limits)

        return invoke_unary

    def _bulk_client(self, info: pb.InfoReply) -> BulkClient | None:
        """The bulk channel to this server, when it offers one and it can be used."""
        if self._bulk_off or time.monotonic() < self._bulk_retry_at:
            return None
        if self._bulk is None:
            host = bulk_host(self.address)
            if not info.bulk_port or host is None:  # none offered, or not a TCP address
                self._bulk_off = True
                return None
            with self._lock:
                if self._bulk is None:
                    self._bulk = BulkClient(
                        host,
                        info.bulk_port,
                        self._open_ticket,
                        limits=self.options.limits,
                        connect_timeout=self.options.bulk_connect_timeout,
                        tls=bulk_client_tls(self.options),
                        server_hostname=host,
                    )
        return self._bulk

    def _bulk_connection(self, bulk: BulkClient, timeout: float | None) -> Any:
        """A connection of the bulk channel (a new one open within ``timeout``, at most
        ``bulk_connect_timeout``), or None: this call goes in gRPC messages."""
        try:
            return bulk.take(timeout)
        except LimitExceeded as exc:
            log.debug("no bulk connection for now (%s); this call uses gRPC messages", exc)
            return None
        except (TimeoutError, DeadlineExceeded) as exc:
            # Not a restarted server's new port (that refuses at once): a port that drops
            # what is sent to it, or a server that does not answer. Asking it for its Info
            # would wait again; the call itself, in gRPC messages, finds out which.
            return self._unreachable(exc)
        except OSError as exc:
            reason: Exception = exc
            info = self._refresh_info()
        except RemoteError as exc:  # OpenBulk refused: a server restarted without a channel?
            info = self._refresh_info()
            if info.bulk_port:
                raise  # no: the refusal is the caller's to see
            reason = exc
        if info.bulk_port and info.bulk_port != bulk.port:
            bulk.port = info.bulk_port
            try:
                return bulk.take(timeout)
            except OSError as exc:
                reason = exc
        return self._unreachable(reason)

    def _unreachable(self, reason: Exception) -> None:
        """Large frames go in gRPC messages for a while: the bulk channel failed (``reason``)."""
        log.warning(
            "the bulk channel of %s cannot be reached (%s); large frames use gRPC streams "
            "for %g s (ClientOptions.bulk_retry_interval), then it is tried again",
            self.address,
            reason,
            self.options.bulk_retry_interval,
        )
        self._bulk_retry_at = time.monotonic() + self.options.bulk_retry_interval
