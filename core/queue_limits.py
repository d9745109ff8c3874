"""How many requests one visitor's session may have waiting or running in each queue group, without Gradio.

A shared server's queue is first come, first served: one session that queues 64 trainings leaves everybody else
"Queue is full". ``QueueLimits.admit`` is asked when a request joins the queue (a Gradio validator in ``app.py``)
and answers from two counts: what the queue holds for that session now (``pending``, read from the front end),
and what this object let in during the last ``window_s`` seconds, so that requests sent at the same instant
cannot all pass before any of them shows in the queue.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable


class QueueLimits:
    """``limits``: group -> requests one session may have waiting or running. ``events``: a callable listing
    ``(session id, group)`` of every request waiting or running now."""

    def __init__(self, limits: dict[str, int], events: Callable[[], Iterable[tuple[str, str]]] = lambda: (),
                 window_s: float = 0.5) -> None:
        self.limits = dict(limits)
        self.events = events
        self.window_s = window_s
        self._admitted: dict[tuple[str, str], list[float]] = {}  # (session, group) -> when requests were let in
        self._lock = threading.Lock()

    def pending(self, session: str | None, group: str) -> int:
        """Requests of ``session`` waiting or running in ``group`` now (0 without a session)."""
        return sum(1 for s, g in self.events() if s == session and g == group) if session else 0

    def admit(self, session: str | None, group: str) -> bool:
        """Whether one more request of ``session`` may join ``group``; if so it is counted from now on."""
        if not session or group not in self.limits:
            return True
        with self._lock:
            now = time.monotonic()
            recent = [t for t in self._admitted.get((session, group), []) if now - t < self.window_s]
            if max(self.pending(session, group), len(recent)) >= self.limits[group]:
                return False
            self._admitted[(session, group)] = [*recent, now]
            for key in [k for k, times in self._admitted.items() if now - times[-1] >= self.window_s]:
                del self._admitted[key]
            return True

    def refusal(self, group: str, what: str) -> str:
        """The message for a refused request, e.g. "You already have a training waiting or running; …"."""
        limit = self.limits[group]
        count, them, plural = ("a", "it", "") if limit == 1 else (str(limit), "them", "s")
        return f"You already have {count} {what}{plural} waiting or running; wait for {them} to finish, then try again."
