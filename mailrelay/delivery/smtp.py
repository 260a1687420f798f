"""``SMTPDeliverer``: one message, some recipients, one route → a (Reply, remote) per recipient.

Delivery answers *how*: it walks the route's next hops in order within one attempt, turns network
trouble into 4xx replies (never an errback), and leaves *when* (retries) to the queue manager.
Which failures move on to the next hop follows Postfix: no connection, a timeout, 421, or a 4xx
(any non-2xx) to the greeting, EHLO or MAIL; once a hop has answered MAIL, its per-recipient
replies are the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import IO, Any

import attrs
from twisted.internet import defer
from twisted.internet.endpoints import connectProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.config import DeliveryConfig
from mailrelay.delivery._connect import connect_error_text, endpoint_for, hop_label
from mailrelay.envelope import Envelope, NextHop, Recipient, Reply, Route
from mailrelay.interfaces import IDeliverer
from mailrelay.smtp.client import ClientFailure, ClientTimeouts, SMTPClientProtocol

log = Logger()

Result = tuple[Reply, str | None]


@attrs.define
class _HopFailure(Exception):
    """This hop could not take the message: ``reply`` for every recipient if it was the last hop."""

    reply: Reply
    remote: str | None
    final: bool = False  # permanent for the message on this route: stop trying hops


def timeouts_from(config: DeliveryConfig) -> ClientTimeouts:
    """RFC 5321 4.5.3.2 waits from the three config knobs (command covers greeting and MAIL/RCPT)."""
    return ClientTimeouts(
        greeting=config.command_timeout,
        command=config.command_timeout,
        data_init=min(120.0, config.command_timeout),
        data_block=min(180.0, config.data_timeout),
        final=config.data_timeout,
    )


def _body_size(body: IO[bytes]) -> int | None:
    try:
        body.seek(0, 2)
        size = body.tell()
        body.seek(0)
        return size
    except (OSError, ValueError, AttributeError):
        return None


@implementer(IDeliverer)
class SMTPDeliverer:
    """Delivers over ESMTP with our own client (``mailrelay.smtp.client``)."""

    def __init__(self, reactor: Any, config: DeliveryConfig, helo_name: str) -> None:
        self.reactor = reactor
        self.config = config
        self.helo_name = helo_name
        self.timeouts = timeouts_from(config)
        self._sessions: set[SMTPClientProtocol] = set()

    def deliver(self, envelope: Envelope, recipients: Sequence[Recipient], route: Route,
                open_body: Callable[[], IO[bytes]]) -> defer.Deferred[list[Result]]:
        d = defer.Deferred.fromCoroutine(self._deliver(envelope, list(recipients), route, open_body))
        return d.addErrback(self._never_fail, len(recipients))

    def stop(self) -> defer.Deferred[None]:
        """Close every connection we hold (QUIT where possible)."""
        return defer.DeferredList([c.quit() for c in list(self._sessions)]).addCallback(lambda _: None)

    def _never_fail(self, failure: Failure, n: int) -> list[Result]:
        log.failure("delivery failed unexpectedly", failure)
        reply = Reply(451, "4.3.0", f"local error in delivery: {failure.getErrorMessage()}")
        return [(reply, None)] * n

    async def _deliver(self, envelope: Envelope, recipients: list[Recipient], route: Route,
                       open_body: Callable[[], IO[bytes]]) -> list[Result]:
        if not recipients:
            return []
        if not route.hops:
            return [(Reply(451, "4.4.0", "no next hop for this route"), None)] * len(recipients)
        last: _HopFailure | None = None
        for hop in route.hops:
            try:
                return await self._via(hop, envelope, recipients, route, open_body)
            except _HopFailure as f:
                log.info("{remote}: {reply}; trying the next hop", remote=f.remote or hop_label(hop),
                         reply=str(f.reply))
                last = f
                if f.final:
                    break
        assert last is not None
        reply = last.reply
        if reply.is_permanent and not last.final:
            reply = Reply(451, "4.4.0", f"{last.remote or 'next hop'} said: {reply}")
        return [(reply, last.remote)] * len(recipients)

    async def _connect(self, hop: NextHop, route: Route) -> tuple[SMTPClientProtocol, str]:
        endpoint = endpoint_for(self.reactor, hop, self.config.connect_timeout, route.source)
        client = SMTPClientProtocol(self.helo_name, self.reactor, self.timeouts)
        try:
            await connectProtocol(endpoint, client)
        except Exception:
            f = Failure()
            where = f"{hop.host.strip('[]')}:{hop.port}"
            raise _HopFailure(Reply(451, "4.4.1", f"connect to {where} failed: {connect_error_text(f)}"),
                              hop_label(hop)) from None
        self._sessions.add(client)
        client.closed.addBoth(lambda _: self._sessions.discard(client))
        peer = client.transport.getPeer()  # type: ignore[union-attr]
        remote = hop_label(hop, getattr(peer, "host", None))
        try:
            await client.ready
        except ClientFailure as f:
            client.abort() if f.reply is None else None
            raise _HopFailure(f.reply or _network_reply(f, remote), remote) from None
        return client, remote

    async def _via(self, hop: NextHop, envelope: Envelope, recipients: list[Recipient], route: Route,
                   open_body: Callable[[], IO[bytes]]) -> list[Result]:
        client, remote = await self._connect(hop, route)
        body = open_body()
        try:
            size = _body_size(body)
            try:
                replies = await client.send(envelope, recipients, body, size=size)
            except ClientFailure as f:
                return self._transaction_failed(f, client, remote, len(recipients))
        finally:
            body.close()
        client.quit()
        return [(r, remote) for r in replies]

    def _transaction_failed(self, f: ClientFailure, client: SMTPClientProtocol, remote: str,
                            n: int) -> list[Result]:
        if f.stage == "mail":
            if f.reply is not None and f.reply.is_permanent:
                client.quit()
                return [(f.reply, remote)] * n
            client.quit() if f.reply is not None else client.abort()
            raise _HopFailure(f.reply or _network_reply(f, remote), remote)
        client.abort()
        temp = _network_reply(f, remote) if f.reply is None else f.reply
        known = f.replies + [None] * (n - len(f.replies))
        return [((r if r is not None and not r.is_success else temp), remote) for r in known]


def _network_reply(f: ClientFailure, remote: str) -> Reply:
    if "timeout" in f.reason:
        return Reply(451, "4.4.2", f"conversation with {remote} timed out while waiting for {f.stage.upper()}")
    if "protocol error" in f.reason:
        return Reply(451, "4.5.0", f"{remote}: {f.reason} in reply to {f.stage.upper()}")
    return Reply(451, "4.4.2", f"lost connection with {remote} while waiting for {f.stage.upper()}")
