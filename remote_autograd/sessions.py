"""Client sessions on the server: each one's gradients, optimizer and step counter.

A session is keyed by the caller's authenticated identity and the session id it sends, so a
session id copied by another identity names a different session. The table is bounded by
``max_sessions``, and one authenticated identity holds at most ``max_sessions_per_identity`` of
them, so a token holder opening sessions in a loop cannot lock the others out; sessions idle for
``session_ttl`` are dropped. Without tokens or mutual TLS every caller is the one identity
``anonymous``, so there is nothing to share between and only ``max_sessions`` applies.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch

from .errors import InvalidRequest, LimitExceeded

__all__ = [
    "ANONYMOUS",
    "Session",
    "SessionTable",
    "ZeroGrad",
    "ended_while_waiting",
    "scale_tensor",
    "identity_of",
    "session_key",
]

ANONYMOUS = "anonymous"  # the identity of every caller of a server without tokens or mTLS


def session_key(identity: str, session_id: str) -> str:
    """The key of the session ``session_id`` of the authenticated ``identity``."""
    return f"{identity}/{session_id}"


def identity_of(key: str) -> str | None:
    """The authenticated identity in a session key ``identity/session_id`` (the session id
    has no ``/``); None for the unauthenticated identity, which has no share of its own."""
    identity = key.rpartition("/")[0]
    return None if identity in ("", ANONYMOUS) else identity


class ZeroGrad(IntEnum):
    """A ``zero_grad()`` the client deferred to its next call (values of the wire's enum)."""

    KEEP = 0  # nothing pending
    TO_NONE = 1  # zero_grad(set_to_none=True)
    TO_ZERO = 2  # zero_grad(set_to_none=False)

    @classmethod
    def from_wire(cls, value: int) -> ZeroGrad:
        """The mode a request names; protobuf enums are open, so any int can arrive."""
        try:
            return cls(value)
        except ValueError:
            raise InvalidRequest(
                f"zero_grad must be one of {', '.join(f'{m.value} ({m.name})' for m in cls)}, "
                f"got {value}"
            ) from None


@dataclass(eq=False)
class Session:
    """One client's gradients, optimizer and step counter."""

    key: str
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None
    optimizer_name: str = ""  # the torch.optim class, for checkpoints
    optimizer_options: dict[str, Any] = field(default_factory=dict)  # its plain kwargs
    optimizer_groups: list[dict[str, Any]] | None = None  # its param groups (names), if given
    optimizer_id: str = ""  # the client's name for it: a Step of another is refused
    last_step: int = 0
    last_ops_id: str = ""  # the GradNorm ops_id last applied (a retry's are not again)
    last_seen: float = field(default_factory=time.monotonic)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def apply_pending(self, zero_grad: int, grad_scale: float) -> None:
        """zero_grad() and clip scaling the client deferred to this call, in that order."""
        if zero_grad == ZeroGrad.TO_NONE:
            self.grads.clear()
        elif zero_grad == ZeroGrad.TO_ZERO:
            for grad in self.grads.values():
                grad.zero_()
        if grad_scale and grad_scale != 1.0:
            if not math.isfinite(grad_scale):
                raise InvalidRequest(f"grad_scale must be finite, got {grad_scale}")
            grads = list(self.grads.values())
            if grads:
                torch._foreach_mul_(grads, scale_tensor(grad_scale))


def scale_tensor(grad_scale: float) -> torch.Tensor:
    """A clip coefficient as the tensor gradients are multiplied by. torch's clip_grad_norm_
    multiplies every gradient by the coefficient tensor of its norms' dtype, which float64
    holds exactly; a float32 or bfloat16 gradient is multiplied by it as by that tensor. Cast
    to the first gradient's dtype, as once, it was rounded for a trunk of several dtypes."""
    return torch.tensor(grad_scale, dtype=torch.float64)


def ended_while_waiting(op: str, key: str) -> InvalidRequest:
    """The refusal of a call whose session ended while the call waited for its turn."""
    return InvalidRequest(
        f"{op}: session {key.rpartition('/')[2]!r} ended while this call waited (its client "
        "closed, or it was idle past session_ttl): nothing was done; open a new session and "
        "start the step again"
    )


class SessionTable:
    """Sessions by key, at most ``max_sessions``; idle ones are dropped after ``ttl``."""

    def __init__(
        self,
        *,
        max_sessions: int,
        ttl: float,
        max_per_identity: int | None = None,
        on_drop: Callable[[str], None] = lambda key: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_sessions = max_sessions
        self.max_per_identity = max_per_identity or max_sessions
        self.ttl = ttl
        self._on_drop = on_drop
        self._clock = clock
        self._lock = threading.Lock()
        self._items: dict[str, Session] = {}

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def check_room(self, keys: Iterable[str]) -> None:
        """Refuse (InvalidRequest) sessions this table could never hold together: a
        checkpoint's, checked before any of them is restored."""
        counts = collections.Counter(identity_of(key) for key in keys)
        total = sum(counts.values())
        if total > self.max_sessions:
            raise InvalidRequest(
                f"it holds {total} sessions, more than max_sessions={self.max_sessions}: "
                "raise --max-sessions"
            )
        for identity, count in counts.items():
            if identity is not None and count > self.max_per_identity:
                raise InvalidRequest(
                    f"it holds {count} sessions of {identity}, more than "
                    f"max_sessions_per_identity={self.max_per_identity}: raise "
                    "--max-sessions-per-identity"
                )

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Session:
        with self._lock:
            session = self._items.get(key)
            if session is None:
                self._expire_locked()
                identity = identity_of(key)
                if identity is not None and self._count_locked(identity) >= self.max_per_identity:
                    raise LimitExceeded(
                        f"this identity already holds max_sessions_per_identity="
                        f"{self.max_per_identity} sessions; idle ones are dropped after "
                        f"{self.ttl:g} s (reuse one client per process, or raise the option)"
                    )
                if len(self._items) >= self.max_sessions:
                    raise LimitExceeded(
                        f"server already holds max_sessions={self.max_sessions} sessions; "
                        f"idle ones are dropped after {self.ttl:g} s"
                    )
                session = self._items[key] = Session(key)
            session.last_seen = self._clock()
            return session

    def _count_locked(self, identity: str) -> int:
        return sum(1 for key in self._items if identity_of(key) == identity)

    def drop(self, key: str) -> bool:
        """End a session now (its client closed); False if there was none."""
        with self._lock:
            if self._items.pop(key, None) is None:
                return False
            self._on_drop(key)
            return True

    def holds(self, session: Session) -> bool:
        """Whether ``session`` is still in the table (not ended or expired meanwhile)."""
        with self._lock:
            return self._items.get(session.key) is session

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
