"""The ESMTP client protocol: one connection, one or more transactions, per-recipient replies.

The protocol is thin: ``_client_wire`` parses replies and dot-stuffs; this module writes commands,
matches replies to them in order (so PIPELINING and lock-step share one path), times out each wait
with the injected clock (RFC 5321 4.5.3.2) and streams the body from a file through a pull producer.
It knows nothing of queues or routes: callers (``mailrelay.delivery``) decide what a failure means.

Usage::

    client = SMTPClientProtocol("relay.example", reactor)
    await connectProtocol(endpoint, client)
    await client.ready                    # greeting + EHLO (HELO if EHLO gets a 5xx)
    replies = await client.send(envelope, recipients, body_file)   # one Reply per recipient
    await client.quit()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import IO, Any, cast

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport, ITLSTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay import _ascii
from mailrelay.address import canonical_domain
from mailrelay.envelope import Envelope, Recipient, Reply
from mailrelay.smtp import _fast as _direct
from mailrelay.smtp._client_body import CHUNK_SIZE, BodyProducer, bdat_frames
from mailrelay.smtp._client_replies import ReplyQueue
from mailrelay.smtp._client_state import (
    TRANSITIONS,
    Batch,
    ClientFailure,
    ClientState,
    ClientTimeouts,
    Result,
    in_step,
    rejected,
)
from mailrelay.smtp._client_wire import (
    DotStuffer,
    ReplyError,
    ReplyParser,
    mail_params,
    parse_ehlo,
    rcpt_params,
    xtext,
)

__all__ = ["ClientFailure", "ClientState", "ClientTimeouts", "SMTPClientProtocol", "xtext"]

log = Logger()


class SMTPClientProtocol(Protocol):
    """One outbound ESMTP connection.

    ``ready`` fires (with the EHLO/HELO reply) once the session is usable, or fails with
    ``ClientFailure``. ``when_closed()`` fires once the connection is gone.
    """

    _socket: Any = None  # written to directly while the connection is plain TCP (smtp._fast)

    def __init__(
        self,
        helo_name: str,
        clock: IReactorTime,
        timeouts: ClientTimeouts | None = None,
        *,
        lmtp: bool = False,
    ) -> None:
        self.helo_name = helo_name
        # LMTP (RFC 2033): LHLO instead of EHLO, no BDAT, and after the final dot one reply per
        # accepted recipient (a mailbox can be full while the others are delivered).
        self.lmtp = lmtp
        self.clock = clock
        self.timeouts = timeouts or ClientTimeouts()
        self.state = ClientState.CONNECTING
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self.tls = False
        self.greeting: Reply | None = None
        self.ready: defer.Deferred[Reply] = defer.Deferred()
        self._close_waiters: list[defer.Deferred[None]] = []
        self.transactions = 0
        self._parser = ReplyParser()
        self._waiting = ReplyQueue(clock, self._timed_out)
        self._linger: IDelayedCall | None = None
        self._discard_rest = False
        self._producer: BodyProducer | None = None
        self._failure: ClientFailure | None = None
        self._confused = False

    # -- Twisted protocol --------------------------------------------------------------------

    def connectionMade(self) -> None:
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            set_nodelay(True)
        self._socket = _direct.direct_socket(self.transport)
        self._to(ClientState.GREETING)
        defer.Deferred.fromCoroutine(self._open())

    def dataReceived(self, data: bytes) -> None:
        try:
            for reply in self._parser.feed(data):
                if not self._waiting:
                    self._unexpected(reply)
                    continue
                w = self._waiting.next()
                if w.on_reply is not None:
                    w.on_reply(reply)
                w.fire(reply)
                if self._discard_rest:  # STARTTLS: whatever followed the 220 in plaintext is void
                    self._discard_rest = False
                    return
        except ReplyError as e:
            self._abort(ClientFailure(self._stage(), f"protocol error: {e}"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._to(ClientState.CLOSED)
        self._waiting.stop_timer()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        failure = self._failure or ClientFailure(
            self._stage(), f"lost connection: {reason.getErrorMessage()}"
        )
        self._waiting.fail_all(failure)
        if self._producer is not None:
            self._producer.stop(failure)
        if not self.ready.called:
            self.ready.errback(failure)
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(None)

    # -- public ------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return self.state is ClientState.READY

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    @property
    def size_limit(self) -> int | None:
        """The SIZE the peer declared; ``None`` for no limit (``0``, absent, not ASCII digits)."""
        return _ascii.number(self.extensions.get("SIZE", ""), 20) or None

    def send(
        self,
        envelope: Envelope,
        recipients: Sequence[Recipient],
        body: IO[bytes],
        size: int | None = None,
        extra_mail_params: Sequence[str] = (),
        reset: bool = False,
    ) -> defer.Deferred[list[Reply]]:
        """One transaction: a ``Reply`` per recipient, in order.

        A failed RCPT gives its own reply; the others get DATA's reply (or the one after the final
        dot). Fails with ``ClientFailure`` when MAIL is refused (stage ``"mail"``), when ``reset``
        (RSET first, for a reused connection) is refused (``"rset"``), or when the session breaks
        (``failure.replies`` then holds what was known). Parameters are built from the envelope as
        far as the peer's extensions allow; ``extra_mail_params`` are appended verbatim.
        """
        if self.state is not ClientState.READY:
            return defer.fail(ClientFailure("mail", f"session not ready ({self.state.value})"))
        self._to(ClientState.BUSY)
        return defer.Deferred.fromCoroutine(
            self._transaction(
                envelope, list(recipients), body, size, list(extra_mail_params), reset
            )
        )

    def when_closed(self) -> defer.Deferred[None]:
        """A new Deferred firing with ``None`` once the connection is gone."""
        d: defer.Deferred[None] = defer.Deferred()
        if self.state is ClientState.CLOSED:
            d.callback(None)
        else:
            self._close_waiters.append(d)
        return d

    def quit(self) -> defer.Deferred[None]:
        """QUIT and close; never fails (the caller has its results already). Fires once closed."""
        if self.state not in (ClientState.CLOSED, ClientState.QUITTING):
            self._send_quietly_quit()
        return self.when_closed()

    def abort(self, reason: str = "aborted") -> None:
        """Drop the connection now (no QUIT)."""
        self._abort(ClientFailure(self._stage(), reason))

    def command(
        self,
        line: bytes,
        stage: str,
        timeout: float | None = None,
        on_reply: Callable[[Reply], None] | None = None,
    ) -> defer.Deferred[Result]:
        """Write one command line and wait for its reply (a ``Reply`` or a ``ClientFailure`` value).

        For the session-level extras (STARTTLS, AUTH) driven from outside this module.
        """
        return self._command(
            line, stage, self.timeouts.command if timeout is None else timeout, on_reply
        )

    def ehlo(self) -> defer.Deferred[Reply]:
        """EHLO again (after STARTTLS or AUTH) to refresh ``extensions``; fails: ClientFailure."""
        return defer.Deferred.fromCoroutine(self._ehlo())

    def start_tls(self, options: Any) -> None:
        """Switch the transport to TLS right after a 220 to STARTTLS (plaintext after it: void)."""
        self._parser.reset()
        self._discard_rest = True
        self._socket = None  # every byte from now on goes through the TLS layer
        cast(ITLSTransport, self.transport).startTLS(options)
        self.tls = True

    def set_state(self, state: ClientState) -> None:
        """For the session-level extras: BUSY while they talk, READY when done."""
        self._to(state)

    def _to(self, state: ClientState) -> bool:
        """Move to ``state`` if the machine allows it from here; a closing session stays closing."""
        if state is self.state:
            return True
        if state not in TRANSITIONS[self.state]:
            if self.state not in (ClientState.QUITTING, ClientState.CLOSED):
                raise RuntimeError(
                    f"SMTP client: no transition {self.state.value} -> {state.value}"
                )
            return False
        self.state = state
        return True

    # -- session -----------------------------------------------------------------------------

    async def _open(self) -> None:
        try:
            greeting = await self._expect_reply("greeting", self.timeouts.greeting)
            self.greeting = greeting
            if greeting.code != 220:
                self._send_quietly_quit()
                raise rejected("greeting", greeting)
            self._to(ClientState.EHLO)
            reply = await self._ehlo()
        except ClientFailure as f:
            if not self.ready.called:
                self.ready.errback(f)
            return
        if self.state is ClientState.EHLO:
            self._to(ClientState.READY)
        if not self.ready.called:
            self.ready.callback(reply)

    async def _ehlo(self) -> Reply:
        name = (
            self.helo_name if self.helo_name.isascii() else canonical_domain(self.helo_name)
        ).encode()
        verb = b"LHLO " if self.lmtp else b"EHLO "
        reply = await self._expect(
            self._command(verb + name + b"\r\n", "ehlo", self.timeouts.command)
        )
        if reply.code == 250:
            self.esmtp = True
            self.extensions = parse_ehlo(reply)
            return reply
        if reply.is_permanent and not self.esmtp and not self.lmtp:
            reply = await self._expect(
                self._command(b"HELO " + name + b"\r\n", "helo", self.timeouts.command)
            )
            if reply.code == 250:
                self.extensions = {}
                return reply
        self._send_quietly_quit()
        raise rejected("ehlo", reply)

    def _encode(self, text: str) -> bytes:
        return text.encode("utf-8") if not text.isascii() else text.encode("ascii")

    async def _transaction(
        self,
        envelope: Envelope,
        rcpts: list[Recipient],
        body: IO[bytes],
        size: int | None,
        extra: list[str],
        reset: bool,
    ) -> list[Reply]:
        try:
            return await self._transaction_steps(envelope, rcpts, body, size, extra, reset)
        finally:
            self.transactions += 1
            if self._confused:
                self.abort("the peer's replies no longer match our commands")
            elif self.state is ClientState.BUSY:
                self._to(ClientState.READY)

    def _sane(self, r: Result, stage: str, go_ahead: bool = False) -> Result:
        """``r`` if it is a failure or a success of this step (``in_step``), else the 451 a
        confused peer earns: a temporary failure, never a delivery, and the connection is
        dropped after the transaction (``_confused``)."""
        if isinstance(r, ClientFailure) or r.code >= 400 or in_step(r.code, stage, go_ahead):
            return r
        self._confused = True
        return Reply(451, "4.5.0", f"unexpected reply to {stage.upper()}: {r}")

    async def _transaction_steps(
        self,
        envelope: Envelope,
        rcpts: list[Recipient],
        body: IO[bytes],
        size: int | None,
        extra: list[str],
        reset: bool,
    ) -> list[Reply]:
        t = self.timeouts
        params = mail_params(envelope, size, self.extensions, extra)
        mail = self._encode(f"MAIL FROM:<{envelope.sender}>{params}\r\n")
        rcpt_lines = [
            self._encode(f"RCPT TO:<{r.address}>{rcpt_params(r, self.extensions)}\r\n")
            for r in rcpts
        ]
        use_bdat = self._use_bdat(envelope, size)
        replies: list[Reply | None] = [None] * len(rcpts)
        data_reply: Result | None = None

        if self.pipelining:
            batch = (
                ([b"RSET\r\n"] if reset else [])
                + [mail]
                + rcpt_lines
                + ([] if use_bdat else [b"DATA\r\n"])
            )
            self._write(b"".join(batch))
            specs = ([("rset", t.command)] if reset else []) + [("mail", t.command)]
            specs += [("rcpt", t.command)] * len(rcpts) + (
                [] if use_bdat else [("data", t.data_init)]
            )
            got = await self._wait_many(specs)
            if not use_bdat:
                data_reply = self._sane(got[-1], "data", go_ahead=True)
            go_ahead = isinstance(data_reply, Reply) and data_reply.code < 400
            if reset:
                rset = self._sane(got.pop(0), "rset")
                if isinstance(rset, ClientFailure) or not rset.is_success:
                    if go_ahead:
                        self.abort("RSET refused")  # never end a message we did not mean to send
                    raise rset if isinstance(rset, ClientFailure) else rejected("rset", rset)
            mail_reply = self._sane(got[0], "mail")
            if isinstance(mail_reply, ClientFailure):
                raise mail_reply
            if not mail_reply.is_success:
                if go_ahead:
                    await self._finish_empty_data()
                raise rejected("mail", mail_reply)
            for i, r in enumerate(got[1 : 1 + len(rcpts)]):
                r = self._sane(r, "rcpt")
                if isinstance(r, ClientFailure):
                    raise ClientFailure(r.stage, r.reason, None, replies)
                replies[i] = r
        else:
            if reset:
                rset = self._sane(
                    await self._expect(self._command(b"RSET\r\n", "rset", t.command)), "rset"
                )
                assert isinstance(rset, Reply)
                if not rset.is_success:
                    raise rejected("rset", rset)
            mail_reply = self._sane(
                await self._expect(self._command(mail, "mail", t.command)), "mail"
            )
            assert isinstance(mail_reply, Reply)
            if not mail_reply.is_success:
                raise rejected("mail", mail_reply)
            for i, line in enumerate(rcpt_lines):
                r = self._sane(await self._command(line, "rcpt", t.command), "rcpt")
                if isinstance(r, ClientFailure):
                    raise ClientFailure(r.stage, r.reason, None, replies)
                replies[i] = r
            if not use_bdat and any(r is not None and r.is_success for r in replies):
                data_reply = self._sane(
                    await self._command(b"DATA\r\n", "data", t.data_init), "data", True
                )

        accepted = [i for i, r in enumerate(replies) if r is not None and r.is_success]
        if not accepted:
            if isinstance(data_reply, Reply) and data_reply.code < 400:
                await self._finish_empty_data()
            elif isinstance(data_reply, ClientFailure):
                raise ClientFailure(data_reply.stage, data_reply.reason, None, replies)
            return [r for r in replies if r is not None]

        if use_bdat:
            # each reply checked there
            final = await self._send_bdat(body, binary=envelope.body == "BINARYMIME")
        else:
            if isinstance(data_reply, ClientFailure):
                raise ClientFailure(data_reply.stage, data_reply.reason, None, replies)
            assert data_reply is not None
            if data_reply.code >= 400:
                for i in accepted:
                    replies[i] = data_reply
                return [r for r in replies if r is not None]
            final = self._sane(await self._send_data(body), "data-end")
        if isinstance(final, ClientFailure):
            raise ClientFailure(final.stage, final.reason, None, replies)
        if self.lmtp:
            return await self._lmtp_replies(final, accepted, replies)
        for i in accepted:
            replies[i] = final
        return [r for r in replies if r is not None]

    async def _lmtp_replies(
        self, first: Reply, accepted: list[int], replies: list[Reply | None]
    ) -> list[Reply]:
        """RFC 2033 4.2: after the dot, one reply per accepted recipient, in RCPT order."""
        replies[accepted[0]] = first
        for k, i in enumerate(accepted[1:], 1):
            r = self._sane(await self._wait("data-end", self.timeouts.final), "data-end")
            if isinstance(r, ClientFailure):
                # Those answered are delivered (or refused) for good; the rest are unknown: their
                # 250 to RCPT says nothing of the delivery.
                for j in accepted[k:]:
                    replies[j] = None
                raise ClientFailure(r.stage, r.reason, None, replies, final=True)
            replies[i] = r
        return [r for r in replies if r is not None]

    def _use_bdat(self, envelope: Envelope, size: int | None) -> bool:
        if self.lmtp or "CHUNKING" not in self.extensions:
            return False
        if envelope.body == "BINARYMIME":
            return True
        return size is not None and size >= self.bdat_threshold

    bdat_threshold = 1024 * 1024

    async def _finish_empty_data(self) -> None:
        """A 354 with no recipient accepted: end the (empty) message; its reply is meaningless."""
        self._write(b".\r\n")
        await self._wait("data", self.timeouts.final)

    async def _send_data(self, body: IO[bytes]) -> Result:
        stuffer = DotStuffer()
        first = body.read(CHUNK_SIZE)
        if len(first) < CHUNK_SIZE:
            rest = body.read(CHUNK_SIZE) if first else b""
            if not rest:  # the whole message in hand: one write, no producer
                self._write(stuffer.feed(first) + stuffer.finish())
                return await self._wait("data-end", self.timeouts.final)
            first += rest
        producer = BodyProducer(self, body, first, lambda c: stuffer.feed(c), stuffer.finish)
        sent = await producer.run()
        if sent is not None:
            return sent
        return await self._wait("data-end", self.timeouts.final)

    async def _send_bdat(self, body: IO[bytes], binary: bool) -> Result:
        """CHUNKING (RFC 3030): each chunk as ``BDAT n``; replies read as they come, pipelined.

        Text gets CRLF line endings as in DATA (no dot-stuffing); BINARYMIME goes byte for byte.
        """
        waits: list[defer.Deferred[Result]] = []
        for frame, last in bdat_frames(body, binary):
            self._write(frame)
            waits.append(
                self._wait("bdat", self.timeouts.final if last else self.timeouts.data_block)
            )
            if not self.pipelining or len(waits) > 4:
                r = self._sane(await waits.pop(0), "bdat")
                if isinstance(r, ClientFailure) or r.code != 250:
                    await self._drain(waits)
                    return r
        result: Result = Reply(250)
        for w in waits:  # a chunk's odd 2xx is a peer out of step, as at the end
            r = self._sane(await w, "bdat")
            if isinstance(r, ClientFailure) or r.code != 250:
                return r
            result = r
        return result

    # -- reply matching ----------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        _direct.write(self.transport, self._socket, data)

    def _command(
        self,
        line: bytes,
        stage: str,
        timeout: float,
        on_reply: Callable[[Reply], None] | None = None,
    ) -> defer.Deferred[Result]:
        if self.state is ClientState.CLOSED:
            return defer.succeed(self._failure or ClientFailure(stage, "connection closed"))
        self._write(line)
        return self._wait(stage, timeout, on_reply)

    def _wait(
        self, stage: str, timeout: float, on_reply: Callable[[Reply], None] | None = None
    ) -> defer.Deferred[Result]:
        d: defer.Deferred[Result] = defer.Deferred()
        if self.state is ClientState.CLOSED:
            d.callback(self._failure or ClientFailure(stage, "connection closed"))
            return d
        self._waiting.wait(d, stage, timeout, on_reply)
        return d

    async def _expect_reply(self, stage: str, timeout: float) -> Reply:
        return await self._expect(self._wait(stage, timeout))

    async def _expect(self, d: defer.Deferred[Result]) -> Reply:
        r = await d
        if isinstance(r, ClientFailure):
            raise r
        return r

    async def _drain(self, waits: Sequence[defer.Deferred[Result] | None]) -> None:
        for d in waits:
            if d is not None:
                await d

    def _wait_many(self, specs: Sequence[tuple[str, float]]) -> defer.Deferred[list[Result]]:
        """Wait for one reply per (stage, timeout), in order; fires once with all of them."""
        batch = Batch(len(specs))
        if self.state is ClientState.CLOSED:
            for stage, _ in specs:
                batch.add(self._failure or ClientFailure(stage, "connection closed"))
            return batch.deferred
        self._waiting.wait_many(batch, specs)
        return batch.deferred

    def _timed_out(self, stage: str) -> None:
        self._abort(ClientFailure(stage, f"timeout waiting for the reply to {stage.upper()}"))

    def _stage(self) -> str:
        return self._waiting.stage(self.state.value)

    def _abort(self, failure: ClientFailure) -> None:
        if self._failure is None:
            self._failure = failure
        self._waiting.fail_all(failure)
        if self.transport is not None:
            cast(ITCPTransport, self.transport).abortConnection()

    def _unexpected(self, reply: Reply) -> None:
        if reply.code == 421:  # the server is closing: RFC 5321 3.8
            log.info("peer closing: {reply}", reply=str(reply))
            self._abort(ClientFailure(self._stage(), f"peer closed: {reply}", reply))
        else:
            log.debug("reply nobody waited for: {reply}", reply=str(reply))

    def _send_quietly_quit(self) -> None:
        self._to(ClientState.QUITTING)
        self._command(b"QUIT\r\n", "quit", self.timeouts.quit).addBoth(lambda _: self._close())

    def _close(self) -> None:
        """Close, and drop the connection if the peer does not take the close within ``quit``: a
        TLS close waits for the peer's close_notify (and any close for the peer to read what we
        sent), which a stalled next hop never gives; our connection must not wait for it forever."""
        if (
            self.state is ClientState.CLOSED
            or self._failure is not None
            or self._linger is not None
        ):
            return
        transport: Any = self.transport  # TCP or TLS: either can abort
        transport.loseConnection()
        self._linger = self.clock.callLater(self.timeouts.quit, transport.abortConnection)
