"""The queue manager answers *when*: it schedules every queued message, starts its delivery
attempts, and saves or removes it after each.

Routing (where) and delivery (how) are collaborators passed in; one attempt (load, route,
deliver, record) is ``attempt.Attempts``; when each message is due is a ``Timetable``. Time comes
only from the injected reactor, so tests run a whole retry schedule on a ``task.Clock`` in zero
time; the messages themselves stay in the store until their turn. A store shared with other nodes
(``ILeasingStore``) differs in a few decisions, made by the ``sharing`` strategy picked here once.
"""

from __future__ import annotations

import random as _random
from collections import deque
from collections.abc import Callable, Generator, Hashable
from typing import Any, TypeAlias

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay._log import plural
from mailrelay.config import QueueConfig
from mailrelay.errors import TemporaryFailure
from mailrelay.interfaces import IDeliverer, IMessageSink, IQueueStore, IRouter, IScheduleLoader
from mailrelay.observer import NULL_OBSERVER
from mailrelay.queue import schedule
from mailrelay.queue.attempt import Attempts, Outcome
from mailrelay.queue.notify import Notifier
from mailrelay.queue.sharing import sharing_for
from mailrelay.queue.slots import DeliverySlots
from mailrelay.queue.timetable import Timetable

#: What an ``inlineCallbacks`` generator yields and is sent: Deferreds and their results.
Steps: TypeAlias = Generator[defer.Deferred[Any], Any, Any]

log = Logger(namespace="mailrelay.queue")

#: How many messages are loaded from the store at once while recovering at start-up.
RECOVERY_CONCURRENCY = 32


class QueueManager:
    """Schedules, attempts and retries every message of ``store``.

    ``max_active`` bounds the messages being worked on at once (loading, routing, delivering): the
    burst of due messages at start-up is taken in that many at a time. ``jitter`` moves each retry
    delay a little (default ±10 % random) so deferred messages do not come back in lockstep.
    """

    def __init__(
        self,
        store: IQueueStore,
        router: IRouter,
        deliverer: IDeliverer,
        reactor: Any,
        config: QueueConfig,
        hostname: str,
        *,
        jitter: Callable[[float], float] | None = None,
        max_active: int | None = None,
        observer: Any = NULL_OBSERVER,  # an IRelayObserver
        trusted_client: Callable[[str], bool] = lambda address: False,
        reports_to: IMessageSink | None = None,
    ) -> None:
        self.store: Any = store  # Any: mypy sees no zope interface as a type
        self.clock = reactor
        self._config = config
        self.hostname = hostname
        self.jitter = (
            jitter if jitter is not None else schedule.proportional_jitter(_random.Random().random)
        )
        self.max_active = max_active or max(2 * config.max_deliveries, 50)
        self.slots = DeliverySlots(config.max_deliveries, config.max_per_destination)
        # trusted_client: whether a client address is in the trusted networks (see Notifier);
        # reports_to: where reports to senders are written (default the store; see Notifier)
        self.notifier = Notifier(store, reactor, config, hostname, trusted_client, reports_to)
        self.sharing = sharing_for(store)
        self.attempts = Attempts(
            store,
            router,
            deliverer,
            reactor,
            config,
            self.slots,
            self.notifier,
            self.sharing,
            observer,
            slot_freed=self._wake_blocked,
        )
        self.timetable = Timetable(reactor, self._came_due)
        self._ready: deque[str] = deque()
        self._active: dict[str, defer.Deferred[None]] = {}
        self._again: set[str] = set()  # asked for while active: attempt again right after
        # Messages that found their destination's line full, woken a few at a time as it moves
        # (an ordered set per destination).
        self._blocked: dict[Hashable, dict[str, None]] = {}
        self._waiters: dict[str, list[defer.Deferred[None]]] = {}
        self._running = False
        self._pumping = False
        self._stopping = False
        self._subscribed = False

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> defer.Deferred[int]:
        """Pick up new commits from now on, and every message already in the store.

        Returns a Deferred firing with the number of messages recovered.
        """
        self._running = True
        self._stopping = self.attempts.stopping = False
        self.timetable.start()
        if not self._subscribed:
            self.store.subscribe(self._committed)
            self._subscribed = True
        d = self._recover()
        d.addErrback(lambda f: log.failure("queue: start-up recovery failed", f))
        return d

    @defer.inlineCallbacks
    def _recover(self) -> Steps:
        # A store that reads every schedule in one pass (IScheduleLoader) skips building each
        # QueuedMessage; any other is loaded one by one, a few at a time.
        if IScheduleLoader.providedBy(self.store):
            entries = yield self.store.load_schedule()
        else:
            entries = yield self._load_one_by_one()
        found = 0
        for queue_id, next_attempt, held in entries:
            found += 1
            if (
                self._running
                and not held
                and queue_id not in self._active
                and queue_id not in self.timetable
            ):
                self._schedule(queue_id, next_attempt)
        log.info("queue: recovered {messages}", count=found, messages=plural(found, "message"))
        return found

    @defer.inlineCallbacks
    def _load_one_by_one(self) -> Steps:
        ids = iter((yield self.store.list_ids()))
        entries: list[tuple[str, float, bool]] = []

        @defer.inlineCallbacks
        def worker() -> Steps:
            for queue_id in ids:  # the workers share one iterator: constant memory
                try:
                    message = yield self.store.load(queue_id)
                except KeyError:
                    continue
                except Exception:
                    log.failure("queue: cannot load {queue_id}", queue_id=queue_id)
                    continue
                entries.append((queue_id, message.next_attempt, message.held))

        yield defer.gatherResults([worker() for _ in range(RECOVERY_CONCURRENCY)])
        return entries

    def stop(self, grace: float = 10.0) -> defer.Deferred[None]:
        """Stop starting attempts; let those in flight finish for ``grace`` seconds, then cancel
        them.

        A cancelled delivery counts as a temporary failure (4.3.2), recorded like any other; the
        Deferred fires once every attempt has saved its outcome.
        """
        self._running = False
        self._stopping = self.attempts.stopping = True
        self.timetable.stop()
        active = list(self._active.values())
        if not active:
            return defer.succeed(None)
        cancel_later = self.clock.callLater(grace, self.attempts.cancel)

        def stopped(_: object) -> None:
            if cancel_later.active():
                cancel_later.cancel()

        return defer.DeferredList(active).addCallback(stopped)

    # -- scheduling ---------------------------------------------------------------------------

    def _committed(self, queue_id: str) -> None:
        if self._running:
            self._schedule(queue_id, self.clock.seconds())

    def flush(self, queue_id: str | None = None) -> defer.Deferred[int]:
        """Attempt ``queue_id`` (or every scheduled message) now; Deferred count of those flushed.

        A shared store lets a node claim only due messages, so there the message(s) are first
        made due in the store itself, which wakes the other nodes too (see ``sharing``).
        """

        def due(ids: list[str]) -> int:
            now = self.clock.seconds()
            for qid in ids:
                self._schedule(qid, now)
            return len(ids)

        made = self.sharing.make_due(queue_id, self.timetable.ids(), self._active)
        return made.addCallback(due)

    def scheduled(self) -> dict[str, float]:
        """Every scheduled message id and when it is due (a copy)."""
        return self.timetable.copy()

    @property
    def router(self) -> Any:
        """The ``IRouter``."""
        return self.attempts.router

    @router.setter
    def router(self, router: IRouter) -> None:
        """New routes (reload): the messages waiting for a busy destination are looked at again
        now, for they may go elsewhere, where no freed slot of the old destination would wake
        them."""
        if router is self.attempts.router:
            return  # a reload that kept the routes (an embedder's own router)
        self.attempts.router = router
        now = self.clock.seconds()
        blocked, self._blocked = self._blocked, {}
        for waiting in blocked.values():
            for qid in waiting:
                self._take_up(qid, now)

    @property
    def config(self) -> QueueConfig:
        return self._config

    @config.setter
    def config(self, config: QueueConfig) -> None:
        """A new ``[queue]`` (reload): caps, schedule and reports follow at once."""
        self._config = self.attempts.config = self.notifier.config = config
        self.slots.total = config.max_deliveries
        self.slots.per_destination = config.max_per_destination
        self.slots.dispatch()  # higher caps may let waiting deliveries start now

    def active_ids(self) -> list[str]:
        """The ids with an attempt running now (the metrics' in-flight gauge)."""
        return list(self._active)

    def is_active(self, queue_id: str) -> bool:
        """Whether an attempt on ``queue_id`` is running now."""
        return queue_id in self._active

    def _schedule(self, queue_id: str, at: float) -> None:
        if queue_id in self._active:
            if at <= self.clock.seconds():
                self._again.add(queue_id)
            else:
                self.timetable.note(queue_id, at)  # set when the attempt ends
            return
        self.timetable.set(queue_id, at)

    def _unschedule(self, queue_id: str) -> None:
        self.timetable.remove(queue_id)
        self._again.discard(queue_id)
        self.sharing.forget(queue_id)

    def _came_due(self, queue_ids: list[str]) -> None:
        self._ready.extend(queue_ids)
        self._pump()

    def _pump(self) -> None:
        """Start attempts on ready messages while fewer than ``max_active`` run. Not re-entered:
        an attempt that ends at once (an in-memory store and deliverer) only frees its place for
        this loop, or 10,000 ready messages would recurse 10,000 deep."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._ready and self._running and len(self._active) < self.max_active:
                qid = self._ready.popleft()
                if qid in self._active:
                    self._again.add(qid)
                    continue
                d = self.sharing.attempt(qid, self._attempt)
                self._active[qid] = d
                d.addErrback(self._attempt_failed, qid).addBoth(self._ended, qid)
        finally:
            self._pumping = False

    def _attempt_failed(self, failure: Failure, queue_id: str) -> None:
        """The store failed under an attempt (unreadable envelope, no room to save the outcome, no
        file descriptors left): try again later rather than forget the message until a restart.
        A store that says it is unavailable for now (``TemporaryFailure``: a database outage) is
        one warning line, not a traceback per message."""
        if isinstance(failure.value, TemporaryFailure):
            log.warn(
                "queue: attempt on {queue_id} failed ({reply}); will retry",
                queue_id=queue_id,
                reply=failure.value.reply,
            )
        else:
            log.failure(
                "queue: attempt on {queue_id} failed; will retry", failure, queue_id=queue_id
            )
        if self._running:
            delay = schedule.retry_delay(self.config.retry_schedule, 1)
            self._schedule(queue_id, self.clock.seconds() + delay)

    def _ended(self, _: object, queue_id: str) -> None:
        self._active.pop(queue_id, None)
        for waiter in self._waiters.pop(queue_id, []):
            waiter.callback(None)
        if queue_id in self._again:
            self._again.discard(queue_id)
            self._schedule(queue_id, self.clock.seconds())
        else:
            at = self.timetable.get(queue_id)
            if at is not None:
                self._schedule(queue_id, at)
        self._pump()

    def _idle(self, queue_id: str) -> defer.Deferred[None]:
        """A Deferred that fires when ``queue_id`` has no attempt running."""
        if queue_id not in self._active:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.setdefault(queue_id, []).append(d)
        return d

    # -- after an attempt -----------------------------------------------------------------

    def _attempt(self, queue_id: str) -> defer.Deferred[None]:
        """One attempt on ``queue_id``; fires once its outcome is saved."""
        return self.attempts.run(queue_id).addCallback(self._after_attempt)

    def _after_attempt(self, outcome: Outcome | None) -> defer.Deferred[None] | None:
        """Remove a message that is done; else save when it is due again and schedule it.

        A message that only waited for a busy destination and is ``unchanged`` since its load (and
        due by what the store holds) is not saved on a store of our own: the store already says
        it is due, which is all a restart needs (here it is woken when the destination frees, or
        at the fallback time). Saving it would cost a write per waiting message when mail arrives
        faster than one destination takes it.
        """
        if outcome is None:
            return None  # deleted or held meanwhile
        message = outcome.message
        qid = message.queue_id
        if not message.pending:
            return self.store.remove(qid)
        now = self.clock.seconds()
        if not outcome.attempted and self._stopping:
            at = now  # stopped before its turn: due at once when the queue starts again
        elif not outcome.attempted:  # woken when a slot frees: this is only a fallback
            at = now + self.sharing.blocked_delay(self.config.retry_schedule, self.jitter)
        else:
            config = self.config
            at = schedule.next_attempt_at(
                message, config.retry_schedule, config.max_lifetime, now, self.jitter
            )
        if outcome.unchanged and not self.sharing.saves_unchanged:
            self._wait_for(qid, at, outcome.blocked)
            return None

        def saved(_: object) -> None:
            self._wait_for(qid, at, outcome.blocked)

        def gone(f: Failure) -> None:
            f.trap(KeyError)  # deleted while we were delivering: nothing to schedule

        d = defer.maybeDeferred(self.store.save, attrs.evolve(message, next_attempt=at))
        return d.addCallbacks(saved, gone)

    def _wait_for(self, queue_id: str, at: float, blocked: list[Hashable]) -> None:
        """Due again at ``at``, or sooner when one of the ``blocked`` destinations frees."""
        for destination in blocked:
            self._blocked.setdefault(destination, {})[queue_id] = None
        if not self._stopping:
            self._schedule(queue_id, at)

    def _wake_blocked(self, destination: Hashable) -> None:
        """A slot to ``destination`` freed: attempt as many blocked messages as its line has room
        for. Only that many, so 10,000 messages for a dead destination are not all reloaded and
        rerouted each time one of its deliveries times out."""
        blocked = self._blocked.get(destination)
        if not blocked:
            return
        room = max(1, self.config.max_per_destination - self.slots.waiting(destination))
        now = self.clock.seconds()
        while blocked and room:
            qid = next(iter(blocked))
            del blocked[qid]
            if self._take_up(qid, now):  # else deleted or held meanwhile: no turn used
                room -= 1
        if not blocked:
            del self._blocked[destination]

    def _take_up(self, queue_id: str, now: float) -> bool:
        """Make a message that waited for a busy destination due ``now``, if it is still queued
        (not deleted or held meanwhile); whether it was."""
        if queue_id in self.timetable or queue_id in self._active:
            self._schedule(queue_id, now)
            return True
        return False

    # -- operator actions (used by the control channel) -----------------------------------

    @defer.inlineCallbacks
    def hold(self, queue_id: str) -> Steps:
        """Keep ``queue_id`` in the queue without attempting it until ``release``."""
        yield self._idle(queue_id)
        message = yield self.store.load(queue_id)
        yield self.store.save(attrs.evolve(message, held=True))
        self._unschedule(queue_id)

    @defer.inlineCallbacks
    def release(self, queue_id: str) -> Steps:
        """Undo ``hold``: the message is attempted at once."""
        yield self._idle(queue_id)
        message = yield self.store.load(queue_id)
        now = self.clock.seconds()
        yield self.store.save(attrs.evolve(message, held=False, next_attempt=now))
        if self._running:
            self._schedule(queue_id, now)

    @defer.inlineCallbacks
    def delete(self, queue_id: str) -> Steps:
        """Remove ``queue_id`` from the queue without delivering or bouncing it."""
        self._unschedule(queue_id)
        yield self._idle(queue_id)
        self._unschedule(queue_id)
        yield self.store.remove(queue_id)
