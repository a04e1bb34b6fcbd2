"""The exception tree of remote_autograd.

Every error the library raises derives from :class:`RemoteAutogradError`::

    RemoteAutogradError
    ├── CodecError            a frame or tensor could not be encoded or decoded (also ValueError)
    ├── TransportError        the call did not complete: server down, deadline, cancelled
    │   ├── ServerUnavailable     UNAVAILABLE: nobody answered at the address
    │   └── DeadlineExceeded      DEADLINE_EXCEEDED: no answer within the call's deadline
    └── RemoteError           the server answered with an error
        ├── InvalidRequest        INVALID_ARGUMENT: the server refused what was sent
        ├── LimitExceeded         RESOURCE_EXHAUSTED: a configured limit was hit (named)
        ├── ContextNotFound       NOT_FOUND: Backward on a context that expired or never was
        ├── StaleContext          FAILED_PRECONDITION: state moved on (weights, step numbers)
        ├── NotConfigured         FAILED_PRECONDITION: a call needs setup first (the optimizer,
        │                         a checkpoint path)
        ├── AuthenticationError   UNAUTHENTICATED / PERMISSION_DENIED
        └── TrunkError            INTERNAL / UNKNOWN / UNIMPLEMENTED: the trunk raised
    TrunkMismatch         the server's trunk is not the one the client was given the
                          fingerprint of (ClientOptions.fingerprint); also ValueError

One warning: :class:`SteppedTrunkWarning` (a UserWarning), when a client starts training a trunk
that another session has already stepped.

``grpc.RpcError`` is translated in exactly one place, :func:`from_rpc_error`, which the client
calls for every failed RPC. The server sends the class name in the ``ra-error`` trailing metadata
so two errors that share a status code stay distinct.
"""

from __future__ import annotations

import grpc

__all__ = [
    "AuthenticationError",
    "CodecError",
    "ContextNotFound",
    "DeadlineExceeded",
    "InvalidRequest",
    "LimitExceeded",
    "NotConfigured",
    "RemoteAutogradError",
    "RemoteError",
    "ServerUnavailable",
    "StaleContext",
    "SteppedTrunkWarning",
    "TransportError",
    "TrunkError",
    "TrunkMismatch",
    "from_rpc_error",
]

ERROR_METADATA_KEY = "ra-error"

# Why a session that did create its optimizer holds none, and what to do (NotConfigured's
# text, on the server and on the client).
SESSION_GONE = (
    "the server no longer holds this session (idle past session_ttl, or the server restarted "
    "without a checkpoint), and its optimizer state is lost: create the RemoteOptimizer "
    "again, or load your last saved state_dict into a new one"
)


class RemoteAutogradError(Exception):
    """Base class of every error raised by remote_autograd."""


class CodecError(RemoteAutogradError, ValueError):
    """A frame or a tensor could not be encoded or decoded (malformed, lying, or over a limit)."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class TransportError(RemoteAutogradError):
    """The call did not complete; the server may never have seen it."""

    status: grpc.StatusCode | None = None

    def __init__(self, message: str, *, status: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class ServerUnavailable(TransportError):
    status = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(TransportError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class RemoteError(RemoteAutogradError):
    """The server answered the call with an error."""

    status = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, status: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class InvalidRequest(RemoteError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class LimitExceeded(RemoteError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class ContextNotFound(RemoteError):
    status = grpc.StatusCode.NOT_FOUND


class StaleContext(RemoteError):
    status = grpc.StatusCode.FAILED_PRECONDITION


class NotConfigured(RemoteError):
    """The call needs something set up first: a RemoteOptimizer before Step, a checkpoint
    path on the server before Checkpoint."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class AuthenticationError(RemoteError):
    status = grpc.StatusCode.UNAUTHENTICATED


class TrunkError(RemoteError):
    status = grpc.StatusCode.INTERNAL


class TrunkMismatch(RemoteAutogradError, ValueError):
    """The server's trunk differs from the one the client expects (ClientOptions.fingerprint):
    another model, other layers, other adapters. Nothing was computed."""


class SteppedTrunkWarning(UserWarning):
    """A client starts from a trunk whose weights other sessions have already changed (a run
    against a server that trained before); load a checkpoint or restart the server for a fresh
    trunk, or filter this warning when resuming on purpose."""


_BY_NAME: dict[str, type[RemoteAutogradError]] = {
    cls.__name__: cls
    for cls in (
        CodecError,
        InvalidRequest,
        LimitExceeded,
        ContextNotFound,
        StaleContext,
        NotConfigured,
        AuthenticationError,
        TrunkError,
    )
}

_BY_STATUS: dict[grpc.StatusCode, type[RemoteAutogradError]] = {
    grpc.StatusCode.UNAVAILABLE: ServerUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: TransportError,
    grpc.StatusCode.ABORTED: TransportError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitExceeded,
    grpc.StatusCode.NOT_FOUND: ContextNotFound,
    grpc.StatusCode.ALREADY_EXISTS: StaleContext,
    grpc.StatusCode.FAILED_PRECONDITION: StaleContext,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
    grpc.StatusCode.INTERNAL: TrunkError,
    grpc.StatusCode.UNKNOWN: TrunkError,
    grpc.StatusCode.UNIMPLEMENTED: TrunkError,
    grpc.StatusCode.DATA_LOSS: TrunkError,
}


def named(name: str | None) -> type[RemoteAutogradError] | None:
    """The class of the library's errors that ``name`` names (the server's ``ra-error``
    metadata, a follower rank's reply), or None."""
    return _BY_NAME.get(name or "")


def from_rpc_error(
    exc: grpc.RpcError, *, method: str, address: str, timeout: float | None = None
) -> RemoteAutogradError:
    """Translate a failed gRPC call into the exception tree (the only place this is done);
    ``timeout``: the call's deadline, when it was ClientOptions.timeout."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
    name = None
    if isinstance(exc, grpc.Call):
        for key, value in exc.trailing_metadata() or ():
            if key == ERROR_METADATA_KEY:
                name = value
    cls = named(name) or _BY_STATUS.get(code, RemoteError)
    if cls is TransportError or issubclass(cls, TransportError):
        late = "raise ClientOptions.timeout for slow trunks or slow links"
        if timeout is not None:
            late = f"no answer within ClientOptions.timeout={timeout:g} s; {late}"
        hint = {
            grpc.StatusCode.UNAVAILABLE: "is the server running and reachable?",
            grpc.StatusCode.DEADLINE_EXCEEDED: late,
        }.get(code, "")
        message = f"{method} to {address} failed ({code.name}): {details}"
        return cls(f"{message}; {hint}" if hint else message, status=code)
    message = f"{method} on {address}: {details}"
    if cls is CodecError:
        return CodecError(message)
    return cls(message, status=code)  # type: ignore[call-arg]
