"""``ObservedDeliverer``: reports each recipient's outcome of a delivery attempt to the observer.

Wrapping the deliverer keeps the queue manager and the SMTP client free of counting code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import IO

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from mailrelay.delivery.capabilities import HopCapabilities
from mailrelay.envelope import Envelope, Recipient, Reply, Route
from mailrelay.interfaces import IDeliverer
from mailrelay.observer import IRelayObserver


@implementer(IDeliverer)
class ObservedDeliverer:
    """An ``IDeliverer`` that reports each recipient's outcome and the attempt's duration.

    ``capabilities`` are the wrapped deliverer's (what its hops offered, for the server's check at
    DATA; None for one that keeps none); ``stop()`` stops it.
    """

    def __init__(
        self, deliverer: IDeliverer, observer: IRelayObserver, clock: IReactorTime
    ) -> None:
        self.deliverer = deliverer
        self.observer = observer
        self.clock = clock
        self.capabilities: HopCapabilities | None = getattr(deliverer, "capabilities", None)

    def deliver(
        self,
        envelope: Envelope,
        recipients: Sequence[Recipient],
        route: Route,
        open_body: Callable[[], IO[bytes]],
    ) -> defer.Deferred[list[tuple[Reply, str | None]]]:
        started = self.clock.seconds()
        try:
            answer = self.deliverer.deliver(envelope, recipients, route, open_body)
        except Exception:
            return defer.fail()
        d = answer if isinstance(answer, defer.Deferred) else defer.succeed(answer)
        return d.addCallback(self._report, envelope, started)

    def _report(
        self, results: list[tuple[Reply, str | None]], envelope: Envelope, started: float
    ) -> list[tuple[Reply, str | None]]:
        seconds = max(0.0, self.clock.seconds() - started)
        observer = self.observer
        for reply, remote, *_ in results:
            observer.delivery_attempted(envelope, reply, remote, seconds)
        return results

    def stop(self) -> defer.Deferred[None]:
        """Stop the wrapped deliverer (its cached connections), if it has anything to stop."""
        stop = getattr(self.deliverer, "stop", None)
        return defer.maybeDeferred(stop) if stop is not None else defer.succeed(None)
