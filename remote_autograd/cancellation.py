"""The server stops work whose caller has gone (a client past its deadline, or cancelled).

gRPC marks a call inactive when its client gives up, but a handler thread running the trunk
does not notice and would go on for as long as the forward takes, holding the trunk lock:
the same client's next call would then wait behind its own abandoned one and time out too.

So the service runs each Compute and Backward inside :func:`watching`, which ties the call's
gRPC context to the handler thread, and :func:`install` puts a forward pre-hook on every
submodule of the trunk that raises :class:`CallerGone` once the call is inactive: the trunk
stops at the next layer boundary, and the call stops before the trunk runs at all (the root
module's hook) if its caller left while it waited for the trunk lock. The hook costs one
thread-local lookup per layer; threads that are not serving a call (a local model in the
same process) never raise.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import torch

from .errors import TransportError

__all__ = ["CallerGone", "check", "install", "suspended", "watching"]

_LOCAL = threading.local()


class CallerGone(TransportError):
    """The client of the call this thread serves cancelled it or passed its deadline."""

    status = grpc.StatusCode.CANCELLED


@contextlib.contextmanager
def watching(context: grpc.ServicerContext) -> Iterator[None]:
    """Serve one call: :func:`check` raises once its caller has gone."""
    gone = threading.Event()
    if not context.add_callback(gone.set):  # False: the call has ended already
        gone.set()
    with _serving(gone):
        yield


def suspended() -> contextlib.AbstractContextManager[None]:
    """Run to the end whatever the caller does: work that other processes take part in layer
    by layer (a sharded trunk's all-gathers) may not stop on one of them alone."""
    return _serving(None)


@contextlib.contextmanager
def _serving(gone: threading.Event | None) -> Iterator[None]:
    """This thread serves a call whose caller leaving sets ``gone`` (None: no call)."""
    previous = getattr(_LOCAL, "gone", None)
    _LOCAL.gone = gone
    try:
        yield
    finally:
        _LOCAL.gone = previous


def check(where: str = "the trunk") -> None:
    """Raise :class:`CallerGone` if the call this thread serves has been abandoned."""
    gone = getattr(_LOCAL, "gone", None)
    if gone is not None and gone.is_set():
        raise CallerGone(f"the client left (deadline passed or cancelled): {where} stopped")


def install(module: torch.nn.Module) -> None:
    """Make ``module`` stop between layers when the call running it has been abandoned."""
    for name, submodule in module.named_modules():
        if getattr(submodule, "_remote_autograd_cancellable", False):
            continue  # installed already (an adapter engine's base, before it restores)
        try:
            submodule.register_forward_pre_hook(_hook(name or type(module).__name__))
        except RuntimeError:  # a TorchScript module takes no hooks: it runs to its end
            continue
        submodule._remote_autograd_cancellable = True


def _hook(name: str) -> Any:
    def pre_hook(module: torch.nn.Module, args: Any) -> None:
        check(f"the trunk, before {name}")

    return pre_hook
