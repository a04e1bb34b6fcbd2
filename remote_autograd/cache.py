"""Server-side state: forward contexts awaiting Backward, and client sessions.

Both tables are bounded (count, bytes, age) and thread-safe. A context belongs to one session;
looking it up from another session is the same as looking up an id that never existed. One
session cannot hold more than ``max_session_contexts`` (its own oldest go first), so a client
that never releases cannot push every other client's contexts out.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ._proto.remote_autograd_pb2 import ZERO_GRAD_TO_NONE, ZERO_GRAD_TO_ZERO
from .errors import ContextNotFound, InvalidRequest, LimitExceeded

__all__ = ["ContextCache", "ForwardContext", "Session", "SessionTable", "StepTurns"]

_FORGET_REASONS = 4096  # remember why this many recent ids went away, for error messages


@dataclass(eq=False)
class ForwardContext:
    """A cached forward: the leaves it started from and the outputs it reached.

    ``outputs`` is None for a context kept for recompute (ServerOptions.recompute, or one the
    client re-created after the server lost it): Backward runs the forward again from
    ``inputs`` with the same ``seed``, then discards the graph.
    """

    request_id: str
    session: str
    inputs: list[torch.Tensor]  # leaves on the server device (requires_grad where asked)
    input_dtypes: list[torch.dtype]  # dtypes the client sent (gradients go back in these)
    outputs: list[torch.Tensor] | None  # the trunk's tensor outputs, attached to the graph
    nbytes: int  # bytes held by inputs and outputs
    weights_version: int  # optimizer steps applied when the forward ran
    seed: int = 0  # RNG seed of the forward (dropout), so a recompute matches it
    template: Any = None  # where the inputs go in (args, kwargs), for a recompute
    training: bool = True  # the trunk's mode during the forward, for a recompute
    backward_seq: int = 0  # backwards answered so far
    last_reply: Any = None  # the last Backward's reply, for a retried call
    lease: int = -1  # StepTurns epoch of the lease this context holds (-1: none)
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class ContextCache:
    """Forward contexts by request id, bounded by count, bytes and idle age (LRU eviction)."""

    def __init__(
        self,
        *,
        max_contexts: int,
        max_bytes: int,
        ttl: float,
        max_per_session: int | None = None,
        on_drop: Callable[[ForwardContext], None] = lambda context: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_drop = on_drop
        self.max_contexts = max_contexts
        self.max_per_session = max_per_session or max_contexts
        self._per_session: dict[str, int] = {}
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._items: OrderedDict[str, ForwardContext] = OrderedDict()
        self._nbytes = 0
        self._gone: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def put(self, context: ForwardContext) -> None:
        if context.nbytes > self.max_bytes:
            raise LimitExceeded(
                f"forward context of {context.nbytes} bytes exceeds max_context_bytes="
                f"{self.max_bytes}"
            )
        with self._lock:
            self._expire_locked()
            old = self._items.pop(context.request_id, None)
            if old is not None:
                self._drop_locked(old, "replaced by a new forward with the same id")
            if self._per_session.get(context.session, 0) >= self.max_per_session:
                oldest = next(c for c in self._items.values() if c.session == context.session)
                del self._items[oldest.request_id]
                self._drop_locked(
                    oldest,
                    f"evicted to stay under max_session_contexts={self.max_per_session}",
                )
            while self._items and (
                len(self._items) >= self.max_contexts
                or self._nbytes + context.nbytes > self.max_bytes
            ):
                _, evicted = self._items.popitem(last=False)
                self._drop_locked(
                    evicted,
                    f"evicted to stay under max_contexts={self.max_contexts} / "
                    f"max_context_bytes={self.max_bytes}",
                )
            context.last_used = self._clock()
            self._items[context.request_id] = context
            self._nbytes += context.nbytes
            self._per_session[context.session] = self._per_session.get(context.session, 0) + 1

    def get(self, session: str, request_id: str, *, method: str = "Backward") -> ForwardContext:
        with self._lock:
            self._expire_locked()
            context = self._items.get(request_id)
            if context is None or context.session != session:
                reason = self._gone.get(request_id) if context is None else None
                raise ContextNotFound(
                    f"{method} for request {request_id[:12]}: no forward context ("
                    + (reason or f"expired after {self.ttl:g} s idle, released, or never created")
                    + ")"
                )
            context.last_used = self._clock()
            self._items.move_to_end(request_id)
            return context

    def release(self, session: str, request_ids: list[str]) -> int:
        released = 0
        with self._lock:
            for request_id in request_ids:
                context = self._items.get(request_id)
                if context is not None and context.session == session:
                    del self._items[request_id]
                    self._drop_locked(context, "released by the client")
                    released += 1
        return released

    def drop_session(self, session: str) -> None:
        with self._lock:
            for request_id in [k for k, v in self._items.items() if v.session == session]:
                self._drop_locked(self._items.pop(request_id), "its session ended")

    def expire(self) -> int:
        with self._lock:
            return self._expire_locked()

    def _expire_locked(self) -> int:
        deadline = self._clock() - self.ttl
        expired = 0
        while self._items:
            request_id, context = next(iter(self._items.items()))
            if context.last_used > deadline:
                break
            del self._items[request_id]
            self._drop_locked(context, f"expired after {self.ttl:g} s idle")
            expired += 1
        return expired

    def _drop_locked(self, context: ForwardContext, reason: str) -> None:
        self._on_drop(context)
        self._nbytes -= context.nbytes
        left = self._per_session.get(context.session, 0) - 1
        if left > 0:
            self._per_session[context.session] = left
        else:
            self._per_session.pop(context.session, None)
        self._gone[context.request_id] = reason
        while len(self._gone) > _FORGET_REASONS:
            self._gone.popitem(last=False)


@dataclass(eq=False)
class Session:
    """One client's gradients, optimizer and step counter."""

    key: str
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None
    optimizer_name: str = ""  # the torch.optim class, for checkpoints
    optimizer_options: dict[str, Any] = field(default_factory=dict)  # its plain kwargs
    last_step: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def apply_pending(self, zero_grad: int, grad_scale: float) -> None:
        """zero_grad() and clip scaling the client deferred to this call, in that order."""
        if zero_grad == ZERO_GRAD_TO_NONE:
            self.grads.clear()
        elif zero_grad == ZERO_GRAD_TO_ZERO:
            for grad in self.grads.values():
                grad.zero_()
        if grad_scale and grad_scale != 1.0:
            if not math.isfinite(grad_scale):
                raise InvalidRequest(f"grad_scale must be finite, got {grad_scale}")
            grads = list(self.grads.values())
            if grads:
                torch._foreach_mul_(grads, torch.tensor(grad_scale, dtype=grads[0].dtype))


class SessionTable:
    """Sessions by key, at most ``max_sessions``; idle ones are dropped after ``ttl``."""

    def __init__(
        self,
        *,
        max_sessions: int,
        ttl: float,
        on_drop: Callable[[str], None] = lambda key: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_sessions = max_sessions
        self.ttl = ttl
        self._on_drop = on_drop
        self._clock = clock
        self._lock = threading.Lock()
        self._items: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Session:
        with self._lock:
            session = self._items.get(key)
            if session is None:
                self._expire_locked()
                if len(self._items) >= self.max_sessions:
                    raise LimitExceeded(
                        f"server already holds max_sessions={self.max_sessions} sessions; "
                        f"idle ones are dropped after {self.ttl:g} s"
                    )
                session = self._items[key] = Session(key)
            session.last_seen = self._clock()
            return session

    def values(self) -> list[Session]:
        with self._lock:
            return list(self._items.values())

    def expire(self) -> int:
        with self._lock:
            return self._expire_locked()

    def _expire_locked(self) -> int:
        deadline = self._clock() - self.ttl
        stale = [key for key, s in self._items.items() if s.last_seen <= deadline]
        for key in stale:
            del self._items[key]
            self._on_drop(key)
        return len(stale)


class StepTurns:
    """Keeps a Step of one session from landing between another session's forward and backward.

    A forward kept for Backward takes a lease, which ends at its first Backward (or when the
    context goes away). A Step waits until no other session holds a lease, for at most
    ``wait`` seconds; meanwhile, forwards of sessions holding no lease wait for that Step, so
    the leases drain. After a Step, every lease is void: those forwards saw older weights, and
    their Backward is refused as stale rather than giving a gradient of the wrong weights.
    """

    def __init__(self, wait: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.wait = wait
        self._clock = clock
        self._cond = threading.Condition()
        self._leases: dict[str, int] = {}
        self._epoch = 0
        self._steps_waiting = 0

    def lease(self, session: str) -> int:
        """Take a lease for a forward of ``session``; returns its epoch for :meth:`end`."""
        with self._cond:
            deadline = self._clock() + self.wait
            while self._steps_waiting and not self._leases.get(session):
                left = deadline - self._clock()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._leases[session] = self._leases.get(session, 0) + 1
            return self._epoch

    def end(self, session: str, epoch: int) -> None:
        with self._cond:
            self._end_locked(session, epoch)

    def end_context(self, context: ForwardContext) -> None:
        """End the lease a context holds, once, whoever gets there first (its Backward, or the
        cache dropping it)."""
        with self._cond:
            epoch, context.lease = context.lease, -1
            if epoch >= 0:
                self._end_locked(context.session, epoch)

    def _end_locked(self, session: str, epoch: int) -> None:
        if epoch != self._epoch or not self._leases.get(session):
            return
        self._leases[session] -= 1
        if not self._leases[session]:
            del self._leases[session]
            self._cond.notify_all()

    def others_holding(self, session: str) -> int:
        with self._cond:
            return sum(n for key, n in self._leases.items() if key != session)

    def begin_step(self, session: str) -> None:
        """Wait until no other session holds a lease (or ``wait`` passed)."""
        with self._cond:
            self._steps_waiting += 1
            deadline = self._clock() + self.wait
            while any(key != session for key in self._leases):
                left = deadline - self._clock()
                if left <= 0:
                    break
                self._cond.wait(left)

    def end_step(self, *, stepped: bool) -> None:
        with self._cond:
            self._steps_waiting -= 1
            if stepped:
                self._epoch += 1
                self._leases.clear()
            self._cond.notify_all()
