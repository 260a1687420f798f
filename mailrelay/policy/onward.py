"""Refuse at DATA what no next hop can carry, when the client is not trusted.

An untrusted client that sends what the next hop lacks (SMTPUTF8, a size over its limit) would
get a 250 from us and a failure later, reported to no one (see the queue's reports: such a
failure goes only to trusted senders, else a forged sender would receive it). Where the
recipient's route is made only of hops whose EHLO we remember (``HopCapabilities``), that failure
is known now: the client gets it while it still holds the message. Trusted clients pass; an
unknown hop, a route that cannot be found now, or a router error is no objection.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from mailrelay.delivery.capabilities import HopCapabilities
from mailrelay.envelope import Envelope, Reply, Route
from mailrelay.interfaces import IPolicy, IRouter
from mailrelay.policy import Policy


@implementer(IPolicy)
class OnwardCapabilities(Policy):
    """At DATA (declared SMTPUTF8 and SIZE) and at the end of data (the real size)."""

    def __init__(
        self,
        router: IRouter,
        capabilities: HopCapabilities,
        clock: IReactorTime,
        timeout: float = 30.0,
    ) -> None:
        self.router: Any = router  # an IRouter provider (route() may return a Deferred)
        self.capabilities = capabilities
        self.clock = clock
        self.timeout = timeout

    def data(self, session: Any, envelope: Envelope) -> defer.Deferred[Reply | None] | None:
        return self._check(session, envelope, None)

    def end_of_data(
        self, session: Any, envelope: Envelope, size: int
    ) -> defer.Deferred[Reply | None] | None:
        return self._check(session, envelope, size)

    def _check(
        self, session: Any, envelope: Envelope, size: int | None
    ) -> defer.Deferred[Reply | None] | None:
        if session.trusted or session.auth or not self.capabilities.refuses_any(envelope, size):
            return None  # the common case: no known hop would refuse it, no routing needed
        checks = [self._one(r.address, envelope, size) for r in envelope.recipients]
        return defer.gatherResults(checks).addCallback(
            lambda replies: next((r for r in replies if r), None)
        )

    def _one(
        self, recipient: str, envelope: Envelope, size: int | None
    ) -> defer.Deferred[Reply | None]:
        d = defer.maybeDeferred(self.router.route, recipient, envelope)
        d.addTimeout(self.timeout, self.clock)

        def routed(route: Route | None) -> Reply | None:
            reply = self.capabilities.refusal(envelope, route, size) if route is not None else None
            return (
                None
                if reply is None
                else Reply(reply.code, reply.enhanced, f"<{recipient}>: {reply.text}")
            )

        return d.addCallbacks(routed, lambda _: None)
