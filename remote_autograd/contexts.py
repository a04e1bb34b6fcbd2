"""Forward contexts awaiting their Backward, bounded by count, bytes and idle age.

Request ids live inside their session: the cache is keyed by (session, request id), so another
session using the same id names a different context, and looking up an id that only exists in
another session is answered exactly like an id that never existed (the recorded "why it went
away" reasons are per session too). One session cannot hold more than ``max_session_contexts``
and one authenticated identity not more than ``max_identity_contexts`` contexts and
``max_identity_bytes`` bytes (their own oldest go first), so a client that never releases, or
opens many sessions, cannot push every other client's contexts out.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ContextNotFound, LimitExceeded
from .sessions import identity_of

__all__ = ["ContextCache", "ForwardContext"]

_FORGET_REASONS = 4096  # remember why this many recent ids went away, for error messages
# Per session: how many Backwards this many of its recent contexts that went away had
# answered (a retry whose reply was lost must not add its gradients twice). A session's own:
# other sessions' churn cannot push them out.
_REMEMBER_ANSWERED = 1024
_REMEMBER_SESSIONS = 4096  # sessions with such records (live ones are max_sessions at most)


def _key(session: str, request_id: str) -> tuple[str, str]:
    """Where a context is cached: request ids are scoped by their session."""
    return (session, request_id)


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
    nbytes: int  # bytes held: inputs, outputs, the activations saved for Backward, last_reply
    weights_version: int  # optimizer steps applied when the forward ran
    seed: int = 0  # RNG seed of the forward (dropout), so a recompute matches it
    template: Any = None  # where the inputs go in (args, kwargs), for a recompute
    training: bool = True  # the trunk's mode during the forward, for a recompute
    autocast: torch.dtype | None = None  # the forward's autocast dtype, for a recompute
    backward_seq: int = 0  # backwards answered so far
    last_reply: Any = None  # the last Backward's reply, for a retried call (keep_reply)
    reply_bytes: int = 0  # its tensors' bytes, counted in nbytes
    last_nonfinite: bool = False  # the last Backward's gradients were not finite (kept or not)
    # Re-created by the client after the server lost it: the Backwards the lost context had
    # answered (their gradients are in the session: answered again, not added again), and
    # whether the last of them was non-finite.
    answered: int = 0
    answered_nonfinite: bool = False
    lease: int = -1  # StepTurns epoch of the lease this context holds (-1: none)
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class ContextCache:
    """Forward contexts by (session, request id), bounded by count, bytes and idle age (LRU)."""

    def __init__(
        self,
        *,
        max_contexts: int,
        max_bytes: int,
        ttl: float,
        max_per_session: int | None = None,
        max_per_identity: int | None = None,
        max_identity_bytes: int | None = None,
        on_drop: Callable[[ForwardContext], None] = lambda context: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_drop = on_drop
        self.max_contexts = max_contexts
        self.max_per_session = max_per_session or max_contexts
        self.max_per_identity = max_per_identity or max_contexts
        self.max_identity_bytes = max_identity_bytes or max_bytes
        self._per_session: dict[str, int] = {}
        self._per_identity: dict[str, list[int]] = {}  # identity -> [contexts, bytes]
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, str], ForwardContext] = OrderedDict()
        self._nbytes = 0
        # Why recent ids went away, and the Backwards they had answered (seq, non-finite).
        self._gone: OrderedDict[tuple[str, str], str] = OrderedDict()
        # Per session, oldest first: a session that ended while a Backward of it was
        # answered gets a record again (keep_reply), so the sessions remembered are bounded.
        self._answered: OrderedDict[str, OrderedDict[str, tuple[int, bool]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def check_size(self, session: str, nbytes: int) -> None:
        """Refuse a context of ``nbytes`` that no eviction could make room for: what
        :meth:`put` would refuse it for, asked before the forward's effects are kept."""
        if nbytes > self.max_bytes:
            raise LimitExceeded(
                f"forward context of {nbytes} bytes exceeds max_context_bytes={self.max_bytes}"
            )
        if identity_of(session) is not None and nbytes > self.max_identity_bytes:
            raise LimitExceeded(
                f"forward context of {nbytes} bytes exceeds max_identity_context_bytes="
                f"{self.max_identity_bytes}"
            )

    def put(self, context: ForwardContext) -> None:
        self.check_size(context.session, context.nbytes)
        identity = identity_of(context.session)
        key = _key(context.session, context.request_id)
        with self._lock:
            self._expire_locked()
            old = self._items.pop(key, None)
            if old is not None:
                self._drop_locked(old, "replaced by a new forward with the same id")
            if self._per_session.get(context.session, 0) >= self.max_per_session:
                oldest = next(c for c in self._items.values() if c.session == context.session)
                self._pop_locked(
                    oldest, f"evicted to stay under max_session_contexts={self.max_per_session}"
                )
            if identity is not None:
                self._make_room_for_identity_locked(identity, context.nbytes)
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
            self._items[key] = context
            self._nbytes += context.nbytes
            self._per_session[context.session] = self._per_session.get(context.session, 0) + 1
            if identity is not None:
                held = self._per_identity.setdefault(identity, [0, 0])
                held[0] += 1
                held[1] += context.nbytes

    def keep_reply(self, context: ForwardContext, reply: Any, nbytes: int) -> None:
        """Hold a Backward's reply (``nbytes`` of input gradients) with its context, for a
        retried call, counted in the context's bytes, if it fits beside what is held: no
        other context goes for it (they may still await their Backward), and a reply that
        does not fit is not kept (its retry is refused as stale)."""
        key = _key(context.session, context.request_id)
        identity = identity_of(context.session)
        nonfinite = bool(getattr(reply, "nonfinite", False))
        with self._lock:
            context.last_nonfinite = nonfinite
            if self._items.get(key) is not context:  # dropped meanwhile (evicted, released)
                # What it answered counts, for a re-created context.
                self._remember_answered_locked(context, nonfinite)
                return
            grow = nbytes - context.reply_bytes
            held = self._per_identity.get(identity) if identity is not None else None
            if self._nbytes + grow > self.max_bytes or (
                held is not None and held[1] + grow > self.max_identity_bytes
            ):
                reply, nbytes, grow = None, 0, -context.reply_bytes
            context.last_reply, context.reply_bytes = reply, nbytes
            context.nbytes += grow
            self._nbytes += grow
            if held is not None:
                held[1] += grow

    def _make_room_for_identity_locked(self, identity: str, nbytes: int) -> None:
        """Evict the identity's own oldest contexts until one more of ``nbytes`` fits its share."""
        held = self._per_identity.get(identity)
        if held is None:
            return
        while held[0] and (
            held[0] >= self.max_per_identity or held[1] + nbytes > self.max_identity_bytes
        ):
            oldest = next(c for c in self._items.values() if identity_of(c.session) == identity)
            self._pop_locked(
                oldest,
                f"evicted to stay under max_identity_contexts={self.max_per_identity} / "
                f"max_identity_context_bytes={self.max_identity_bytes}",
            )

    def get(self, session: str, request_id: str, *, method: str = "Backward") -> ForwardContext:
        key = _key(session, request_id)
        with self._lock:
            self._expire_locked()
            context = self._items.get(key)
            if context is None:
                # Only this session's own history: nothing said about other sessions' ids.
                reason = self._gone.get(key)
                raise ContextNotFound(
                    f"{method} for request {request_id[:12]}: no forward context ("
                    + (reason or f"expired after {self.ttl:g} s idle, released, or never created")
                    + ")"
                )
            context.last_used = self._clock()
            self._items.move_to_end(key)
            return context

    def holds(self, session: str, request_id: str) -> bool:
        with self._lock:
            return _key(session, request_id) in self._items

    def answered(self, session: str, request_id: str) -> tuple[int, bool]:
        """The Backwards a context of this id that went away had answered, and whether the
        last was non-finite ((0, False) if none is remembered)."""
        with self._lock:
            answered = self._answered.get(session)
            return answered.get(request_id, (0, False)) if answered else (0, False)

    def release(self, session: str, request_ids: list[str]) -> int:
        released = 0
        with self._lock:
            for request_id in request_ids:
                context = self._items.pop(_key(session, request_id), None)
                if context is not None:
                    self._drop_locked(context, "released by the client")
                    released += 1
        return released

    def snapshot(self) -> list[ForwardContext]:
        """The contexts held now (for an engine deciding what is idle)."""
        with self._lock:
            return list(self._items.values())

    def drop_session(self, session: str, *, ended: bool = True) -> None:
        """Drop the session's contexts: it ended (its records of answered Backwards go too:
        no call of it can come any more), or not (``ended=False``: an adapter offloaded; its
        client may retry a Backward on a re-created context)."""
        reason = "its session ended" if ended else "its adapter was moved off the device"
        with self._lock:
            for key in [k for k in self._items if k[0] == session]:
                self._drop_locked(self._items.pop(key), reason)
            if ended:
                self._answered.pop(session, None)

    def expire(self) -> int:
        with self._lock:
            return self._expire_locked()

    def _expire_locked(self) -> int:
        deadline = self._clock() - self.ttl
        expired = 0
        while self._items:
            key, context = next(iter(self._items.items()))
            if context.last_used > deadline:
                break
            del self._items[key]
            self._drop_locked(context, f"expired after {self.ttl:g} s idle")
            expired += 1
        return expired

    def _pop_locked(self, context: ForwardContext, reason: str) -> None:
        del self._items[_key(context.session, context.request_id)]
        self._drop_locked(context, reason)

    def _drop_locked(self, context: ForwardContext, reason: str) -> None:
        self._on_drop(context)
        self._nbytes -= context.nbytes
        left = self._per_session.get(context.session, 0) - 1
        if left > 0:
            self._per_session[context.session] = left
        else:
            self._per_session.pop(context.session, None)
        identity = identity_of(context.session)
        held = self._per_identity.get(identity) if identity is not None else None
        if held is not None:
            held[0] -= 1
            held[1] -= context.nbytes
            if held[0] <= 0:
                del self._per_identity[identity]  # type: ignore[arg-type]
        key = _key(context.session, context.request_id)
        self._gone[key] = reason
        self._gone.move_to_end(key)
        while len(self._gone) > _FORGET_REASONS:
            self._gone.popitem(last=False)
        self._remember_answered_locked(context, context.last_nonfinite)

    def _remember_answered_locked(self, context: ForwardContext, nonfinite: bool) -> None:
        seq = max(context.backward_seq, context.answered)
        if not seq:
            return  # answered nothing: (0, False), as for an id never seen
        answered = self._answered.setdefault(context.session, OrderedDict())
        self._answered.move_to_end(context.session)
        while len(self._answered) > _REMEMBER_SESSIONS:
            self._answered.popitem(last=False)
        answered[context.request_id] = (
            max(seq, answered.get(context.request_id, (0, False))[0]),
            nonfinite,
        )
        answered.move_to_end(context.request_id)
        while len(answered) > _REMEMBER_ANSWERED:
            answered.popitem(last=False)
