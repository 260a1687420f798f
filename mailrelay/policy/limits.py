"""Limits that span sessions: counters per client address over a sliding time window.

Per-session limits (line lengths, recipients, errors, AUTH failures in one session) live in the
session's settings; what a client does across many connections (guessing passwords, reconnecting
to try again) is counted here, on the injected clock.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol


class Clock(Protocol):
    """The injected clock (an ``IReactorTime``): only its time is read here."""

    def seconds(self) -> float: ...


class RateCounter:
    """At most ``limit`` events per key within ``window`` seconds (a sliding window).

    Memory is bounded: at most ``limit`` timestamps per key, and keys whose events all expired are
    dropped as new keys arrive (at most ``max_keys`` kept).
    """

    def __init__(self, clock: Clock, limit: int, window: float, max_keys: int = 100_000) -> None:
        self.clock = clock
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._events: dict[str, deque[float]] = {}

    def _recent(self, key: str) -> deque[float] | None:
        events = self._events.get(key)
        if events is None:
            return None
        horizon = self.clock.seconds() - self.window
        while events and events[0] <= horizon:
            events.popleft()
        if not events:
            del self._events[key]
            return None
        return events

    def hit(self, key: str) -> None:
        events = self._recent(key)
        if events is None:
            if len(self._events) >= self.max_keys:
                self._prune()
            events = self._events[key] = deque(maxlen=self.limit)
        events.append(self.clock.seconds())

    def exceeded(self, key: str) -> bool:
        events = self._recent(key)
        return events is not None and len(events) >= self.limit

    def _prune(self) -> None:
        for key in list(self._events):
            self._recent(key)
        while len(self._events) >= self.max_keys:  # still full of live keys: forget the oldest
            del self._events[next(iter(self._events))]
