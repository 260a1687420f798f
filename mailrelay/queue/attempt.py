"""One attempt on one message: load it, route each pending recipient, deliver to each destination
under the slot caps, and record every answer in the recipients' statuses.

What comes out is an ``Outcome``: the message as it stands after the attempt (answers recorded,
expiry and delay reports settled by the ``Notifier``), the destinations too busy to wait for, and
whether anything was attempted. Saving it and choosing when it is due again is the queue manager's
job (*when*); nothing here schedules. Routing never fails an attempt (a router's failure is a
reply recorded for its recipient), nor does delivery (a deliverer's failure is a 4xx for each of
its recipients); only the store's failures reach the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Hashable
from typing import Any, TypeAlias

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.config import QueueConfig
from mailrelay.envelope import (
    Envelope,
    QueuedMessage,
    RecipientState,
    RecipientStatus,
    Reply,
    Route,
)
from mailrelay.errors import MailRelayError, PermanentFailure, TemporaryFailure
from mailrelay.queue.body import prefixed
from mailrelay.queue.notify import Notifier
from mailrelay.queue.outcome import (
    delivery_error,
    log_status,
    no_route,
    record,
    rewritten,
    routing_error,
    shutdown_reply,
    success_notice,
)
from mailrelay.queue.sharing import Sharing
from mailrelay.queue.slots import DeliverySlots

#: What an ``inlineCallbacks`` generator yields and is sent: Deferreds and their results.
Steps: TypeAlias = Generator[defer.Deferred[Any], Any, Any]

log = Logger(namespace="mailrelay.queue")

#: One delivery's answers: ``(recipient index, reply, remote, success)`` each; None if not run.
Answers = list[tuple[int, Reply, str | None, str]] | None


@attrs.frozen
class Outcome:
    """What one attempt left: ``message`` to save (or remove, when nothing is pending)."""

    message: QueuedMessage
    blocked: list[Hashable]  # destinations that were too busy: the message waits for them
    attempted: bool  # else it only waited for busy destinations
    unchanged: bool  # nothing recorded, expired or reported, and the store has it due already


@attrs.define
class _Group:
    """Recipients of one message that share a destination: one delivery."""

    route: Route
    indexes: list[int] = attrs.Factory(list)
    routes: list[Route] = attrs.Factory(list)  # each recipient's own (for its rewritten address)


class Attempts:
    """Runs attempts with the store, router and deliverer it is given, under ``slots``.

    ``router`` and ``config`` may be replaced between attempts (a reload). ``slot_freed`` hears of
    every destination whose delivery ended; ``stopping`` makes deliveries still waiting for a
    slot give up; ``cancel`` cancels those under way (each then records 4.3.2).
    """

    def __init__(
        self,
        store: Any,
        router: Any,
        deliverer: Any,
        clock: Any,
        config: QueueConfig,
        slots: DeliverySlots,
        notifier: Notifier,
        sharing: Sharing,
        observer: Any,
        slot_freed: Callable[[Hashable], None],
    ) -> None:
        self.store = store  # IQueueStore
        self.router = router  # IRouter
        self.deliverer = deliverer  # IDeliverer
        self.clock = clock
        self.config = config
        self.slots = slots
        self.notifier = notifier
        self.sharing = sharing
        self.observer = observer  # IRelayObserver: hears of recipients routing settled
        self.slot_freed = slot_freed
        self.stopping = False
        self._deliveries: set[defer.Deferred[Any]] = set()

    def run(self, queue_id: str) -> defer.Deferred[Outcome | None]:
        """One attempt on ``queue_id``; None when it was deleted or held meanwhile."""
        d: defer.Deferred[Any] = defer.maybeDeferred(self.store.load, queue_id)
        return d.addCallbacks(self._loaded, _deleted)

    def cancel(self) -> None:
        """Cancel every delivery under way."""
        for d in list(self._deliveries):
            d.cancel()

    def _loaded(self, message: QueuedMessage) -> defer.Deferred[Any]:  # of Outcome or None
        if message.held:
            return defer.succeed(None)
        started: float = self.clock.seconds()
        statuses = list(message.statuses)
        pending = [i for i, s in enumerate(statuses) if s.state is RecipientState.PENDING]
        addresses = [statuses[i].recipient.address for i in pending]
        d = self._route_all(addresses, message.envelope)
        return d.addCallback(self._routed, message, statuses, pending, started)

    def _route_all(
        self, addresses: list[str], envelope: Envelope
    ) -> defer.Deferred[list[tuple[Route | None, Reply | None]]]:
        """Route each recipient; never fails: ``(route, None)`` or ``(None, reply to record)``
        each. A router may answer at once or with a Deferred (``IRouter``): one Deferred for
        all the answers (not one per recipient) when they came at once, the common case."""

        def answered(route: Route | None, address: str) -> tuple[Route | None, Reply | None]:
            return (route, None) if route is not None else (None, no_route(address))

        def failed(f: Failure, address: str) -> tuple[None, Reply]:
            if isinstance(f.value, TemporaryFailure | PermanentFailure):
                error: MailRelayError = f.value
                return None, error.reply
            log.failure("queue: router failed for <{address}>", f, address=address)
            return None, routing_error()

        answers: list[Any] = []
        waiting = False
        for address in addresses:
            try:
                route = self.router.route(address, envelope)
            except Exception:
                answers.append(failed(Failure(), address))
                continue
            if isinstance(route, defer.Deferred):
                waiting = True
                answers.append(
                    route.addCallbacks(
                        answered, failed, callbackArgs=(address,), errbackArgs=(address,)
                    )
                )
            else:
                answers.append(answered(route, address))
        if not waiting:
            return defer.succeed(answers)
        return defer.gatherResults(
            [a if isinstance(a, defer.Deferred) else defer.succeed(a) for a in answers]
        )

    def _routed(
        self,
        answers: list[tuple[Route | None, Reply | None]],
        message: QueuedMessage,
        statuses: list[RecipientStatus],
        pending: list[int],
        started: float,
    ) -> defer.Deferred[Outcome]:
        groups: dict[Hashable, _Group] = {}
        for i, (route, reply) in zip(pending, answers, strict=True):
            if route is None:
                assert reply is not None
                statuses[i] = record(statuses[i], reply, None)
                log_status(message, statuses[i], started, self.clock.seconds())
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
        if not runs:  # every destination busy (or nothing routed): nothing to wait for
            return self._recorded([], message, statuses, pending, blocked, unrouted, started)
        runs = self.sharing.saving_as_they_end(message, statuses, runs)
        return _all(runs).addCallback(
            self._recorded, message, statuses, pending, blocked, unrouted, started
        )

    @defer.inlineCallbacks
    def _deliver(self, message: QueuedMessage, destination: Hashable, group: _Group) -> Steps:
        """One delivery under the slot caps: its ``Answers``."""
        try:
            yield self.slots.acquire(destination)
        except defer.CancelledError:
            return None
        try:
            if self.stopping:
                return None
            recipients = [
                rewritten(message.statuses[i].recipient, route)
                for i, route in zip(group.indexes, group.routes, strict=True)
            ]
            qid, prefix = message.queue_id, message.prefix
            d = defer.maybeDeferred(
                self.deliverer.deliver,
                message.envelope,
                recipients,
                group.route,
                # the text as stored, behind what intake added once (a DKIM signature)
                lambda: prefixed(prefix, self.store.open_body(qid)),
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
            self.slot_freed(destination)

    def _recorded(
        self,
        results: list[Answers],
        message: QueuedMessage,
        statuses: list[RecipientStatus],
        pending: list[int],
        blocked: list[Hashable],
        unrouted: bool,
        started: float,
    ) -> defer.Deferred[Outcome]:
        attempted = unrouted or any(r is not None for r in results)
        for answers in results:
            for i, reply, remote, success in answers or ():
                statuses[i] = record(statuses[i], reply, remote, success)
                log_status(message, statuses[i], started, self.clock.seconds())
        loaded = message
        if attempted:  # else nothing was recorded: the statuses are the loaded ones
            message = attrs.evolve(message, statuses=tuple(statuses), attempts=message.attempts + 1)

        def settled(message: QueuedMessage) -> Outcome:
            # unchanged: not attempted, nothing expired or warned (settle returned what it was
            # given), and the store still says all there is, due now (not after a flush)
            unchanged = message is loaded and loaded.next_attempt <= self.clock.seconds()
            return Outcome(message, blocked, attempted, unchanged)

        return self.notifier.settle(message, pending).addCallback(settled)


def _deleted(failure: Failure) -> None:
    failure.trap(KeyError)  # deleted meanwhile: nothing to attempt


def _all(runs: list[defer.Deferred[Answers]]) -> defer.Deferred[list[Answers]]:
    """The results of ``runs`` in order; fails with the first failure (not gatherResults'
    wrapper of it). None or one run, the common cases, cost no DeferredList."""
    if not runs:
        return defer.succeed([])
    if len(runs) == 1:
        return runs[0].addCallback(lambda answers: [answers])
    d = defer.gatherResults(runs, consumeErrors=True)
    return d.addErrback(lambda f: f.value.subFailure if f.check(defer.FirstError) else f)
