"""Caps on deliveries in flight — in total and per destination — shared fairly between destinations.

A destination that is slow or dead holds at most its own cap of slots; the others keep the rest.
When a global slot frees, destinations waiting for one are served in turn (round robin), so a busy
destination cannot starve a quiet one.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable

from twisted.internet import defer


class DeliverySlots:
    def __init__(self, total: int, per_destination: int) -> None:
        self.total = total
        self.per_destination = per_destination
        self.in_flight = 0
        self.by_destination: dict[Hashable, int] = {}
        self._waiting: OrderedDict[Hashable, deque[defer.Deferred[None]]] = OrderedDict()

    def waiting(self, destination: Hashable) -> int:
        """How many deliveries to ``destination`` wait for a slot."""
        return len(self._waiting.get(destination, ()))

    def _free_for(self, destination: Hashable) -> bool:
        return (
            self.in_flight < self.total
            and self.by_destination.get(destination, 0) < self.per_destination
        )

    def acquire(self, destination: Hashable) -> defer.Deferred[None]:
        """A Deferred that fires when a delivery to ``destination`` may start; cancellable."""
        # While a global slot is free, every waiter is held back by its own destination's cap, so
        # granting this one at once is fair.
        if destination not in self._waiting and self._free_for(destination):
            self._take(destination)
            return defer.succeed(None)

        def cancel(d: defer.Deferred[None]) -> None:
            queue = self._waiting.get(destination)
            if queue is not None and d in queue:
                queue.remove(d)
                if not queue:
                    del self._waiting[destination]

        d: defer.Deferred[None] = defer.Deferred(cancel)
        self._waiting.setdefault(destination, deque()).append(d)
        return d

    def release(self, destination: Hashable) -> None:
        self.in_flight -= 1
        left = self.by_destination[destination] - 1
        if left:
            self.by_destination[destination] = left
        else:
            del self.by_destination[destination]
        self.dispatch()

    def _take(self, destination: Hashable) -> None:
        self.in_flight += 1
        self.by_destination[destination] = self.by_destination.get(destination, 0) + 1

    def dispatch(self) -> None:
        """Start every waiter the caps allow now (after a release, or when the caps were raised)."""
        progress = True
        while progress and self.in_flight < self.total and self._waiting:
            progress = False
            for destination in list(self._waiting):
                if not self._free_for(destination):
                    continue
                queue = self._waiting[destination]
                d = queue.popleft()
                if queue:
                    self._waiting.move_to_end(destination)  # the next turn goes to someone else
                else:
                    del self._waiting[destination]
                self._take(destination)
                progress = True
                d.callback(None)
                break
