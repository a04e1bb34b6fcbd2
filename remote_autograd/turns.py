"""Turns between sessions' forwards and Steps on the one shared set of trunk weights."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .contexts import ForwardContext

__all__ = ["StepTurns"]


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
