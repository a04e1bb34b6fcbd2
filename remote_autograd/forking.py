"""Clients that survive ``fork()``: DataLoader workers, multiprocessing pools, gunicorn.

grpcio enables gRPC core's fork support by default (``GRPC_ENABLE_FORK_SUPPORT``): core's
``pthread_atfork`` handlers stop its threads before a fork and start fresh ones in the child.
They can only do so when no other thread is inside gRPC at that moment; otherwise core logs
"Other threads are currently calling into gRPC, skipping fork() handlers" and the child
inherits gRPC's threads' state half-way (a DataLoader worker then may crash). The threads of
ours that could be inside gRPC while the training thread forks are the client's background
release thread and any call from another thread; grpc's own connectivity-polling thread (of
``channel_ready_future``) is not used at all.

So, around every ``fork()`` of a process that uses remote_autograd:

- before: the fork waits for the client calls in flight to end (at most until their deadline)
  and holds new ones back until it is done (:func:`calls_in_flight` marks a call);
- in the child: each client forgets the parent's channel and bulk connections *without*
  closing them (they share sockets with the parent: closing would break the parent's calls)
  and takes a new session, opened lazily only if the child uses the module; contexts the
  parent created are released by the parent only; locks are new (another thread may have held
  one at the fork).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["calls_in_flight", "keep_inherited", "on_fork_in_child"]

log = logging.getLogger(__name__)


class _Gate:
    """Counts client calls in flight; a fork waits until none is (or their deadline passed)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._active = 0
        self._latest_deadline = 0.0  # monotonic: when the longest call in flight gives up
        self._forking = False
        self._inside = threading.local()  # depth: calls this thread is inside

    @contextlib.contextmanager
    def call(self, timeout: float) -> Iterator[None]:
        depth = getattr(self._inside, "depth", 0)
        with self._cond:
            # A call made inside another (a bulk ticket, an Info refresh) goes on: the fork
            # waits for the outer one, which would otherwise wait for the fork.
            while self._forking and not depth:
                self._cond.wait()
            self._active += 1
            self._latest_deadline = max(self._latest_deadline, time.monotonic() + timeout)
        self._inside.depth = depth + 1
        try:
            yield
        finally:
            self._inside.depth = depth
            with self._cond:
                self._active -= 1
                if self._active == 0:
                    self._latest_deadline = 0.0
                    self._cond.notify_all()

    def before_fork(self) -> None:
        with self._cond:
            self._forking = True
            while self._active:
                left = self._latest_deadline - time.monotonic()
                if left <= 0:
                    log.warning(
                        "forking while %d remote_autograd calls are still in flight past "
                        "their deadline; gRPC will skip its fork handlers",
                        self._active,
                    )
                    break
                self._cond.wait(left)

    def after_fork_in_parent(self) -> None:
        with self._cond:
            self._forking = False
            self._cond.notify_all()

    def after_fork_in_child(self) -> None:
        # Only the forking thread exists in the child: the calls counted were the parent's.
        self.__init__()  # type: ignore[misc]


_GATE = _Gate()
_CHILD_HOOKS: list[tuple[weakref.ref, Callable[[Any], None]]] = []
# What children inherited from their parent and must neither use nor close: dropping the
# last reference would let gRPC or the socket module shut down a connection the parent uses.
_INHERITED: list[Any] = []


def calls_in_flight(timeout: float) -> contextlib.AbstractContextManager[None]:
    """Mark one client call (of at most ``timeout`` seconds): a fork waits for it to end."""
    return _GATE.call(timeout)


def on_fork_in_child(obj: Any, method: Callable[[Any], None]) -> None:
    """Call ``method(obj)`` in each forked child while ``obj`` is alive (held weakly)."""
    _CHILD_HOOKS.append((weakref.ref(obj), method))
    _CHILD_HOOKS[:] = [(ref, m) for ref, m in _CHILD_HOOKS if ref() is not None]


def keep_inherited(*objects: Any) -> None:
    """Keep the parent's channel, bulk client... alive and unused in this child, for good."""
    _INHERITED.extend(o for o in objects if o is not None)


def _after_fork_in_child() -> None:
    _GATE.after_fork_in_child()
    for ref, method in list(_CHILD_HOOKS):
        target = ref()
        if target is None:
            continue
        try:
            method(target)
        except Exception:  # noqa: BLE001 - a child must start even if one client cannot reset
            log.exception("resetting %r after fork failed", target)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_GATE.before_fork,
        after_in_parent=_GATE.after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
