"""Signing at delivery: the wiring of today, to be replaced by signing at intake (``intake``).

``DKIMSigningDeliverer`` wraps the real deliverer: before each attempt it streams the message from
the store through a ``MessageSigner`` in the thread pool, then hands the deliverer the signature in
front of the stored message (``PrefixedBody``). Nothing of the body is held in memory, but the
message is read and signed again on every attempt and for every destination group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import IO, Any

from twisted.internet import defer, threads
from zope.interface import implementer

from mailrelay.dkim.prefixed import PrefixedBody
from mailrelay.dkim.signer import DKIMSigner, MessageSigner
from mailrelay.envelope import Envelope, Recipient, Reply, Route
from mailrelay.interfaces import IDeliverer

#: Octets read from the store at a time while signing.
CHUNK = 64 * 1024


def sign_file(
    stream: MessageSigner, open_body: Callable[[], IO[bytes]], timestamp: int
) -> bytes | None:
    """Feed ``stream`` the stored message and return its signature (or None). Blocking."""
    with open_body() as f:
        while not stream.done:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            stream.feed(chunk)
    return stream.signature(timestamp)


@implementer(IDeliverer)
class DKIMSigningDeliverer:
    """An ``IDeliverer`` that signs each message for its sender domain, then hands it on."""

    def __init__(self, deliverer: Any, signer: DKIMSigner, reactor: Any, threadpool: Any) -> None:
        self.deliverer = deliverer
        self.signer = signer
        self.reactor = reactor
        self.threadpool = threadpool

    def deliver(
        self,
        envelope: Envelope,
        recipients: Sequence[Recipient],
        route: Route,
        open_body: Callable[[], IO[bytes]],
    ) -> defer.Deferred[list[tuple[Reply, str | None]]]:
        stream = self.signer.start(envelope)
        if stream is None:
            return defer.maybeDeferred(
                self.deliverer.deliver, envelope, recipients, route, open_body
            )
        d = threads.deferToThreadPool(
            self.reactor,
            self.threadpool,
            sign_file,
            stream,
            open_body,
            int(self.reactor.seconds()),
        )

        def signed(signature: bytes | None) -> Any:
            if signature is None:
                return self.deliverer.deliver(envelope, recipients, route, open_body)

            def signed_body() -> IO[bytes]:
                return PrefixedBody(signature, open_body())

            return self.deliverer.deliver(envelope, recipients, route, signed_body)

        return d.addCallback(signed)

    def __getattr__(self, name: str) -> Any:  # stop(), pool, ... of the wrapped deliverer
        return getattr(self.deliverer, name)
