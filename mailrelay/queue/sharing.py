"""Whether this node has its store alone (``LocalQueue``) or shares it with other nodes
(``SharedQueue``, for a store providing ``ILeasingStore``, such as PostgreSQL).

The queue manager picks one with ``sharing_for`` when it is built and asks it the few questions
where the two differ; everything else about scheduling and attempts is the same code:

- a flush: a shared store is told first (``make_due``), for a node claims only due messages and
  the others must hear of it;
- an attempt: on a shared store only under this node's lease, given back once the outcome is
  saved;
- outcomes: a shared store saves each destination's as it answers, so a node taking over after a
  crash does not send again to recipients already delivered;
- a message that only waited for a busy destination: alone, it is not saved (the store already
  says it is due) and falls back to the schedule's longest interval; shared, it is always saved,
  due at the first interval, since the other nodes read the due time from the store.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.envelope import QueuedMessage, RecipientStatus
from mailrelay.interfaces import ILeasingStore
from mailrelay.queue import schedule
from mailrelay.queue.outcome import record

log = Logger(namespace="mailrelay.queue")

Jitter = Callable[[float], float]


class Sharing(Protocol):
    """What the queue manager asks of ``LocalQueue`` and ``SharedQueue``."""

    #: Whether a message that only waited for a busy destination is saved all the same.
    saves_unchanged: bool

    def make_due(
        self, queue_id: str | None, scheduled: Iterable[str], active: Container[str]
    ) -> defer.Deferred[list[str]]:
        """The ids a flush of ``queue_id`` (None: every scheduled one) makes due now."""

    def attempt(
        self, queue_id: str, attempt: Callable[[str], defer.Deferred[None]]
    ) -> defer.Deferred[None]:
        """Run ``attempt(queue_id)`` if and when this node may."""

    def forget(self, queue_id: str) -> None:
        """``queue_id`` was held or deleted: nothing pending about it."""

    def saving_as_they_end(
        self,
        message: QueuedMessage,
        statuses: list[RecipientStatus],
        runs: list[defer.Deferred[Any]],
    ) -> list[defer.Deferred[Any]]:
        """``runs`` (one delivery per destination), with what must happen as each ends."""

    def blocked_delay(self, retry_schedule: Sequence[float], jitter: Jitter) -> float:
        """How long a message that only waited for a busy destination waits at most."""


def sharing_for(store: Any) -> Sharing:
    """``SharedQueue`` for a store providing ``ILeasingStore``, else ``LocalQueue``."""
    return SharedQueue(store) if ILeasingStore.providedBy(store) else LocalQueue()


class LocalQueue:
    """A store only this node uses."""

    saves_unchanged = False

    def make_due(
        self, queue_id: str | None, scheduled: Iterable[str], active: Container[str]
    ) -> defer.Deferred[list[str]]:
        return defer.succeed([queue_id] if queue_id is not None else list(scheduled))

    def attempt(
        self, queue_id: str, attempt: Callable[[str], defer.Deferred[None]]
    ) -> defer.Deferred[None]:
        return attempt(queue_id)

    def forget(self, queue_id: str) -> None:
        pass

    def saving_as_they_end(
        self,
        message: QueuedMessage,
        statuses: list[RecipientStatus],
        runs: list[defer.Deferred[Any]],
    ) -> list[defer.Deferred[Any]]:
        return runs  # saved once, when the attempt ends

    def blocked_delay(self, retry_schedule: Sequence[float], jitter: Jitter) -> float:
        """The schedule's longest interval: a freed slot of the destination wakes the message
        sooner; at the first interval every message queued behind a slow destination would be
        loaded and routed again each time."""
        return schedule.retry_delay(retry_schedule, len(retry_schedule), jitter)


class SharedQueue:
    """A store shared with other nodes (``ILeasingStore``): attempts under a lease."""

    saves_unchanged = True

    def __init__(self, store: Any) -> None:
        self.store = store  # an ILeasingStore provider
        # flushed while an attempt ran here: that attempt saved a later due time, so the message
        # is made due again in the store before its next claim
        self._flushed: set[str] = set()

    def make_due(
        self, queue_id: str | None, scheduled: Iterable[str], active: Container[str]
    ) -> defer.Deferred[list[str]]:
        def made(ids: list[str]) -> list[str]:
            self._flushed.update(qid for qid in ids if qid in active)
            return ids

        return defer.maybeDeferred(self.store.make_due, queue_id).addCallback(made)

    def attempt(
        self, queue_id: str, attempt: Callable[[str], defer.Deferred[None]]
    ) -> defer.Deferred[None]:
        store = self.store

        def claimed(ok: bool) -> Any:
            if not ok:
                return None  # another node has it, or it is not due; the store wakes us if orphaned
            return attempt(queue_id).addBoth(
                lambda result: store.release(queue_id).addCallback(lambda _: result)
            )

        if queue_id in self._flushed:
            self._flushed.discard(queue_id)
            d = defer.maybeDeferred(store.make_due, queue_id)
            return d.addCallback(lambda _: store.claim(queue_id)).addCallback(claimed)
        return defer.maybeDeferred(store.claim, queue_id).addCallback(claimed)

    def forget(self, queue_id: str) -> None:
        self._flushed.discard(queue_id)

    def saving_as_they_end(
        self,
        message: QueuedMessage,
        statuses: list[RecipientStatus],
        runs: list[defer.Deferred[Any]],
    ) -> list[defer.Deferred[Any]]:
        """Each destination's outcomes saved as soon as they are known (one save at a time).
        Each run's result passes on unchanged, after its save."""
        if len(runs) < 2:
            return runs  # the one save at the end of the attempt is as soon
        statuses = list(statuses)
        lock = defer.DeferredLock()

        def save(result: Any) -> Any:
            if not result:
                return result  # not run (stopping): nothing new to record
            for i, reply, remote, success in result:
                statuses[i] = record(statuses[i], reply, remote, success)

            def failed(f: Failure) -> None:
                log.warn(
                    "queue: interim save of {queue_id} failed: {error}",
                    queue_id=message.queue_id,
                    error=f.value,
                )

            interim = attrs.evolve(message, statuses=tuple(statuses))
            d = lock.run(self.store.save, interim)
            return d.addErrback(failed).addCallback(lambda _: result)

        return [run.addCallback(save) for run in runs]

    def blocked_delay(self, retry_schedule: Sequence[float], jitter: Jitter) -> float:
        """The schedule's first interval: the other nodes read the due time from the store."""
        return schedule.retry_delay(retry_schedule, 1, jitter)
