"""What the relay tells whoever watches it: connections, replies, accepted messages, deliveries.

The wire and the queue call an ``IRelayObserver`` passed in; they know nothing of Prometheus or of
log formats. ``RelayObserver`` is the do-nothing base to subclass (override only what you count);
``FanOut`` hands each event to several observers (metrics and an embedder's own, say).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.logger import Logger
from zope.interface import Interface, implementer

from mailrelay.envelope import Envelope, Reply

log = Logger()


class IRelayObserver(Interface):
    """Events worth counting. Every method returns nothing and must not raise."""

    def connection_opened(info: Any) -> None:
        """A client connected (``info``: the session's ``SessionInfo``)."""

    def connection_closed(info: Any) -> None:
        """That client's connection ended."""

    def connection_refused(client_address: str, reply: Reply) -> None:
        """A connection over the limits was turned away with ``reply``."""

    def tls_established(direction: str, version: str) -> None:
        """A TLS handshake completed; ``direction`` is ``"inbound"`` or ``"outbound"``."""

    def command_rejected(command: str, reply: Reply) -> None:
        """The server answered ``command`` (``"RCPT"``, ``"DATA"``...) with a 4xx/5xx ``reply``."""

    def message_accepted(info: Any, envelope: Envelope, queue_id: str, size: int) -> None:
        """A message was committed to the queue and got its 250."""

    def delivery_attempted(
        envelope: Envelope, reply: Reply, remote: str | None, seconds: float
    ) -> None:
        """One recipient's outcome of one delivery attempt that took ``seconds``."""

    def outbound_connection(remote: str, tls: str) -> None:
        """A new connection to a next hop is ready; ``tls`` is ``""`` or ``"TLSv1.3 <cipher>"``."""

    def recipient_unrouted(envelope: Envelope, recipient: str, reply: Reply) -> None:
        """``recipient`` (an address of ``envelope``) got ``reply`` from routing, with no delivery
        attempt: 5xx (no route, so it is bounced) or 4xx (a router could not answer; it is tried
        again later)."""


@implementer(IRelayObserver)
class RelayObserver:
    """Observes nothing: subclass it and override the events you care about."""

    def connection_opened(self, info: Any) -> None:
        pass

    def connection_closed(self, info: Any) -> None:
        pass

    def connection_refused(self, client_address: str, reply: Reply) -> None:
        pass

    def tls_established(self, direction: str, version: str) -> None:
        pass

    def command_rejected(self, command: str, reply: Reply) -> None:
        pass

    def message_accepted(self, info: Any, envelope: Envelope, queue_id: str, size: int) -> None:
        pass

    def delivery_attempted(
        self, envelope: Envelope, reply: Reply, remote: str | None, seconds: float
    ) -> None:
        pass

    def outbound_connection(self, remote: str, tls: str) -> None:
        pass

    def recipient_unrouted(self, envelope: Envelope, recipient: str, reply: Reply) -> None:
        pass


#: The default of every ``observer=`` parameter.
NULL_OBSERVER = RelayObserver()


@implementer(IRelayObserver)
class FanOut:
    """Several observers as one; a failing observer is logged and never reaches the caller."""

    def __init__(self, observers: Iterable[IRelayObserver]) -> None:
        self.observers = tuple(observers)

    def _each(self, method: str, *args: Any) -> None:
        for observer in self.observers:
            call = getattr(observer, method, None)
            if call is None:
                continue  # written before this event existed, and not a RelayObserver subclass
            try:
                call(*args)
            except Exception:
                log.failure(
                    "observer {observer!r} failed on {method}", observer=observer, method=method
                )

    def connection_opened(self, info: Any) -> None:
        self._each("connection_opened", info)

    def connection_closed(self, info: Any) -> None:
        self._each("connection_closed", info)

    def connection_refused(self, client_address: str, reply: Reply) -> None:
        self._each("connection_refused", client_address, reply)

    def tls_established(self, direction: str, version: str) -> None:
        self._each("tls_established", direction, version)

    def command_rejected(self, command: str, reply: Reply) -> None:
        self._each("command_rejected", command, reply)

    def message_accepted(self, info: Any, envelope: Envelope, queue_id: str, size: int) -> None:
        self._each("message_accepted", info, envelope, queue_id, size)

    def delivery_attempted(
        self, envelope: Envelope, reply: Reply, remote: str | None, seconds: float
    ) -> None:
        self._each("delivery_attempted", envelope, reply, remote, seconds)

    def outbound_connection(self, remote: str, tls: str) -> None:
        self._each("outbound_connection", remote, tls)

    def recipient_unrouted(self, envelope: Envelope, recipient: str, reply: Reply) -> None:
        self._each("recipient_unrouted", envelope, recipient, reply)
