"""Turns between sessions' forwards and Steps on the one shared set of trunk weights."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .contexts import ForwardContext

__all__ = ["StepTurns", "StepWait"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepWait:
    """How long one Step waited for other sessions' kept forwards (told to its client)."""

    seconds: float = 0.0  # spent waiting
    forwards: int = 0  # other sessions' kept forwards it found when it began
    expired: bool = False  # the budget ran out: it stepped anyway, those forwards are stale


class StepTurns:
    """Keeps a Step of one session from landing between another session's forward and backward.

    A forward kept for Backward takes a lease, which ends at its first Backward (or when the
    context goes away). A Step waits until no other session holds a lease, for at most
    ``wait`` seconds in all (its budget, ServerOptions.step_wait); meanwhile, forwards of
    sessions holding no lease wait for that Step, so the leases drain. After a Step, every lease
    is void: those forwards saw older weights, and their Backward is refused as stale rather
    than giving a gradient of the wrong weights.

    A session whose lease outlived a Step's budget is *overdue*: later Steps do not wait for its
    leases, until a Backward of it ends its last lease. So one forward that never gets its
    Backward costs the other sessions one budget, not one per step.
    """

    def __init__(self, wait: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.wait = wait
        self._clock = clock
        self._cond = threading.Condition()
        self._leases: dict[str, int] = {}
        self._epoch = 0
        self._steps_waiting = 0
        self._overdue: set[str] = set()  # sessions whose lease outlived a Step's budget
        self.expired_steps = 0  # Steps that ran out their budget (for operators: stats())

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
            self._overdue.discard(session)  # all its forwards got their Backward: forgiven
            self._cond.notify_all()

    def others_holding(self, session: str) -> int:
        with self._cond:
            return sum(n for key, n in self._leases.items() if key != session)

    def _awaited_locked(self, session: str) -> list[str]:
        return [key for key in self._leases if key != session and key not in self._overdue]

    def begin_step(self, session: str) -> StepWait:
        """Wait until no other session holds a lease (or the budget ``wait`` is spent)."""
        with self._cond:
            self._steps_waiting += 1
            forwards = sum(self._leases[key] for key in self._awaited_locked(session))
            started = self._clock()
            deadline = started + self.wait
            expired = False
            while awaited := self._awaited_locked(session):
                left = deadline - self._clock()
                if left <= 0:
                    self._overdue.update(awaited)
                    self.expired_steps += 1
                    expired = True
                    # Once per stray session (it is overdue now): cannot flood the log.
                    log.info(
                        "a Step of session %s waited its whole step_wait budget (%g s) for "
                        "forwards of %s and went ahead; their Backward will be stale",
                        session,
                        self.wait,
                        ", ".join(sorted(awaited)),
                    )
                    break
                self._cond.wait(left)
            waited = self._clock() - started if forwards else 0.0
            return StepWait(seconds=waited, forwards=forwards, expired=expired)

    def forget(self, session: str) -> None:
        """The session ended: nothing more to remember of it."""
        with self._cond:
            self._overdue.discard(session)

    def end_step(self, *, stepped: bool) -> None:
        with self._cond:
            self._steps_waiting -= 1
            if stepped:
                self._epoch += 1
                self._leases.clear()
            self._cond.notify_all()
