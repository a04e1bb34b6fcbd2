"""Bearer tokens: who a caller is, and refusing one without a token before it takes a thread.

gRPC-Python's server gives a call a worker thread (``ServerOptions.max_workers`` of them) and,
for a method that takes one message, keeps it there until that message has arrived. A caller
that sends a call's headers and never its message would hold the thread for as long as it
likes; ``max_workers`` such calls would stall every client. :class:`TokenGate` is a server
interceptor: interceptors run on the server's own thread, with the call's headers, before any
worker is taken, so a call without a known token is answered ``UNAUTHENTICATED`` by a handler
that reads nothing and returns at once. Health checks stay open (load balancers probe without
a token); reflection, like the Trunk service, needs one.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc

from .errors import ERROR_METADATA_KEY
from .transport import AUTH_METADATA_KEY

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
    worker thread (health checks pass). Without tokens it lets everything through."""

    def __init__(self, tokens: BearerTokens) -> None:
        self.tokens = tokens

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if not self.tokens or method.startswith(_OPEN):
            return continuation(handler_call_details)
        if self.tokens.identity(handler_call_details.invocation_metadata) is None:
            return _REFUSED
        return continuation(handler_call_details)
