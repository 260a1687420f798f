"""A chain of routers tried in config order: the first that answers decides.

Every router may answer synchronously or through a Deferred, and so does the chain (``IRouter``):
at once (a ``Route``, or it raises) while its routers answer at once, through a Deferred from the
first that answers through one. Callers handle both, as for any router; a static route then costs
no Deferred at all (a ``gatherResults`` per message in the queue manager cost 5% of the relay's
instructions end to end). A failure (temporary or permanent) stops the chain: a router that cannot
answer now must not let a later, less specific router send the mail elsewhere.

A rewritten recipient (``Route.recipient``, e.g. LDAP's ``mailRoutingAddress``) comes from
directory data or a plugin, not from the SMTP parser: the chain checks it is a mailbox before
anyone writes it into an ``RCPT TO`` command, so a CR/LF in a directory value is a temporary
failure (the operator fixes the entry), never a command of ours.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet import defer
from zope.interface import implementer

from mailrelay.address import domain_of
from mailrelay.envelope import Envelope, Reply, Route
from mailrelay.errors import PermanentFailure, TemporaryFailure
from mailrelay.interfaces import IRouter
from mailrelay.paths import PathError, parse_mailbox


def checked(route: Route) -> Route:
    """``route`` if its rewritten recipient (if any) is a mailbox, else ``TemporaryFailure``."""
    if route.recipient is not None:
        try:
            parse_mailbox(route.recipient)
        except PathError as e:
            raise TemporaryFailure(
                Reply(
                    451,
                    "4.3.5",
                    f"the router rewrote the recipient to a bad address ({e}): {route.recipient!r}",
                )
            ) from None
    return route


def no_route_reply(recipient: str) -> Reply:
    """The reply for a recipient that no router claims (RFC 3463 X.1.2: bad destination system)."""
    return Reply(550, "5.1.2", f"no route to domain {domain_of(recipient) or recipient!r}")


@implementer(IRouter)
class RouterChain:
    """Provides ``IRouter`` over ``routers``, asked in order.

    When no router answers, the chain answers ``default`` if one is given, else it fails with
    ``PermanentFailure`` (550 5.1.2), so that an unroutable recipient is refused at RCPT (when
    recipient verification is on) or bounced, never retried forever.
    """

    def __init__(self, routers: Sequence[IRouter], default: Route | None = None) -> None:
        self.routers: tuple[IRouter, ...] = tuple(routers)
        self.default = default

    def __repr__(self) -> str:
        return f"RouterChain({list(self.routers)!r})"

    def route(self, recipient: str, envelope: Envelope) -> Route | defer.Deferred[Route]:
        """The first router's non-``None`` answer (or the default), at once or as a Deferred.

        Synchronous answers are taken synchronously (no generator, no callback chain per router):
        the chain runs for every recipient, at RCPT and at every delivery attempt.
        """
        return self._ask(recipient, envelope, 0)

    def _ask(self, recipient: str, envelope: Envelope, start: int) -> Route | defer.Deferred[Route]:
        for index in range(start, len(self.routers)):
            answer = self.routers[index].route(recipient, envelope)
            if isinstance(answer, defer.Deferred):
                return answer.addCallback(self._answered, recipient, envelope, index)
            if answer is not None:
                return checked(answer)
        return self._unanswered(recipient)

    def _answered(
        self, answer: Route | None, recipient: str, envelope: Envelope, index: int
    ) -> Route | defer.Deferred[Route]:
        if answer is not None:
            return checked(answer)
        return self._ask(recipient, envelope, index + 1)

    def _unanswered(self, recipient: str) -> Route:
        if self.default is not None:
            return self.default
        raise PermanentFailure(no_route_reply(recipient))

    def close(self) -> defer.Deferred[None]:
        """Release what the routers hold (LDAP connections): calls each router's optional
        ``close()`` (which may return a Deferred). For the service's shutdown and route reloads."""
        closers: list[Callable[[], object]] = [
            close for close in (getattr(r, "close", None) for r in self.routers) if callable(close)
        ]
        closing = [defer.maybeDeferred(close) for close in closers]
        return defer.gatherResults(closing, consumeErrors=True).addCallback(lambda _: None)
