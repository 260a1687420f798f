"""When each queued message is next due: one heap of ``(due, seq, id)`` and one timer.

100,000 scheduled messages cost a few megabytes and each event ``O(log n)``. The live due time of
an id is in a dict; a heap entry that no longer matches it is stale and dropped when it surfaces,
so moving or removing an id never searches the heap. What is due now is handed over at the next
reactor turn by a call of its own: moving the long timer sooner instead would cost Twisted a
linear search of all its timed calls.

Time comes only from the injected clock; nothing fires while the timetable is stopped.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any


class Timetable:
    """The due time of every scheduled queue id; ``on_due(ids)`` hears of those that came due."""

    def __init__(self, clock: Any, on_due: Callable[[list[str]], None]) -> None:
        self.clock = clock
        self.on_due = on_due
        self.running = False
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[str, float] = {}  # the live entry of each scheduled id
        self._seq = 0
        self._timer: Any = None  # the call at the earliest due time
        self._soon: Any = None  # a call at the next turn, for what is due now

    def __contains__(self, queue_id: str) -> bool:
        return queue_id in self._due

    def get(self, queue_id: str) -> float | None:
        return self._due.get(queue_id)

    def ids(self) -> list[str]:
        return list(self._due)

    def copy(self) -> dict[str, float]:
        """Every scheduled id and its due time."""
        return dict(self._due)

    def set(self, queue_id: str, at: float) -> None:
        """``queue_id`` is due at ``at`` (and no longer at any earlier time it had)."""
        self._due[queue_id] = at
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, queue_id))
        self._arm()

    def note(self, queue_id: str, at: float) -> None:
        """Remember ``at`` without arming for it (an attempt on ``queue_id`` is running; the
        caller ``set``s it again when that ends)."""
        self._due[queue_id] = at

    def remove(self, queue_id: str) -> None:
        self._due.pop(queue_id, None)  # its heap entry goes stale

    def start(self) -> None:
        self.running = True
        self._arm()

    def stop(self) -> None:
        """Fire nothing more until ``start``; the due times are kept."""
        self.running = False
        for call in (self._timer, self._soon):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._soon = None

    def _arm(self) -> None:
        if not self.running:
            return
        heap = self._heap
        while heap and self._due.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)
        if not heap:
            return
        delay = max(0.0, heap[0][0] - self.clock.seconds())
        if delay == 0.0:
            if self._soon is None or not self._soon.active():
                self._soon = self.clock.callLater(0, self._fire)
            return
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= heap[0][0]:
                return
            self._timer.reset(delay)
        else:
            self._timer = self.clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        if self._timer is not None and not self._timer.active():
            self._timer = None  # this was the call that fired (or it was cancelled)
        if self._soon is not None and not self._soon.active():
            self._soon = None
        now = self.clock.seconds()
        due = []
        while self._heap and self._heap[0][0] <= now:
            at, _, queue_id = heapq.heappop(self._heap)
            if self._due.get(queue_id) == at:
                del self._due[queue_id]
                due.append(queue_id)
        self.on_due(due)
        self._arm()
