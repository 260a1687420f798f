"""Recipient verification at RCPT: refuse a recipient of our own domains that the routers refuse.

A recipient of a local or relay domain is routed at RCPT time, so that "no such user" is a 550 to
the client (who still holds the message and can tell its user) instead of a bounce later, which
for forged senders would be backscatter. A router that cannot answer now gives 451 (the client
retries). Recipients of other domains are not checked here: relay access decides about those, and
their routing (MX) may legitimately fail for a while.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.address import canonical_pattern, domain_matches, split
from mailrelay.config import ServerConfig
from mailrelay.envelope import Envelope, Recipient, Reply
from mailrelay.errors import PermanentFailure, TemporaryFailure
from mailrelay.interfaces import IPolicy, IRouter
from mailrelay.policy import Policy

log = Logger()


@implementer(IPolicy)
class RecipientVerification(Policy):
    """Asks ``router`` about every recipient in ``domains`` (exact, or ``.sub`` for subdomains).

    ``PermanentFailure`` → 550 5.1.1; ``TemporaryFailure``, any other error, or no answer within
    ``timeout`` seconds of ``clock`` → 451 4.4.3. A route or ``None`` is no objection.
    """

    def __init__(
        self, router: IRouter, domains: Iterable[str], clock: IReactorTime, timeout: float = 30.0
    ) -> None:
        self.router: Any = router  # an IRouter provider (route() may return a Deferred)
        self.domains = tuple(canonical_pattern(d) for d in domains)
        self.clock = clock
        self.timeout = timeout

    @classmethod
    def from_config(
        cls, server: ServerConfig, router: IRouter, clock: IReactorTime
    ) -> RecipientVerification:
        """Verification of the server's ``local_domains`` and ``relay_domains``."""
        return cls(router, (*server.local_domains, *server.relay_domains), clock)

    def applies_to(self, recipient: str) -> bool:
        """Our domains only; never ``postmaster``, which RFC 5321 4.5.1 says we must accept."""
        if not self.domains:
            return False
        local, domain = split(recipient)
        if not domain or domain.startswith("[") or local.lower() == "postmaster":
            return False
        return any(domain_matches(domain, pattern) for pattern in self.domains)

    def rcpt(
        self, session: Any, sender: str, recipient: str, params: Mapping[str, str | None]
    ) -> defer.Deferred[Reply | None] | None:
        if not self.applies_to(recipient):
            return None
        envelope = Envelope(
            sender,
            (Recipient(recipient),),
            helo=getattr(session, "helo", None) or "",
            client_address=getattr(session, "client_address", ""),
            auth=getattr(session, "auth", None),
        )
        d = defer.maybeDeferred(self.router.route, recipient, envelope)
        d.addTimeout(self.timeout, self.clock)
        d.addCallbacks(lambda _: None, self._refusal, errbackArgs=(recipient,))
        return d

    def _refusal(self, failure: Failure, recipient: str) -> Reply:
        if failure.check(PermanentFailure):
            return Reply(
                550,
                "5.1.1",
                f"<{recipient}>: Recipient address rejected: {failure.value.reply.text}",
            )
        if failure.check(TemporaryFailure):
            text = failure.value.reply.text
        elif failure.check(defer.TimeoutError, defer.CancelledError):
            text = "routing timed out"
        else:
            log.failure("routing {recipient} at RCPT failed", failure, recipient=recipient)
            text = "routing failed"
        return Reply(
            451,
            "4.4.3",
            f"<{recipient}>: Recipient address not verified now: {text}; try again later",
        )
