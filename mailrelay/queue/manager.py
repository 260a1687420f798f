"""The queue manager answers *when*: it schedules every queued message, runs its delivery attempts
and records what happened to each recipient.

Routing (where) and delivery (how) are collaborators passed in. Time comes only from the injected
reactor, so tests run a whole retry schedule on a ``task.Clock`` in zero time. The schedule is one
heap of ``(due, id)`` and one timer, so 100,000 queued messages cost a few megabytes and each event
``O(log n)``; the messages themselves stay in the store until their turn.
"""

from __future__ import annotations

import heapq
import random as _random
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay._log import plural
from mailrelay.config import QueueConfig
from mailrelay.envelope import (
    Envelope,
    QueuedMessage,
    Recipient,
    RecipientState,
    RecipientStatus,
    Reply,
    Route,
)
from mailrelay.errors import MailRelayError, PermanentFailure, TemporaryFailure
from mailrelay.interfaces import IDeliverer, ILeasingStore, IQueueStore, IRouter
from mailrelay.observer import NULL_OBSERVER, IRelayObserver
from mailrelay.queue import schedule
from mailrelay.queue.notify import Notifier
from mailrelay.queue.slots import DeliverySlots

log = Logger(namespace="mailrelay.queue")

#: How many messages are loaded from the store at once while recovering at start-up.
RECOVERY_CONCURRENCY = 32


def no_route(recipient: str) -> Reply:
    return Reply(550, "5.1.2", f"no route for <{recipient}>")


def routing_error() -> Reply:
    return Reply(451, "4.3.0", "routing error; will retry")


def delivery_error() -> Reply:
    return Reply(451, "4.3.0", "delivery error; will retry")


def shutdown_reply() -> Reply:
    return Reply(451, "4.3.2", "delivery interrupted by shutdown")


def record(
    status: RecipientStatus, reply: Reply, remote: str | None, success: str = "relayed"
) -> RecipientStatus:
    """A recipient's status after one answer: 2xx delivered, 5xx failed, anything else still pending.

    ``success``: who reports a delivery to a sender that asked (see ``RecipientStatus.success``)."""
    if reply.is_success:
        state = RecipientState.DELIVERED
    elif reply.is_permanent:
        state = RecipientState.FAILED
    else:
        state = RecipientState.PENDING
    return attrs.evolve(
        status,
        state=state,
        attempts=status.attempts + 1,
        last_reply=reply,
        remote=remote,
        success=success if reply.is_success else "",
    )


def success_notice(route: Route, note: tuple[Any, ...]) -> str:
    """Who reports a delivery along ``route`` (RFC 3461 5.2.2): we, "delivered", for an LMTP or
    maildir delivery (final: nobody after us reports, as with Postfix's lmtp and local); the next hop when the
    deliverer noted that it took our DSN request (an answer's optional third item is true); else
    we, "relayed"."""
    if route.lmtp or route.maildir is not None:
        return "delivered"
    return "passed" if note and note[0] else "relayed"


def rewritten(recipient: Recipient, route: Route) -> Recipient:
    """The recipient as the next hop must see it, keeping the original as ORCPT (RFC 3461)."""
    if not route.recipient or route.recipient == recipient.address:
        return recipient
    return attrs.evolve(
        recipient, address=route.recipient, orcpt=recipient.orcpt or f"rfc822;{recipient.address}"
    )


@attrs.define
class _Group:
    """Recipients of one message that share a destination: one delivery."""

    route: Route
    indexes: list[int] = attrs.Factory(list)
    routes: list[Route] = attrs.Factory(list)  # each recipient's own (for its rewritten address)


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
        observer: IRelayObserver = NULL_OBSERVER,
        trusted_client: Callable[[str], bool] = lambda address: False,
    ) -> None:
        self.store = store
        self.observer = observer  # hears of recipients that routing settled (the deliverer's own are counted there)
        self._router = router
        self.deliverer = deliverer
        self.clock = reactor
        self._config = config
        self.hostname = hostname
        self.jitter = (
            jitter if jitter is not None else schedule.proportional_jitter(_random.Random().random)
        )
        self.max_active = max_active or max(2 * config.max_deliveries, 50)
        self.slots = DeliverySlots(config.max_deliveries, config.max_per_destination)
        # trusted_client: whether a client address is in the trusted networks (see Notifier)
        self.notifier = Notifier(store, reactor, config, hostname, trusted_client)
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[
            str, float
        ] = {}  # the live entry of each scheduled id (heap entries may be stale)
        self._seq = 0
        self._timer: Any = None
        self._soon: Any = None  # a _fire at the next turn, for what is due now
        self._ready: deque[str] = deque()
        self._active: dict[str, defer.Deferred[None]] = {}
        self._again: set[str] = set()  # asked for while active: attempt again right after
        self._flushed: set[str] = (
            set()
        )  # flushed while active: made due again before the next claim
        # Messages that found their destination's line full, woken a few at a time as it moves
        # (an ordered set per destination).
        self._blocked: dict[Hashable, dict[str, None]] = {}
        self._deliveries: set[defer.Deferred[Any]] = set()
        self._waiters: dict[str, list[defer.Deferred[None]]] = {}
        self._running = False
        self._stopping = False
        self._subscribed = False

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> defer.Deferred[int]:
        """Pick up new commits from now on, and every message already in the store.

        Returns a Deferred firing with the number of messages recovered.
        """
        self._running = True
        self._stopping = False
        if not self._subscribed:
            self.store.subscribe(self._committed)
            self._subscribed = True
        d = self._recover()
        d.addErrback(lambda f: log.failure("queue: start-up recovery failed", f))
        return d

    @defer.inlineCallbacks
    def _recover(self):  # type: ignore[no-untyped-def]
        # A store may offer ``load_schedule()``: every message's (id, next_attempt, held) in one
        # pass, without building each QueuedMessage (the filesystem spool does; 100,000 messages
        # then take seconds). Otherwise load them one by one, a few at a time.
        load_schedule = getattr(self.store, "load_schedule", None)
        if load_schedule is not None:
            entries = yield load_schedule()
        else:
            entries = yield self._load_one_by_one()
        found = 0
        for queue_id, next_attempt, held in entries:
            found += 1
            if (
                self._running
                and not held
                and queue_id not in self._active
                and queue_id not in self._due
            ):
                self._schedule(queue_id, next_attempt)
        log.info("queue: recovered {messages}", count=found, messages=plural(found, "message"))
        return found

    @defer.inlineCallbacks
    def _load_one_by_one(self):  # type: ignore[no-untyped-def]
        ids = iter((yield self.store.list_ids()))
        entries: list[tuple[str, float, bool]] = []

        @defer.inlineCallbacks
        def worker():  # type: ignore[no-untyped-def]
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
        """Stop starting attempts; let those in flight finish for ``grace`` seconds, then cancel them.

        A cancelled delivery counts as a temporary failure (4.3.2), recorded like any other; the
        Deferred fires once every attempt has saved its outcome.
        """
        self._running = False
        self._stopping = True
        for call in (self._timer, self._soon):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._soon = None
        active = list(self._active.values())
        if not active:
            return defer.succeed(None)
        cancel_later = self.clock.callLater(grace, self._cancel_deliveries)
        done = defer.DeferredList(active)

        def stopped(_: object) -> None:
            if cancel_later.active():
                cancel_later.cancel()

        return done.addCallback(stopped)

    def _cancel_deliveries(self) -> None:
        for d in list(self._deliveries):
            d.cancel()

    # -- scheduling ---------------------------------------------------------------------------

    def _committed(self, queue_id: str) -> None:
        if self._running:
            self._schedule(queue_id, self.clock.seconds())

    def flush(self, queue_id: str | None = None) -> defer.Deferred[int]:
        """Attempt ``queue_id`` (or every scheduled message) now; Deferred count of those flushed.

        A shared store (``ILeasingStore``) lets a node claim only due messages, so the message(s)
        are first made due in the store itself (``make_due``), which wakes the other nodes too; a
        message with an attempt running here is made due again before its next claim.
        """
        now = self.clock.seconds()
        if not ILeasingStore.providedBy(self.store):
            ids = [queue_id] if queue_id is not None else list(self._due)
            for qid in ids:
                self._schedule(qid, now)
            return defer.succeed(len(ids))

        def due(ids: list[str]) -> int:
            for qid in ids:
                if qid in self._active:
                    self._flushed.add(qid)
                self._schedule(qid, self.clock.seconds())
            return len(ids)

        store: Any = self.store
        return defer.maybeDeferred(store.make_due, queue_id).addCallback(due)

    def scheduled(self) -> dict[str, float]:
        """Every scheduled message id and when it is due (a copy)."""
        return dict(self._due)

    @property
    def router(self) -> IRouter:
        return self._router

    @router.setter
    def router(self, router: IRouter) -> None:
        """New routes (reload): the messages waiting for a busy destination are looked at again
        now, for they may go elsewhere, where no freed slot of the old destination would wake them."""
        if router is self._router:
            return  # a reload that kept the routes (an embedder's own router)
        self._router = router
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
        self._config = config
        self.slots.total = config.max_deliveries
        self.slots.per_destination = config.max_per_destination
        self.notifier.config = config
        self.slots.dispatch()  # higher caps may let waiting deliveries start now

    def active_ids(self) -> list[str]:
        """The ids with an attempt running now."""
        return list(self._active)

    def is_active(self, queue_id: str) -> bool:
        return queue_id in self._active

    def _schedule(self, queue_id: str, at: float) -> None:
        if queue_id in self._active:
            if at <= self.clock.seconds():
                self._again.add(queue_id)
            else:
                self._due[queue_id] = at  # taken up when the attempt ends
            return
        self._due[queue_id] = at
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, queue_id))
        self._arm()

    def _unschedule(self, queue_id: str) -> None:
        self._due.pop(queue_id, None)  # its heap entry goes stale
        self._again.discard(queue_id)
        self._flushed.discard(queue_id)

    def _arm(self) -> None:
        if not self._running:
            return
        while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        if not self._heap:
            return
        delay = max(0.0, self._heap[0][0] - self.clock.seconds())
        if delay == 0.0:
            # Due now (a new message, a destination freed): a call at the next turn. Moving the
            # long timer sooner instead costs a linear search of all the reactor's timed calls.
            if self._soon is None or not self._soon.active():
                self._soon = self.clock.callLater(0, self._fire)
            return
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self._heap[0][0]:
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
        while self._heap and self._heap[0][0] <= now:
            at, _, qid = heapq.heappop(self._heap)
            if self._due.get(qid) == at:
                del self._due[qid]
                self._ready.append(qid)
        self._pump()
        self._arm()

    def _pump(self) -> None:
        while self._ready and self._running and len(self._active) < self.max_active:
            qid = self._ready.popleft()
            if qid in self._active:
                self._again.add(qid)
                continue
            d = (
                self._leased_attempt(qid)
                if ILeasingStore.providedBy(self.store)
                else self._attempt(qid)
            )
            d.addErrback(self._attempt_failed, qid)
            if d.called:  # finished at once (an in-memory store and deliverer): no recursion
                self._ended(qid, pump=False)
                continue
            self._active[qid] = d
            d.addBoth(lambda _, qid=qid: self._ended(qid))

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
            self._schedule(
                queue_id, self.clock.seconds() + schedule.retry_delay(self.config.retry_schedule, 1)
            )

    def _ended(self, queue_id: str, pump: bool = True) -> None:
        self._active.pop(queue_id, None)
        for waiter in self._waiters.pop(queue_id, []):
            waiter.callback(None)
        if queue_id in self._again:
            self._again.discard(queue_id)
            self._schedule(queue_id, self.clock.seconds())
        elif queue_id in self._due:
            self._schedule(queue_id, self._due[queue_id])
        if pump:
            self._pump()

    def _idle(self, queue_id: str) -> defer.Deferred[None]:
        """A Deferred that fires when ``queue_id`` has no attempt running."""
        if queue_id not in self._active:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.setdefault(queue_id, []).append(d)
        return d

    # -- one attempt ----------------------------------------------------------------------

    def _leased_attempt(self, queue_id: str) -> defer.Deferred[None]:
        """A store shared with other nodes: attempt only under this node's lease, then give it back."""
        store: Any = self.store

        def claimed(ok: bool) -> Any:
            if not ok:
                return None  # another node has it, or it is not due; the store wakes us if orphaned
            return self._attempt(queue_id).addBoth(
                lambda result: store.release(queue_id).addCallback(lambda _: result)
            )

        if queue_id in self._flushed:  # the attempt running at the flush saved a later due time
            self._flushed.discard(queue_id)
            d = defer.maybeDeferred(store.make_due, queue_id)
            return d.addCallback(lambda _: store.claim(queue_id)).addCallback(claimed)
        return defer.maybeDeferred(store.claim, queue_id).addCallback(claimed)

    def _attempt(self, queue_id: str) -> defer.Deferred[None]:
        """Load, route, deliver, record: one attempt on ``queue_id``; fires once its outcome is saved.

        Plain calls while each step's answer is already there (a message just committed is in
        memory, a static route is known at once, a busy destination is not waited for): every
        message that arrives while its destination is busy is looked at without a generator or
        a Deferred per step. A step that must wait goes on when its Deferred fires."""
        try:
            loading = self.store.load(queue_id)
        except KeyError:
            return defer.succeed(None)  # deleted meanwhile (a store that says so at once)
        except Exception:
            return defer.fail()
        message = _now(loading)
        if message is _LATER:
            return loading.addCallbacks(self._loaded, _deleted)
        try:
            return self._loaded(message)
        except Exception:
            return defer.fail()

    def _loaded(self, message: QueuedMessage) -> defer.Deferred[None]:
        if message.held:
            return defer.succeed(None)
        started = self.clock.seconds()
        statuses = list(message.statuses)
        pending = [i for i, s in enumerate(statuses) if s.state is RecipientState.PENDING]
        routing = [self._route(statuses[i].recipient.address, message.envelope) for i in pending]
        answers = [_now(d) for d in routing]
        if _LATER in answers:
            return defer.gatherResults(routing).addCallback(
                lambda answers: self._routed(message, statuses, pending, answers, started)
            )
        return self._routed(message, statuses, pending, answers, started)

    def _routed(
        self,
        message: QueuedMessage,
        statuses: list[RecipientStatus],
        pending: list[int],
        answers: list[tuple[Route | None, Reply | None]],
        started: float,
    ) -> defer.Deferred[None]:
        groups: dict[Hashable, _Group] = {}
        for i, (route, reply) in zip(pending, answers, strict=True):
            if route is None:
                assert reply is not None
                statuses[i] = record(statuses[i], reply, None)
                self._log(message, statuses[i], started)
                self.observer.recipient_unrouted(
                    message.envelope, statuses[i].recipient.address, reply
                )
            else:
                group = groups.setdefault(route.destination, _Group(route))
                group.indexes.append(i)
                group.routes.append(route)
        unrouted = len(pending) > sum(len(g.indexes) for g in groups.values())

        blocked: list[Hashable] = []
        runs = []
        for destination, group in groups.items():
            if self.slots.waiting(destination) >= self.config.max_per_destination:
                blocked.append(destination)  # enough are queued for it already; wait for a turn
                continue
            runs.append(self._deliver(message, destination, group))
        if not runs:  # the destinations are all busy (or nothing was routed): nothing to wait for
            return self._recorded([], message, statuses, pending, blocked, unrouted, started)
        if len(runs) > 1 and ILeasingStore.providedBy(self.store):
            runs = self._saving_as_they_end(message, list(statuses), runs)
        delivering = (
            defer.gatherResults(runs) if len(runs) > 1 else runs[0].addCallback(lambda r: [r])
        )
        return delivering.addCallback(
            self._recorded, message, statuses, pending, blocked, unrouted, started
        )

    def _recorded(
        self,
        results: list[Any],
        message: QueuedMessage,
        statuses: list[RecipientStatus],
        pending: list[int],
        blocked: list[Hashable],
        unrouted: bool,
        started: float,
    ) -> defer.Deferred[None]:
        attempted = unrouted or any(r is not None for r in results)
        for group_result in results:
            for i, reply, remote, success in group_result or ():
                statuses[i] = record(statuses[i], reply, remote, success)
                self._log(message, statuses[i], started)
        loaded = message
        if attempted:  # else nothing was recorded: the statuses are the loaded ones
            message = attrs.evolve(message, statuses=tuple(statuses), attempts=message.attempts + 1)
        settling = self.notifier.settle(message, pending)
        settled = _now(settling)
        if settled is _LATER:
            return settling.addCallback(self._settled, loaded, blocked, attempted)
        return self._settled(settled, loaded, blocked, attempted)

    def _settled(
        self,
        message: QueuedMessage,
        loaded: QueuedMessage,
        blocked: list[Hashable],
        attempted: bool,
    ) -> defer.Deferred[None]:
        # unchanged: not attempted, nothing expired or warned (settle returned what it was given),
        # and the store still says all there is, due now (not after a flush)
        unchanged = message is loaded and loaded.next_attempt <= self.clock.seconds()
        saving = self._after_attempt(message, blocked, attempted, unchanged=unchanged)
        return saving.addCallback(_nothing) if saving is not None else defer.succeed(None)

    def _saving_as_they_end(
        self,
        message: QueuedMessage,
        statuses: list[RecipientStatus],
        runs: list[defer.Deferred[Any]],
    ) -> list[defer.Deferred[Any]]:
        """A store shared with other nodes: save each destination's outcomes as soon as they are
        known (one save at a time), so a node taking over after a crash does not send again to
        recipients already delivered. Each run's result passes on unchanged, after its save."""
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

            d = lock.run(self.store.save, attrs.evolve(message, statuses=tuple(statuses)))
            return d.addErrback(failed).addCallback(lambda _: result)

        return [run.addCallback(save) for run in runs]

    def _after_attempt(
        self,
        message: QueuedMessage,
        blocked: list[Hashable],
        attempted: bool,
        unchanged: bool = False,
    ) -> defer.Deferred[Any] | None:
        """Remove a message that is done; else save when it is due again and schedule it.

        A message that only waited for a busy destination and is ``unchanged`` since its load (and
        due by what the store holds) is not saved: the store already says it is due, which is all
        a restart needs (here it is woken when the destination frees, or at the fallback time).
        Saving it would cost a state file per waiting message when mail arrives faster than one
        destination takes it. A store shared with other nodes is always saved: the others read
        the due time from it. Not a generator: the unsaved case, every message that arrives for a
        busy destination, is plain calls (None), a Deferred only when there is a store to wait on."""
        qid = message.queue_id
        if not message.pending:
            return self.store.remove(qid)
        now = self.clock.seconds()
        shared = ILeasingStore.providedBy(self.store)
        if not attempted and self._stopping:
            at = now  # stopped before its turn: due at once when the queue starts again
        elif not attempted:
            # Only waited for a busy destination: woken when a slot of it frees (or the routes
            # change), so this is just a fallback, the schedule's longest interval: at its first
            # one, every message queued behind a slow destination would be loaded and routed
            # again each time. Other nodes read the due time of a shared store: the first there.
            at = now + schedule.retry_delay(
                self.config.retry_schedule,
                1 if shared else len(self.config.retry_schedule),
                self.jitter,
            )
        else:
            at = schedule.next_attempt_at(
                message, self.config.retry_schedule, self.config.max_lifetime, now, self.jitter
            )
        if unchanged and not shared:
            self._wait_for(qid, at, blocked)
            return None

        def gone(f: Failure) -> None:
            f.trap(KeyError)  # deleted while we were delivering: nothing to schedule

        d = defer.maybeDeferred(self.store.save, attrs.evolve(message, next_attempt=at))
        return d.addCallbacks(lambda _: self._wait_for(qid, at, blocked), gone)

    def _wait_for(self, queue_id: str, at: float, blocked: list[Hashable]) -> None:
        """Due again at ``at``, or sooner when one of the ``blocked`` destinations frees."""
        for destination in blocked:
            self._blocked.setdefault(destination, {})[queue_id] = None
        if not self._stopping:
            self._schedule(queue_id, at)

    def _route(
        self, address: str, envelope: Envelope
    ) -> defer.Deferred[tuple[Route | None, Reply | None]]:
        """Route one recipient; never fails: ``(route, None)`` or ``(None, reply to record)``."""
        try:
            answer = self.router.route(address, envelope)
        except Exception:
            d = defer.fail()
        else:
            d = answer if isinstance(answer, defer.Deferred) else defer.succeed(answer)

        def answered(route: Route | None) -> tuple[Route | None, Reply | None]:
            return (route, None) if route is not None else (None, no_route(address))

        def failed(f: Failure) -> tuple[None, Reply]:
            if f.check(TemporaryFailure, PermanentFailure):
                err: MailRelayError = f.value  # type: ignore[assignment]
                return None, err.reply
            log.failure("queue: router failed for <{address}>", f, address=address)
            return None, routing_error()

        return d.addCallbacks(answered, failed)

    @defer.inlineCallbacks
    def _deliver(self, message: QueuedMessage, destination: Hashable, group: _Group):  # type: ignore[no-untyped-def]
        """One delivery under the slot caps; a list of ``(index, reply, remote, success)``, or None if not run."""
        try:
            yield self.slots.acquire(destination)
        except defer.CancelledError:
            return None
        try:
            if self._stopping:
                return None
            recipients = [
                rewritten(message.statuses[i].recipient, route)
                for i, route in zip(group.indexes, group.routes, strict=True)
            ]
            qid = message.queue_id
            d = defer.maybeDeferred(
                self.deliverer.deliver,
                message.envelope,
                recipients,
                group.route,
                lambda: self.store.open_body(qid),
            )
            self._deliveries.add(d)
            try:
                answers = yield d
            except defer.CancelledError:
                answers = [(shutdown_reply(), None)] * len(recipients)
            except Exception:
                log.failure("queue: deliverer failed for {queue_id}", queue_id=qid)
                answers = [(delivery_error(), None)] * len(recipients)
            finally:
                self._deliveries.discard(d)
            if len(answers) != len(recipients):
                log.error(
                    "queue: deliverer gave {n} answers for {m} recipients",
                    n=len(answers),
                    m=len(recipients),
                )
                answers = [(delivery_error(), None)] * len(recipients)
            return [
                (i, reply, remote, success_notice(route, note))
                for i, route, (reply, remote, *note) in zip(
                    group.indexes, group.routes, answers, strict=True
                )
            ]
        finally:
            self.slots.release(destination)
            self._wake_blocked(destination)

    def _wake_blocked(self, destination: Hashable) -> None:
        """A slot to ``destination`` freed: attempt as many blocked messages as its line has room for.

        Only that many, so 10,000 messages for a dead destination are not all reloaded and
        rerouted each time one of its deliveries times out.
        """
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
        if queue_id in self._due or queue_id in self._active:
            self._schedule(queue_id, now)
            return True
        return False

    # -- operator actions (used by the control channel) -----------------------------------

    @defer.inlineCallbacks
    def hold(self, queue_id: str):  # type: ignore[no-untyped-def]
        """Keep ``queue_id`` in the queue without attempting it until ``release``."""
        yield self._idle(queue_id)
        message = yield self.store.load(queue_id)
        yield self.store.save(attrs.evolve(message, held=True))
        self._unschedule(queue_id)

    @defer.inlineCallbacks
    def release(self, queue_id: str):  # type: ignore[no-untyped-def]
        """Undo ``hold``: the message is attempted at once."""
        yield self._idle(queue_id)
        message = yield self.store.load(queue_id)
        now = self.clock.seconds()
        yield self.store.save(attrs.evolve(message, held=False, next_attempt=now))
        if self._running:
            self._schedule(queue_id, now)

    @defer.inlineCallbacks
    def delete(self, queue_id: str):  # type: ignore[no-untyped-def]
        """Remove ``queue_id`` from the queue without delivering or bouncing it."""
        self._unschedule(queue_id)
        yield self._idle(queue_id)
        self._unschedule(queue_id)
        yield self.store.remove(queue_id)

    # -- logging ---------------------------------------------------------------------------

    def _log(self, message: QueuedMessage, status: RecipientStatus, started: float) -> None:
        # One line per recipient and attempt: formatted here with an f-string and handed over as
        # ``log_text`` (one field for the observer to format, not eight with format specs); the
        # fields stay in the event for structured (JSON) logs.
        reply = status.last_reply
        assert reply is not None
        outcome = _OUTCOMES.get(status.state, "deferred")
        now = self.clock.seconds()
        received = message.envelope.received_at
        delay = now - received if received else 0.0
        attempt = now - started
        rcpt = status.recipient.address
        relay = status.remote or "none"
        dsn = reply.enhanced or f"{reply.code // 100}.0.0"
        text = str(reply)
        log.info(
            "{log_text}",
            log_text=f"{message.queue_id}: to=<{rcpt}>, relay={relay}, delay={delay:.2f}, delays={attempt:.2f},"
            f" dsn={dsn}, status={outcome} ({text})",
            queue_id=message.queue_id,
            rcpt=rcpt,
            relay=relay,
            delay=delay,
            attempt=attempt,
            dsn=dsn,
            status=outcome,
            reply=text,
        )


_OUTCOMES = {RecipientState.DELIVERED: "sent", RecipientState.FAILED: "bounced"}

_LATER: Any = object()  # what _now says of a Deferred that has no result yet


def _now(d: defer.Deferred[Any]) -> Any:
    """The success result of ``d`` if it has one already (as Deferred.__iter__ reads it), else
    ``_LATER``: the caller then adds its callbacks to ``d`` as for any Deferred (a failure is
    left there for them, not raised)."""
    if d.called and not d.paused and not isinstance(d.result, Failure):
        return d.result
    return _LATER


def _deleted(failure: Failure) -> None:
    failure.trap(KeyError)  # deleted meanwhile: nothing to attempt


def _nothing(_: object) -> None:
    return None
