"""How often the trunk's own exceptions are logged with their traceback.

A traceback is what finds a bug in the trunk, but a client's input can make the trunk raise on
every call (a wrong feature size), 3 KB of log each, unbounded: at most a few per minute are
logged whole, the others at DEBUG, and the next whole one says how many it left out. Rank 0
(service.py) and the other ranks of a distributed trunk (follower.py) log through it alike.
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["TRACEBACKS", "Throttle", "log_trunk_failure"]


class Throttle:
    """At most ``burst`` events per ``period`` seconds pass; counts the ones held back."""

    def __init__(self, burst: int = 5, period: float = 60.0) -> None:
        self.burst, self.period = burst, period
        self._lock = threading.Lock()
        self._times: list[float] = []
        self._held = 0

    def allow(self) -> tuple[bool, int]:
        """(whether this one passes, how many were held back since the last that passed)."""
        now = time.monotonic()
        with self._lock:
            self._times = [t for t in self._times if now - t < self.period]
            if len(self._times) >= self.burst:
                self._held += 1
                return False, 0
            self._times.append(now)
            held, self._held = self._held, 0
            return True, held


TRACEBACKS = Throttle()  # this process's tracebacks of the trunk's own exceptions


def log_trunk_failure(logger: logging.Logger, what: str, exc: BaseException) -> None:
    """Log that ``what`` failed in the trunk: with the traceback of ``exc`` (the exception
    being handled) while this process's TRACEBACKS allow it, else at DEBUG."""
    shown, held = TRACEBACKS.allow()
    if shown:
        more = f" ({held} more since, without traceback)" if held else ""
        logger.exception("%s failed in the trunk%s", what, more)
    else:
        logger.debug("%s failed in the trunk: %r", what, exc)
