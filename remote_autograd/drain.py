"""Draining the Trunk service's calls in flight at a graceful shutdown.

``grpc.Server.stop(grace)`` stops taking every RPC at once, health checks included, so a load
balancer probing during the grace period sees connection errors, not ``NOT_SERVING``. Instead,
:class:`CallDrain` (a server interceptor) counts the Trunk calls in flight; at shutdown it
refuses new Trunk calls with ``UNAVAILABLE`` (clients retry those), waits for the calls in
flight, and only then the gRPC server is stopped. Health and reflection keep answering
meanwhile, health saying ``NOT_SERVING``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from .errors import ERROR_METADATA_KEY

__all__ = ["CallDrain", "behavior_kind"]


def behavior_kind(handler: grpc.RpcMethodHandler) -> str:
    """The field of ``handler`` that holds its behavior: ``unary_unary``, ``stream_unary``..."""
    return ("stream" if handler.request_streaming else "unary") + (
        "_stream" if handler.response_streaming else "_unary"
    )


class CallDrain(grpc.ServerInterceptor):
    """Counts calls in flight of the methods under ``prefix``; :meth:`close` refuses new ones
    and :meth:`wait` waits for the others to finish."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix  # "/package.Service/"
        self._cond = threading.Condition()
        self._inflight = 0
        self._closed = False

    @property
    def inflight(self) -> int:
        return self._inflight

    def close(self) -> None:
        with self._cond:
            self._closed = True

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the calls in flight; True if none is left."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def _enter(self, context: grpc.ServicerContext) -> None:
        with self._cond:
            if not self._closed:
                self._inflight += 1
                return
        context.set_trailing_metadata(((ERROR_METADATA_KEY, "ServerUnavailable"),))
        context.abort(grpc.StatusCode.UNAVAILABLE, "the trunk server is shutting down")

    def _exit(self) -> None:
        with self._cond:
            self._inflight -= 1
            if not self._inflight:
                self._cond.notify_all()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self.prefix):
            return handler
        kind = behavior_kind(handler)
        return handler._replace(**{kind: self._counted(getattr(handler, kind))})  # type: ignore[attr-defined]

    def _counted(self, behavior: Callable) -> Callable:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            self._enter(context)
            # Ends when gRPC has sent the status (a streamed reply included), or the call was
            # cancelled: not when a reply generator happens to be collected.
            if not context.add_callback(self._exit):
                self._exit()
            return behavior(request, context)

        return call
