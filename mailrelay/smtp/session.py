"""The ESMTP server session: an explicit state machine between the parser and the outside world.

It owns no socket and no clock: a ``SessionOutput`` (the thin protocol in ``server.py``) carries
its bytes, ``clock`` dates the messages, ``IPolicy`` answers each stage, ``IMessageSink`` stores
the text and the settings' ``Intake`` adds the trace header and counts hops. Any policy answer
(and the writer's commit) may be a Deferred; while one is pending the session stops pulling
events from the parser, so under PIPELINING the replies still go out in the order of the commands
and nothing buffered is read in the wrong mode.

The states, their moves and the handler of each command in each state are tables in
``_states``; ESMTP parameters are ``params``, the SASL exchange ``_sasl``, BDAT ``_bdat``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mailrelay import _ascii
from mailrelay.envelope import Envelope, Reply, SessionInfo, TLSInfo
from mailrelay.errors import MailRelayError
from mailrelay.interfaces import IPolicy
from mailrelay.observer import NULL_OBSERVER
from mailrelay.smtp import _bdat, _sasl, _transaction
from mailrelay.smtp import _parser as p
from mailrelay.smtp import _states as S
from mailrelay.smtp import replies as R
from mailrelay.smtp._fast import wire
from mailrelay.smtp._log import log
from mailrelay.smtp._states import State
from mailrelay.smtp.settings import (
    AuthThrottle,
    Clock,
    DelayedCall,
    MessageIntake,
    MessageSink,
    MessageWriter,
    Observer,
    SessionOutput,
    SessionSettings,
)

#: While the session cannot take the next command (a reply pending, the greeting not out yet), stop
#: reading from the socket once this much input is buffered.
PAUSE_ABOVE = 256 * 1024
HTTP_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "DELETE", "PATCH"})
_LINE_ERRORS = {
    p.LineError.TOO_LONG: R.LINE_TOO_LONG,
    p.LineError.BARE_NEWLINE: R.BARE_NEWLINE_COMMAND,
}


class Session:
    """One SMTP server conversation."""

    def __init__(
        self,
        settings: SessionSettings,
        info: SessionInfo,
        sink: MessageSink,
        policy: IPolicy,
        clock: Clock,
        out: SessionOutput,
        checker: ICredentialsChecker | None = None,
        auth_failures: AuthThrottle | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.settings = settings
        self.info = info
        self.sink = sink
        self.policy = policy
        self.clock = clock
        self.out = out
        self.checker = checker
        self.auth_failures_by_ip = auth_failures  # shared by the sessions of a listener
        self.observer: Observer = observer if observer is not None else NULL_OBSERVER
        self.state: State = S.CONNECTED
        self.tls_active = False
        self.auth_failures = 0
        self.errors = 0
        # When the client last completed something (a command, a line of text): timeouts count
        # from here, not from its last byte, so one byte a second cannot hold a session open.
        self.last_progress = clock.seconds()
        self.parser = p.Parser(settings.command_line_limit, settings.text_line_limit)
        self._verb = ""  # the command being answered (for the observer)
        self._draining: Reply | None = None  # shutting down: close with this once idle
        self._greet_call: DelayedCall | None = None
        self._sasl: _sasl.SaslExchange | None = None
        self._txn: _transaction.Transaction | None = None
        self._writer: MessageWriter | None = None
        self._intake: MessageIntake | None = None  # the message being received (its cleanup)
        self._envelope_in_data: Envelope | None = None
        self._bdat_reply: Reply | None = None  # answer owed for a BDAT chunk being skipped
        self._bdat_return: State = S.READY  # where a skipped chunk returns to
        self._waiting: Deferred[Any] | None = None
        self._pumping = False
        self._paused = False  # we asked the connection to stop reading
        self._blocked = False  # the client is not reading our replies: take no command meanwhile

    def _move(self, to: State) -> None:
        """The one place the state changes; ``_states.TRANSITIONS`` says which moves exist."""
        if to not in S.TRANSITIONS[self.state]:
            raise S.TransitionError(f"{self.state.name} -> {to.name}")
        self.state = to

    # -- the connection's side ------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A policy or the store is answering; the client is waiting on us, not idle."""
        return self._waiting is not None

    @property
    def timeout(self) -> float:
        return self.settings.data_timeout if self.state is S.DATA else self.settings.idle_timeout

    @property
    def idle(self) -> bool:
        """Between transactions, nothing owed to the client."""
        return (
            self._waiting is None
            and self._txn is None
            and self._writer is None
            and self.state in (S.GREETED, S.READY)
        )

    def start(self) -> None:
        self._ask(self.policy.connect, (self.info,), self._connected)

    def data_received(self, data: bytes) -> None:
        if self.state is S.CLOSED:
            return
        self.parser.feed(data)
        if self.state is S.CONNECTED:
            self._flow()  # the greeting is not out yet (connect policy pending); keep it for later
            return
        self._pump()

    def output_blocked(self, blocked: bool) -> None:
        """The connection's send buffer is over its bound (``True``: the client does not read our
        replies), or drained again (``False``). While blocked the session takes no command (and
        reads no more than ``PAUSE_ABOVE``): a client that pipelines without reading cannot grow
        our memory."""
        if self.state is S.CLOSED or blocked == self._blocked:
            return
        self._blocked = blocked
        if not blocked:
            self._pump()

    def connection_lost(self) -> None:
        self._move(S.CLOSED)
        if self._greet_call is not None and self._greet_call.active():
            self._greet_call.cancel()
        self._abort_writer()

    def tls_established(self, info: TLSInfo | None) -> None:
        """The TLS handshake completed (STARTTLS, or an implicit-TLS listener)."""
        self.tls_active = True
        self.info.tls = info

    def drain(self, reply: Reply) -> None:
        """Shutting down: close now if idle, else as soon as the transaction in hand is over."""
        self._draining = reply
        self._close_if_drained()

    def shutdown(self, reply: Reply) -> None:
        """Close now, whatever is in hand (shutdown deadline): nothing half-received is stored."""
        self._close(reply)

    def timed_out(self) -> None:
        if self.state is not S.CLOSED:
            self._close(R.TIMEOUT)

    # -- plumbing -------------------------------------------------------------------------------

    def reply(self, reply: Reply) -> None:
        if self.state is S.CLOSED:
            return
        self.out.write(wire(reply))
        if reply.code >= 400:
            self.observer.command_rejected(self._verb, reply)
            # Only client mistakes count toward max_errors: a 5xx refusal of what it sent. A 4xx is
            # the protocol working or our own trouble (452 4.5.3 over max_recipients, RFC 5321
            # 4.5.3.1.10; a policy's "try later"; 451 local error), and ending the session for it
            # would lose the recipients already accepted. (A flood far past max_recipients is
            # counted in _rcpt.)
            if reply.code >= 500:
                self._count_error()

    def _count_error(self) -> None:
        self.errors += 1
        if self.errors >= self.settings.max_errors:
            self._close(R.TOO_MANY_ERRORS)

    def _send(self, data: bytes) -> None:
        """A success reply already in wire form (no error counting to do)."""
        if self.state is not S.CLOSED:
            self.out.write(data)

    def _close(self, reply: Reply | None = None) -> None:
        if self.state is S.CLOSED:
            return
        if reply is not None:
            self.out.write(wire(reply))
        self.connection_lost()
        if self._paused:  # read again: what the client still sends is dropped, its hang-up seen
            self._paused = False
            self.out.resume()
        self.out.lose_connection()

    def _close_if_drained(self) -> bool:
        if self._draining is not None and self.idle:
            self._close(self._draining)
            return True
        return False

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while (
                self._waiting is None
                and not self._blocked
                and self.state is not S.CLOSED
                and self.state is not S.CONNECTED
            ):
                if self._draining is not None and self._close_if_drained():
                    break
                event = self.parser.next_event()
                if event is None:
                    break
                self.last_progress = self.clock.seconds()
                try:
                    self._handle(event)
                except Exception:  # a bug must cost this session, never the server
                    log.failure("session {id} failed", id=self.info.session_id)
                    self._close(R.LOCAL_ERROR)
        finally:
            self._pumping = False
        self._flow()

    def _flow(self) -> None:
        """Stop reading while we cannot take the client's next command (its replies unread, an
        answer pending, the greeting not out) and ``PAUSE_ABOVE`` of its input is buffered; read
        again when we can. So what one session holds stays bounded whatever the client sends.

        Not at once when blocked: a TLS layer also holds our writes while its handshake runs, and
        the handshake needs reading to go on."""
        if self.state is S.CLOSED:
            return
        stalled = (
            self._blocked or self._waiting is not None or self.state is S.CONNECTED
        ) and self.parser.buffered > PAUSE_ABOVE
        if stalled != self._paused:
            self._paused = stalled
            if stalled:
                self.out.pause()
            else:
                self.out.resume()

    def _ask(
        self, method: Callable[..., Any], args: tuple[Any, ...], then: Callable[[Any], None]
    ) -> None:
        """Call a policy/store method; continue with ``then(answer)`` now or when it fires."""
        try:
            result = method(*args)
        except Exception:
            result = Failure()
        if isinstance(result, Deferred):
            self._waiting = result
            result.addBoth(self._answered, then)
        elif isinstance(result, Failure):
            self._answered(result, then, pump=False)
        else:
            then(result)

    def _answered(self, result: Any, then: Callable[[Any], None], pump: bool = True) -> None:
        self._waiting = None
        self.last_progress = self.clock.seconds()  # the client's time starts when we answer
        if isinstance(result, Failure):
            if result.check(MailRelayError):
                result = result.value.reply
            else:
                log.failure(
                    "policy or store failed in session {id}", result, id=self.info.session_id
                )
                result = R.LOCAL_ERROR
        try:
            then(result)
        except Exception:
            log.failure("session {id} failed", id=self.info.session_id)
            self._close(R.LOCAL_ERROR)
        if pump:
            self._pump()

    def _connected(self, objection: Reply | None) -> None:
        if objection is not None:
            self._close(objection)
            return
        s = self.settings
        if s.greet_delay > 0 and (s.limit_trusted or not self.info.trusted):
            self._greet_call = self.clock.callLater(s.greet_delay, self._send_greeting)
        else:
            self._send_greeting()

    def _send_greeting(self) -> None:
        self._greet_call = None
        if self.state is not S.CONNECTED:
            return
        if self.parser.buffered:  # the client talked first: a spam engine, not a mail server
            self._close(R.PREGREET)
            return
        self._move(S.GREETED)
        self.out.write(self.settings.greeting)
        self._pump()

    def _handle(self, event: p.Event) -> None:
        """One parser event: a command (by the table), message text, or a SASL response."""
        state = self.state
        if isinstance(event, p.Command) and state is not S.AUTH:
            verb = event.verb
            name = S.COMMANDS.get((state, verb))
            if name is None:
                self._verb = "UNKNOWN"  # a fixed set of labels for the observer, never the text
                if verb in HTTP_VERBS:
                    self._close(R.HTTP_COMMAND)
                else:
                    self.reply(R.UNKNOWN_COMMAND)
                return
            self._verb = verb
            getattr(self, name)(event.argument)
        elif isinstance(event, p.DataChunk):
            _transaction.text(self, event.data)
        elif isinstance(event, p.DataEnd):
            if self._bdat_reply is not None or (self._txn is not None and self._txn.bdat_started):
                self._verb = "BDAT"
                _bdat.chunk_end(self, event)
            else:
                self._verb = "DATA"
                _transaction.finish(self, event)
        elif state is S.AUTH:
            self._verb = "AUTH"
            _sasl.response(self, event)
        else:  # a line we could not read as a command
            self._verb = "UNKNOWN"
            assert isinstance(event, p.BadLine)
            self.reply(_LINE_ERRORS.get(event.error, R.NOT_UTF8))

    def _reset(self) -> None:
        """Forget the transaction (and a BDAT message half received)."""
        self._txn = None
        self._abort_writer()
        if self.state is S.MAIL:
            self._move(S.READY)

    def _abort_writer(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    # -- the mail transaction: _transaction ------------------------------------------------

    def _data(self, arg: str) -> None:
        _transaction.data_command(self, arg)

    # -- commands (see _states.COMMANDS for which runs in which state) ---------------------------

    def _need_helo(self, arg: str) -> None:
        self.reply(R.NEED_HELO)

    def _need_mail(self, arg: str) -> None:
        self.reply(R.NEED_MAIL)

    def _nested_mail(self, arg: str) -> None:
        self.reply(R.NESTED_MAIL)

    def _ehlo(self, arg: str) -> None:
        self._greet(_ascii.strip(arg), esmtp=True)

    def _helo(self, arg: str) -> None:
        self._greet(_ascii.strip(arg), esmtp=False)

    def _greet(self, name: str, esmtp: bool) -> None:
        if not name or " " in name or not name.isprintable():  # one word, no blank or control
            self.reply(R.HELO_SYNTAX)
            return

        def then(objection: Reply | None) -> None:
            if objection is not None:
                self.reply(objection)
                return
            self._reset()
            info = self.info
            info.helo, info.esmtp = name, esmtp
            self._move(S.READY)
            if not esmtp:
                self.reply(Reply(250, None, self.settings.hostname))
                return
            hello = f"{self.settings.hostname} Hello {_ascii.printable(name)}"
            first = f"250-{hello} [{info.client_address}]\r\n".encode()
            starttls = self.settings.starttls and not self.tls_active
            self._send(first + self.settings.ehlo_tails[starttls, _sasl.offered(self)])

        self._ask(self.policy.helo, (self.info, name), then)

    def _mail(self, arg: str) -> None:
        _transaction.mail_command(self, arg)

    def _rcpt(self, arg: str) -> None:
        _transaction.rcpt_command(self, arg)

    def _bdat(self, arg: str) -> None:
        _bdat.command(self, arg)

    def _rset(self, arg: str) -> None:
        if _ascii.strip(arg):
            self.reply(R.NO_ARGUMENTS)
            return
        self._reset()
        self.reply(R.OK)

    def _noop(self, arg: str) -> None:
        self.reply(R.OK)

    def _quit(self, arg: str) -> None:
        self._close(R.BYE)

    def _vrfy(self, arg: str) -> None:
        self.reply(R.VRFY if _ascii.strip(arg) else Reply(501, "5.5.4", "Syntax: VRFY address"))

    def _expn(self, arg: str) -> None:
        self.reply(R.NOT_IMPLEMENTED)

    def _help(self, arg: str) -> None:
        self.reply(Reply(214, "2.0.0", f"Commands: {' '.join(sorted(S.VERBS))}"))

    def _starttls(self, arg: str) -> None:
        """RFC 3207: what was pipelined after it is dropped, and the session starts over."""
        if self.tls_active:
            self.reply(Reply(503, "5.5.1", "Error: TLS already active"))
            return
        if not self.settings.starttls:
            self.reply(R.NOT_IMPLEMENTED)
            return
        if _ascii.strip(arg):
            self.reply(R.NO_ARGUMENTS)
            return
        self.reply(R.READY_TLS)
        dropped = self.parser.discard_buffer()  # plaintext pipelined after STARTTLS: never obeyed
        if dropped:
            log.info(
                "session {id}: discarded {n} octets after STARTTLS",
                id=self.info.session_id,
                n=dropped,
            )
        self._reset()
        self.info.helo, self.info.esmtp, self.info.auth = None, False, None
        self._move(S.GREETED)
        self.tls_active = True
        self.out.start_tls()

    def _auth(self, arg: str) -> None:
        _sasl.command(self, arg)
