"""Bearer tokens: who a caller is, and on which threads its calls run.

gRPC-Python's server gives a call a worker thread and, for a method that takes one message,
keeps it there until that message has arrived. A caller that sends a call's headers and never
its message holds the thread for as long as it likes, and as many such calls as there are
threads stall every client. :class:`TokenGate` is a server interceptor: interceptors run on
the server's own thread, with the call's headers, before any worker is taken. So:

- a call without a known token is answered ``UNAUTHENTICATED`` by a handler that reads nothing
  and returns at once;
- each token's calls run on a thread pool of that token's own
  (``ServerOptions.token_workers`` threads, by default as many as ``max_workers``; more calls
  wait their turn there): a token's calls held open take no other token's threads;
- health checks stay open (load balancers probe without a token) and run on the server's
  ``max_workers`` threads, with the refusals: health calls held open hold no token's threads.
  Reflection, like the Trunk service, needs a token.

gRPC picks a call's pool from its behavior's ``experimental_thread_pool`` attribute, before the
call takes a thread (grpc/_server.py). Without tokens, every call runs on the server's
``max_workers`` threads and nothing is refused here. Under mutual TLS without tokens the
client's certificate is not known to an interceptor, so its calls share those threads too
(docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from .drain import behavior_kind
from .errors import ERROR_METADATA_KEY
from .transport import AUTH_METADATA_KEY, torch_threads

__all__ = ["REFUSAL", "BearerTokens", "TokenGate"]

_OPEN = ("/grpc.health.v1.Health/",)  # methods any caller may call
REFUSAL = "missing or unknown bearer token: pass ClientOptions(token=...)"


class BearerTokens:
    """The tokens a server accepts, each known by a fingerprint (its identity's name)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self._known = {hashlib.sha256(t.encode()).hexdigest()[:16]: t.encode() for t in tokens}

    def __bool__(self) -> bool:
        return bool(self._known)

    def identity(self, metadata: Iterable[tuple[str, Any]]) -> str | None:
        """The fingerprint of the token the call's ``authorization: Bearer ...`` header
        holds, None without a known one (every token compared in constant time)."""
        offered = str(dict(metadata).get(AUTH_METADATA_KEY, ""))
        scheme, _, token = offered.partition(" ")
        matches = [
            name
            for name, known in self._known.items()
            if hmac.compare_digest(token.encode(), known)
        ]
        return matches[0] if scheme.lower() == "bearer" and matches else None


def _refuse(request_iterator: Any, context: grpc.ServicerContext) -> None:
    # A request stream, whatever the method takes: nothing is read, so nothing is waited for.
    context.set_trailing_metadata(((ERROR_METADATA_KEY, "AuthenticationError"),))
    context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)


_REFUSED = grpc.stream_unary_rpc_method_handler(_refuse)


class TokenGate(grpc.ServerInterceptor):
    """Answers calls without a known bearer token ``UNAUTHENTICATED`` before they take a
    thread, and runs each token's calls on ``token_workers`` threads of its own (see the
    module docstring). Without tokens it lets everything through, on the server's threads."""

    def __init__(self, tokens: BearerTokens, token_workers: int = 16) -> None:
        self.tokens = tokens
        self.token_workers = token_workers
        self._pools: dict[str, ThreadPoolExecutor] = {}  # token name -> its threads
        self._lock = threading.Lock()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if not self.tokens or handler_call_details.method.startswith(_OPEN):
            return continuation(handler_call_details)
        name = self.tokens.identity(handler_call_details.invocation_metadata)
        if name is None:
            return _REFUSED
        handler = continuation(handler_call_details)
        return None if handler is None else _on(handler, self._pool(name))

    def close(self) -> None:
        """End the pools' threads (the gRPC server has stopped: no call is left on them)."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)

    def _pool(self, name: str) -> ThreadPoolExecutor:
        with self._lock:
            pool = self._pools.get(name)
            if pool is None:  # at most one per configured token
                pool = ThreadPoolExecutor(
                    self.token_workers,
                    thread_name_prefix=f"ra-{name[:8]}",
                    initializer=torch_threads,
                )
                self._pools[name] = pool
            return pool


def _on(handler: grpc.RpcMethodHandler, pool: ThreadPoolExecutor) -> grpc.RpcMethodHandler:
    """``handler`` with its behavior run on ``pool``'s threads."""
    kind = behavior_kind(handler)
    behavior = getattr(handler, kind)

    def run(request: Any, context: grpc.ServicerContext) -> Any:
        return behavior(request, context)

    run.experimental_thread_pool = pool  # type: ignore[attr-defined]
    return handler._replace(**{kind: run})  # type: ignore[attr-defined]
