"""``ByRouteDeliverer``: the default deliverer, which picks how to deliver from what the route says.

Routing answers where (hosts, or a local ``maildir``); this answers how: over ESMTP/LMTP with
``SMTPDeliverer``, or by writing files with ``MaildirDeliverer``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import IO, Any

from twisted.internet import defer
from zope.interface import implementer

from mailrelay.envelope import Envelope, Recipient, Reply, Route
from mailrelay.interfaces import IDeliverer


@implementer(IDeliverer)
class ByRouteDeliverer:
    """Routes with ``maildir`` go to ``maildir``, the rest to ``network``.

    Other attributes (``stop()``, ``pool``, ``observer``) are the network deliverer's.
    """

    def __init__(self, network: IDeliverer, maildir: IDeliverer) -> None:
        self.network = network
        self.maildir = maildir

    def deliver(self, envelope: Envelope, recipients: Sequence[Recipient], route: Route,
                open_body: Callable[[], IO[bytes]]) -> defer.Deferred[list[tuple[Reply, str | None]]]:
        deliverer = self.maildir if route.maildir is not None else self.network
        return deliverer.deliver(envelope, recipients, route, open_body)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.network, name)
