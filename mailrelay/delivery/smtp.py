"""``SMTPDeliverer``: one message, some recipients, one route → a (Reply, remote) per recipient.

Delivery answers *how*: it walks the route's next hops in order within one attempt, reuses cached
connections, turns network trouble into 4xx replies (never an errback), and leaves *when*
(retries) to the queue manager. Which failures move on to the next hop follows Postfix: no
connection, a timeout, 421, a TLS failure, or a non-2xx to the greeting, EHLO or MAIL; once a hop
has accepted MAIL, its per-recipient replies are the result.

Message properties the peer cannot take:
- SIZE: the peer's declared limit below the message size → 552 5.3.4, final, nothing sent.
- SMTPUTF8 message that needs it (a UTF-8 address or header), peer without SMTPUTF8 → 553 5.6.7
  for that hop (the next hop may take it); one that does not goes without the parameter.
- BINARYMIME needs the peer's CHUNKING and BINARYMIME (and SMTP, not LMTP), else 554 5.6.3 for
  that hop.
- 8BITMIME: ``BODY=8BITMIME`` when the peer offers it; a peer that does not gets the 8-bit message
  as it is (no downgrade), as Postfix does by default — nearly every server takes 8-bit today.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import IO, Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.config import DeliveryConfig
from mailrelay.delivery._connect import hop_label
from mailrelay.delivery.capabilities import HopCapabilities, ascii_addresses
from mailrelay.delivery.pool import ConnectionPool, Session
from mailrelay.delivery.session import HopFailure, SessionOpener, network_reply
from mailrelay.delivery.tls import ClientTLS
from mailrelay.envelope import Envelope, NextHop, Recipient, Reply, Route
from mailrelay.interfaces import IDeliverer
from mailrelay.observer import NULL_OBSERVER, IRelayObserver
from mailrelay.smtp.client import ClientFailure, ClientTimeouts

log = Logger()

Result = tuple[Reply, str | None] | tuple[Reply, str | None, bool]


def timeouts_from(config: DeliveryConfig) -> ClientTimeouts:
    """RFC 5321 4.5.3.2 waits from the config knobs (command covers greeting, EHLO, MAIL, RCPT)."""
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


#: How much of a message is read to find its header section (RFC 5322 has no limit; beyond this
#: the message is taken to need SMTPUTF8 when it was received with it).
HEADER_SCAN = 256 * 1024


def _needs_smtputf8(envelope: Envelope, recipients: list[Recipient], body: IO[bytes]) -> bool:
    """Whether a message received with SMTPUTF8 needs it onward (RFC 6531 3.2): a non-ASCII
    address in the envelope or non-ASCII in its header section. An all-ASCII one goes without the
    parameter to a hop that lacks SMTPUTF8, rather than fail there."""
    if not ascii_addresses(envelope.sender, recipients):
        return True
    try:
        head = body.read(HEADER_SCAN)
        body.seek(0)
    except (OSError, ValueError):
        return True
    end = head.find(b"\r\n\r\n")
    if end < 0 and len(head) >= HEADER_SCAN:
        return True
    return not (head if end < 0 else head[:end]).isascii()


@implementer(IDeliverer)
class SMTPDeliverer:
    """Delivers over ESMTP with our own client (``mailrelay.smtp.client``) and a connection cache.

    ``tls_ca_file`` overrides ``config.tls_ca_file`` (the CA bundle for ``verify`` routes; the
    platform trust store when neither is set). ``observer`` hears of each new connection and its
    TLS.
    """

    observer: IRelayObserver = NULL_OBSERVER

    def __init__(
        self,
        reactor: Any,
        config: DeliveryConfig,
        helo_name: str,
        *,
        tls_ca_file: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.helo_name = helo_name
        self.timeouts = timeouts_from(config)
        self.tls = ClientTLS(tls_ca_file or config.tls_ca_file)
        self.opener = SessionOpener(
            reactor, helo_name, self.timeouts, config.connect_timeout, self.tls
        )
        self.pool = ConnectionPool(
            reactor,
            max_messages=config.connection_reuse_limit,
            max_age=config.connection_reuse_time,
            idle_time=config.connection_idle_time,
        )
        self.stopped = False
        # what each hop offered: lets the server refuse at DATA what no hop of a route can take
        self.capabilities = HopCapabilities()

    def deliver(
        self,
        envelope: Envelope,
        recipients: Sequence[Recipient],
        route: Route,
        open_body: Callable[[], IO[bytes]],
    ) -> defer.Deferred[list[Result]]:
        d = defer.Deferred.fromCoroutine(
            self._deliver(envelope, list(recipients), route, open_body)
        )
        return d.addErrback(self._never_fail, len(recipients))

    def stop(self) -> defer.Deferred[None]:
        """QUIT the cached connections; sessions still in use close after their message."""
        self.stopped = True
        return self.pool.close().addCallback(lambda _: None)

    def _never_fail(self, failure: Failure, n: int) -> list[Result]:
        log.failure("delivery failed unexpectedly", failure)
        reply = Reply(451, "4.3.0", f"local error in delivery: {failure.getErrorMessage()}")
        return [(reply, None)] * n

    async def _deliver(
        self,
        envelope: Envelope,
        recipients: list[Recipient],
        route: Route,
        open_body: Callable[[], IO[bytes]],
    ) -> list[Result]:
        if not recipients:
            return []
        if not route.hops:
            return [(Reply(451, "4.4.0", "no next hop for this route"), None)] * len(recipients)
        last: HopFailure | None = None
        for hop in route.hops:
            try:
                return await self._via(hop, envelope, recipients, route, open_body)
            except HopFailure as f:
                log.info("{remote}: {reply}", remote=f.remote or hop_label(hop), reply=str(f.reply))
                last = f
                if f.final:
                    break
        assert last is not None
        reply = last.reply
        if reply.code < 400 or (reply.is_permanent and last.soften):
            # a 5xx about this host rather than the message, or a reply that made no sense
            reply = Reply(451, "4.4.0", f"{last.remote or 'next hop'} said: {reply}")
        return [(reply, last.remote)] * len(recipients)

    def _key(self, hop: NextHop, route: Route) -> Hashable:
        # what the session was set up with; the hop's preference does not matter
        return (
            hop.host,
            hop.port,
            hop.name,
            route.tls,
            route.auth,
            route.source,
            route.allow_plaintext_auth,
            route.lmtp,
        )

    async def _session(self, hop: NextHop, route: Route) -> tuple[Session, bool]:
        """A cached session (``True``) or a new one; ``may`` retries a failed TLS in plaintext."""
        cached = self.pool.take(self._key(hop, route))
        if cached is not None:
            return cached, True
        return await self._open_new(hop, route), False

    async def _open_new(self, hop: NextHop, route: Route) -> Session:
        try:
            session = await self.opener.open(hop, route)
        except HopFailure as f:
            if not f.retry_plaintext:
                raise
            log.info("{remote}: retrying without TLS", remote=f.remote)
            session = await self.opener.open(hop, route, plaintext=True)
        self.observer.outbound_connection(session.remote, session.tls)
        self.capabilities.saw(hop, session.client.extensions, session.client.size_limit)
        return session

    async def _via(
        self,
        hop: NextHop,
        envelope: Envelope,
        recipients: list[Recipient],
        route: Route,
        open_body: Callable[[], IO[bytes]],
    ) -> list[Result]:
        session, reused = await self._session(hop, route)
        try:
            body = open_body()
        except BaseException:
            self._release(hop, route, session)  # our spool's problem, not the session's
            raise
        try:
            size = _body_size(body)
            self._check_peer(session, envelope, size, recipients, body)
            try:
                replies = await session.client.send(
                    envelope, recipients, body, size=size, reset=reused
                )
            except ClientFailure as f:
                if reused and f.stage in ("rset", "mail") and f.reply is None:
                    # the cached connection died while idle: nothing was said, start afresh
                    session.client.abort()
                    body.seek(0)
                    session = await self._open_new(hop, route)
                    try:
                        replies = await session.client.send(envelope, recipients, body, size=size)
                    except ClientFailure as f2:
                        return self._transaction_failed(f2, session, hop, route, len(recipients))
                else:
                    return self._transaction_failed(f, session, hop, route, len(recipients))
        except HopFailure:
            session.client.quit()
            raise
        finally:
            body.close()
        self._release(hop, route, session)
        # A hop that offers DSN got each recipient's NOTIFY: it reports from here on (noted for
        # the queue, which then sends no "relayed" report of its own).
        dsn = "DSN" in session.client.extensions
        return [
            (r, session.remote, True)
            if dsn and rcpt.notify and r.is_success
            else (r, session.remote)
            for r, rcpt in zip(replies, recipients, strict=False)
        ]

    def _check_peer(
        self,
        session: Session,
        envelope: Envelope,
        size: int | None,
        recipients: list[Recipient],
        body: IO[bytes],
    ) -> None:
        client, remote = session.client, session.remote
        limit = client.size_limit
        if size is not None and limit is not None and size > limit:
            raise HopFailure(
                Reply(
                    552, "5.3.4", f"message size {size} exceeds the size limit {limit} of {remote}"
                ),
                remote,
                final=True,
            )
        if (
            envelope.smtputf8
            and "SMTPUTF8" not in client.extensions
            and _needs_smtputf8(envelope, recipients, body)
        ):
            raise HopFailure(
                Reply(
                    553, "5.6.7", f"{remote} does not support SMTPUTF8, which this message needs"
                ),
                remote,
            )
        if envelope.body == "BINARYMIME" and (
            client.lmtp or not {"CHUNKING", "BINARYMIME"} <= client.extensions.keys()
        ):
            # (our LMTP client sends DATA only, which would dot-stuff and mangle binary text)
            raise HopFailure(
                Reply(554, "5.6.3", f"{remote} cannot take a BINARYMIME message"), remote
            )
        if envelope.body == "8BITMIME" and "8BITMIME" not in client.extensions:
            log.info(
                "{remote} does not offer 8BITMIME; sending the 8-bit message as it is",
                remote=remote,
            )

    def _release(self, hop: NextHop, route: Route, session: Session) -> None:
        if self.stopped:
            session.client.quit()
        else:
            self.pool.put(self._key(hop, route), session)

    def _transaction_failed(
        self, f: ClientFailure, session: Session, hop: NextHop, route: Route, n: int
    ) -> list[Result]:
        remote = session.remote
        if f.stage in ("mail", "rset"):
            if (
                f.reply is not None
                and f.reply.is_permanent
                and f.stage == "mail"
                and f.reply.code != 521
            ):
                self._release(hop, route, session)
                return [(f.reply, remote)] * n
            if f.reply is not None:
                session.client.quit()
            else:
                session.client.abort()
            raise HopFailure(f.reply or network_reply(f, remote), remote)
        session.client.abort()
        temp = network_reply(f, remote) if f.reply is None else f.reply
        # An accepted RCPT is no delivery: retried, unless the success is final (an LMTP reply
        # after the dot: sending it again would deliver it twice).
        known = f.replies + [None] * (n - len(f.replies))
        return [
            ((r if r is not None and (f.final or not r.is_success) else temp), remote)
            for r in known
        ]
