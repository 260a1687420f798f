"""``ByRouteDeliverer``: the default deliverer, which picks how to deliver from what the route says.

Routing answers where (hosts, or a local ``maildir``); this answers how: over ESMTP/LMTP with
``SMTPDeliverer``, or by writing files with ``MaildirDeliverer``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import IO

from twisted.internet import defer
from zope.interface import implementer

from mailrelay.delivery.capabilities import HopCapabilities
from mailrelay.envelope import Envelope, Recipient, Reply, Route
from mailrelay.interfaces import IDeliverer


@implementer(IDeliverer)
class ByRouteDeliverer:
    """Routes with ``maildir`` go to ``maildir``, the rest to ``network``.

    ``capabilities`` are the network deliverer's (``SMTPDeliverer.capabilities``, what its hops
    offered; None for one that keeps none), for the server's check at DATA; ``stop()`` stops it.
    """

    def __init__(self, network: IDeliverer, maildir: IDeliverer) -> None:
        self.network = network
        self.maildir = maildir
        self.capabilities: HopCapabilities | None = getattr(network, "capabilities", None)

    def deliver(
        self,
        envelope: Envelope,
        recipients: Sequence[Recipient],
        route: Route,
        open_body: Callable[[], IO[bytes]],
    ) -> defer.Deferred[list[tuple[Reply, str | None]]]:
        deliverer = self.maildir if route.maildir is not None else self.network
        answers: defer.Deferred[list[tuple[Reply, str | None]]] = deliverer.deliver(
            envelope, recipients, route, open_body
        )
        return answers

    def stop(self) -> defer.Deferred[None]:
        """Stop the network deliverer (its cached connections); a maildir holds nothing open."""
        stop = getattr(self.network, "stop", None)
        return defer.maybeDeferred(stop) if stop is not None else defer.succeed(None)
