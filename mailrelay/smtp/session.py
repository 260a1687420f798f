"""The ESMTP server session: an explicit state machine between the parser and the outside world.

It owns no socket and no clock: a ``SessionOutput`` (the thin protocol in ``server.py``) carries
its bytes, ``clock`` dates the messages, ``IPolicy`` answers each stage and ``IMessageSink`` stores
the text. Any policy answer (and the writer's commit) may be a Deferred; while one is pending the
session stops pulling events from the parser, so under PIPELINING the replies still go out in the
order of the commands and nothing buffered is read in the wrong mode.
"""

from __future__ import annotations

import base64
import enum
import functools
import itertools
import os
import re
import time
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from mailrelay import _ascii
from mailrelay.envelope import Envelope, Recipient, Reply
from mailrelay.errors import MailRelayError
from mailrelay.interfaces import IMessageSink, IMessageWriter, IPolicy
from mailrelay.observer import NULL_OBSERVER
from mailrelay.policy import _no_objection
from mailrelay.policy.received import protocol_name, received_header, separator
from mailrelay.smtp import _parser as p
from mailrelay.smtp import auth as sasl
from mailrelay.smtp import replies as R

log = Logger()

# Session ids: unique in this process and across restarts, cheap (no uuid4 per connection).
_SESSION_PREFIX = os.urandom(3).hex() + "-"
_session_numbers = itertools.count(1)


def log_info(fmt: str, **fields: Any) -> None:
    """``log.info`` without its per-call level validation: two lines per message are on the hot path."""
    fields.update(
        log_logger=log,
        log_level=LogLevel.info,
        log_namespace=log.namespace,
        log_source=None,
        log_format=fmt,
        log_time=time.time(),
    )
    log.observer(fields)


#: While the session cannot take the next command (a reply pending, the greeting not out yet), stop
#: reading from the socket once this much input is buffered.
PAUSE_ABOVE = 256 * 1024
HTTP_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "DELETE", "PATCH"})
#: Stop looking for Received headers after this much header text.
HEADER_SCAN_LIMIT = 1024 * 1024
_RECEIVED = re.compile(rb"(?im)^received[ \t]*:")


class State(enum.Enum):
    CONNECTED = enum.auto()  # greeting not sent yet (the connect policy may be pending)
    GREETED = enum.auto()  # waiting for HELO/EHLO
    READY = enum.auto()  # HELO/EHLO done, no transaction
    MAIL = enum.auto()  # MAIL accepted; RCPTs (or BDAT chunks) being collected
    DATA = enum.auto()  # message text streaming in (DATA, or one BDAT chunk)
    AUTH = enum.auto()  # in a SASL exchange: the next line is a response, not a command
    CLOSED = enum.auto()


# The states as plain module names for the code below: on Python 3.11 every ``State.X`` goes through
# the enum metaclass's ``__getattr__`` (about five times a plain lookup), and a session reads them
# some 80 times a message.
_CONNECTED, _GREETED, _READY, _MAIL, _DATA, _AUTH, _CLOSED = (
    State.CONNECTED,
    State.GREETED,
    State.READY,
    State.MAIL,
    State.DATA,
    State.AUTH,
    State.CLOSED,
)


@attrs.frozen
class TLSInfo:
    version: str
    cipher: str


@attrs.define
class SessionInfo:
    """What policies and the trace header know about the client. Policies may set ``trusted``."""

    client_address: str
    client_port: int = 0
    hostname: str = "localhost"  # ours
    server_address: str = ""
    server_port: int = 0
    client_name: str = ""  # reverse DNS, when a policy looked it up
    helo: str | None = None
    esmtp: bool = False
    tls: TLSInfo | None = None
    auth: str | None = None  # authenticated identity
    trusted: bool = False  # may relay anywhere (decided by policy, e.g. trusted_networks)
    session_id: str = attrs.field(
        factory=lambda: _SESSION_PREFIX + format(next(_session_numbers), "x")
    )
    messages: int = 0  # accepted so far in this session


@attrs.frozen
class SessionSettings:
    """The limits and extensions of one listener (from ``ServerConfig`` plus listener extras)."""

    hostname: str
    max_message_size: int = 52428800
    max_recipients: int = 100
    max_errors: int = 20
    recipient_overshoot_limit: int = 1000  # 452s over max_recipients before each counts as an error
    command_line_limit: int = 512
    text_line_limit: int = 1000
    idle_timeout: float = 300.0
    data_timeout: float = 600.0
    smtputf8: bool = True
    dsn: bool = True
    chunking: bool = True  # CHUNKING (BDAT)
    # BINARYMIME too: only when every route onward is known to carry it, for a message we
    # cannot pass on would be bounced to a sender anyone can forge (backscatter)
    binarymime: bool = False
    starttls: bool = False  # TLS options are available for STARTTLS
    auth_mechanisms: tuple[str, ...] = ()  # e.g. ("PLAIN", "LOGIN"); needs a checker
    allow_plaintext_auth: bool = False  # offer AUTH before TLS
    require_auth: bool = False  # submission: MAIL only after AUTH
    max_auth_failures: int = 3
    # Received headers, ours included, that make a mail loop (554 5.4.6): Postfix's hopcount_limit
    hopcount_limit: int = 50
    greet_delay: float = 0.0  # wait this long before the greeting; talking before it is rejected
    limit_trusted: bool = False  # greet_delay for trusted clients too (Postfix exempts mynetworks)
    trace_header: Callable[[SessionInfo, Envelope, str, float], bytes] = received_header
    # The extension lines of the EHLO reply on the wire, by (STARTTLS offered, AUTH offered): the
    # same for every session of a listener, so built once (a cache, not a setting).
    _ehlo_tails: dict[tuple[bool, bool], bytes] = attrs.field(
        init=False, factory=dict, eq=False, hash=False, repr=False
    )


class SessionOutput(Protocol):
    """What the session needs from its connection."""

    def write(self, data: bytes) -> None: ...

    def lose_connection(self) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def start_tls(self) -> None: ...


@attrs.define
class _Transaction:
    sender: str
    params: dict[str, str | None]
    body: str | None = None
    smtputf8: bool = False
    size: int | None = None
    ret: str | None = None
    envid: str | None = None
    recipients: list[Recipient] = attrs.field(factory=list)
    rcpt_attempts: int = 0
    overshoot: int = 0  # RCPTs answered 452 4.5.3 (over max_recipients)
    bdat_total: int = 0  # octets of BDAT chunks so far (0: none yet)
    bdat_started: bool = False
    bdat_failed: Reply | None = None  # every further chunk of this message gets this reply


_NOTIFY = frozenset({"SUCCESS", "FAILURE", "DELAY"})


class Session:
    """One SMTP server conversation."""

    def __init__(
        self,
        settings: SessionSettings,
        info: SessionInfo,
        sink: IMessageSink,
        policy: IPolicy,
        clock: IReactorTime,
        out: SessionOutput,
        checker: ICredentialsChecker | None = None,
        auth_failures: Any = None,
        observer: Any = None,
    ) -> None:
        self.settings = settings
        self.info = info
        self.sink = sink
        self.policy = policy
        self.clock = clock
        self.out = out
        self.checker = checker
        self.auth_failures_by_ip = auth_failures  # a policy.limits.RateCounter shared by sessions
        self.observer = observer if observer is not None else NULL_OBSERVER
        self._verb = ""  # the command being answered (for the observer)
        self._draining: Reply | None = None  # shutting down: close with this once idle
        self.state = _CONNECTED
        self.tls_active = False
        self.auth_failures = 0
        self._greet_call: Any = None
        self._sasl: tuple[str, list[bytes]] | None = None
        self._reject: Reply | None = None  # the current message's fate, decided mid-stream
        self._headers: bytes | None = None  # header text seen so far (for the hop count)
        self._text_started = False  # an octet of the message text came (after our Received)
        self._bdat_reply: Reply | None = None  # answer owed for a BDAT chunk being skipped
        # When the client last completed something (a command, a line of text): timeouts count
        # from here, not from its last byte, so one byte a second cannot hold a session open.
        self.last_progress = clock.seconds()
        self.parser = p.Parser(settings.command_line_limit, settings.text_line_limit)
        self.errors = 0
        self._txn: _Transaction | None = None
        self._writer: IMessageWriter | None = None
        self._waiting: Deferred[Any] | None = None
        self._pumping = False
        self._paused = False  # we asked the connection to stop reading
        self._blocked = False  # the client is not reading our replies: take no command meanwhile

    #: verb → the method that answers it (looked up on the instance, so one class-wide table).
    _COMMANDS = {
        "EHLO": "_ehlo",
        "HELO": "_helo",
        "MAIL": "_mail",
        "RCPT": "_rcpt",
        "DATA": "_data",
        "RSET": "_rset",
        "NOOP": "_noop",
        "QUIT": "_quit",
        "VRFY": "_vrfy",
        "EXPN": "_expn",
        "HELP": "_help",
        "STARTTLS": "_starttls",
        "AUTH": "_auth",
        "BDAT": "_bdat",
    }

    # -- the connection's side ------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A policy or the store is answering; the client is waiting on us, not idle."""
        return self._waiting is not None

    @property
    def timeout(self) -> float:
        return self.settings.data_timeout if self.state is _DATA else self.settings.idle_timeout

    def start(self) -> None:
        self._ask(self.policy.connect, (self.info,), self._connected)

    def data_received(self, data: bytes) -> None:
        if self.state is _CLOSED:
            return
        self.parser.feed(data)
        if self.state is _CONNECTED:
            self._flow()  # the greeting is not out yet (connect policy pending); keep it for later
            return
        self._pump()

    def output_blocked(self, blocked: bool) -> None:
        """The connection's send buffer is over its bound (``True``: the client does not read our
        replies), or drained again (``False``). While blocked the session takes no command (and reads
        no more than ``PAUSE_ABOVE``), so a client that pipelines without reading cannot grow our memory."""
        if self.state is _CLOSED or blocked == self._blocked:
            return
        self._blocked = blocked
        if not blocked:
            self._pump()

    def connection_lost(self) -> None:
        self.state = _CLOSED
        if self._greet_call is not None and self._greet_call.active():
            self._greet_call.cancel()
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def tls_established(self, info: TLSInfo | None) -> None:
        """The TLS handshake completed (STARTTLS, or an implicit-TLS listener)."""
        self.tls_active = True
        self.info.tls = info

    def drain(self, reply: Reply) -> None:
        """Shutting down: close now if idle, else as soon as the transaction in hand is over."""
        self._draining = reply
        self._close_if_drained()

    @property
    def idle(self) -> bool:
        """Between transactions, nothing owed to the client."""
        return (
            self._waiting is None
            and self._txn is None
            and self._writer is None
            and self.state in (_GREETED, _READY)
        )

    def _close_if_drained(self) -> bool:
        if self._draining is not None and self.idle:
            self._close(self._draining)
            return True
        return False

    def shutdown(self, reply: Reply) -> None:
        """Close now, whatever is in hand (shutdown deadline): nothing half-received is stored."""
        self._close(reply)

    def timed_out(self) -> None:
        if self.state is not _CLOSED:
            self._close(R.TIMEOUT)

    # -- plumbing -------------------------------------------------------------------------------

    def reply(self, reply: Reply) -> None:
        if self.state is _CLOSED:
            return
        wire = _WIRE.get(id(reply))
        self.out.write(wire if wire is not None else reply.encode())
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

    def _send(self, wire: bytes) -> None:
        """A success reply already in wire form (no error counting to do)."""
        if self.state is not _CLOSED:
            self.out.write(wire)

    def _close(self, reply: Reply | None = None) -> None:
        if self.state is _CLOSED:
            return
        if reply is not None:
            wire = _WIRE.get(id(reply))
            self.out.write(wire if wire is not None else reply.encode())
        self.connection_lost()
        if self._paused:  # read again: what the client still sends is dropped, its hang-up seen
            self._paused = False
            self.out.resume()
        self.out.lose_connection()

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        next_event = self.parser.next_event
        seconds = self.clock.seconds
        try:
            while (
                self._waiting is None
                and not self._blocked
                and self.state is not _CLOSED
                and self.state is not _CONNECTED
            ):
                if self._draining is not None and self._close_if_drained():
                    break
                event = next_event()
                if event is None:
                    break
                self.last_progress = seconds()
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
        if self.state is _CLOSED:
            return
        stalled = (
            self._blocked or self._waiting is not None or self.state is _CONNECTED
        ) and self.parser.buffered > PAUSE_ABOVE
        if stalled:
            if not self._paused:
                self._paused = True
                self.out.pause()
        elif self._paused:
            self._paused = False
            self.out.resume()

    def _ask(
        self, method: Callable[..., Any], args: tuple[Any, ...], then: Callable[[Any], None]
    ) -> None:
        """Call a policy/store method; continue with ``then(answer)`` now or when it fires."""
        if method is _no_objection:  # a stage no policy checks
            then(None)
            return
        try:
            result = method(*args)
        except Exception:
            result = Failure()
        if result is None or result.__class__ is Reply:  # the common, synchronous answers
            then(result)
        elif isinstance(result, Deferred):
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
        if self.settings.greet_delay > 0 and (self.settings.limit_trusted or not self.info.trusted):
            self._greet_call = self.clock.callLater(self.settings.greet_delay, self._send_greeting)  # type: ignore[attr-defined]
        else:
            self._send_greeting()

    def _send_greeting(self) -> None:
        self._greet_call = None
        if self.state is not _CONNECTED:
            return
        if self.parser.buffered:  # the client talked first: a spam engine, not a mail server
            self._close(R.PREGREET)
            return
        self.state = _GREETED
        self.out.write(_greeting(self.settings.hostname))
        self._pump()

    def _handle(self, event: p.Event) -> None:
        if event.__class__ is p.Command and self.state is not _AUTH:
            verb = event.verb  # type: ignore[union-attr]
            # a fixed set of names for the observer (metrics labels), never the client's text
            name = self._COMMANDS.get(verb)
            if name is not None:
                self._verb = verb
                getattr(self, name)(event.argument)  # type: ignore[union-attr]
            else:
                self._verb = "UNKNOWN"
                if verb in HTTP_VERBS:
                    self._close(R.HTTP_COMMAND)
                else:
                    self.reply(R.UNKNOWN_COMMAND)
            return
        if isinstance(event, p.DataChunk):
            self._text(event.data)
            return
        if isinstance(event, p.DataEnd):
            if self._bdat_reply is not None or self._txn is not None and self._txn.bdat_started:
                self._verb = "BDAT"
                self._bdat_end(event)
            else:
                self._verb = "DATA"
                self._data_end(event)
        elif self.state is _AUTH:
            self._verb = "AUTH"
            self._sasl_response(event)
        elif event.error is p.LineError.TOO_LONG:
            self._verb = "UNKNOWN"
            self.reply(R.LINE_TOO_LONG)
        elif event.error is p.LineError.BARE_NEWLINE:
            self._verb = "UNKNOWN"
            self.reply(R.BARE_NEWLINE_COMMAND)
        else:
            self._verb = "UNKNOWN"
            self.reply(R.NOT_UTF8)

    def _reset(self) -> None:
        """Forget the transaction (and a BDAT message half received)."""
        self._txn = None
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        if self.state is _MAIL:
            self.state = _READY

    # -- message text (DATA and BDAT) -----------------------------------------------------------

    def _open_message(self, envelope: Envelope) -> Reply | None:
        if self.state is _CLOSED:  # the client left while the data policy thought
            return R.LOCAL_ERROR
        try:
            writer = self.sink.open(envelope)
            writer.write(
                self.settings.trace_header(
                    self.info, envelope, writer.queue_id, envelope.received_at
                )
            )
        except MailRelayError as e:
            return e.reply
        self._writer = writer
        self._envelope_in_data = envelope
        self._reject = None
        self._headers = b""
        self._text_started = False
        return None

    def _text(self, data: bytes) -> None:
        if not self._text_started and data:
            self._text_started = True
            blank = separator(data)
            if blank:  # the client's first line would go on with our Received: its text is body
                self._headers = None  # no header section, so no Received header to count
                if self._writer is not None and self._reject is None:
                    self._writer.write(blank)
        if self._headers is not None:
            self._scan_headers(data)
        if self._writer is not None and self._reject is None:
            self._writer.write(data)

    def _scan_headers(self, data: bytes) -> None:
        """Count Received headers (RFC 5321 6.3 loop detection) until the header section ends.

        As Postfix's cleanup does, ours counts too: with the default limit of 50, a message that
        arrives with 49 is refused, one with 48 goes on (and arrives at the next hop with 49).
        """
        assert self._headers is not None
        head = self._headers + data
        end = 0 if head.startswith(b"\r\n") else head.find(b"\r\n\r\n")
        section = head if end < 0 else head[:end]
        theirs = self.settings.hopcount_limit - 1  # this many besides ours is a loop
        # fewer lines than that cannot hold that many Received headers: no regex search then
        if section.count(b"\n") + 1 >= theirs and len(_RECEIVED.findall(section)) >= theirs:
            self._reject = R.TOO_MANY_HOPS
            self._headers = None
        elif end >= 0 or len(head) > HEADER_SCAN_LIMIT:
            self._headers = None
        else:
            self._headers = head

    def _finish_message(self, event: p.DataEnd) -> None:
        """The text is complete: errors, then end-of-data policy, then commit, then the reply."""
        writer, self._writer = self._writer, None
        envelope = self._envelope_in_data
        self._headers = None
        self.state = _READY
        self._txn = None
        if writer is None:  # cannot happen: text is only read with a writer open
            self.reply(R.LOCAL_ERROR)
            return
        failure = _DATA_ERRORS[event.error] if event.error is not None else self._reject
        if failure is not None:
            writer.abort()
            self.reply(failure)
            return

        def committed(result: Any) -> None:
            if isinstance(result, Reply):  # a TemporaryFailure/PermanentFailure from commit
                writer.abort()
                self.reply(result)
                return
            self.info.messages += 1
            self.errors = 0
            info = self.info
            self.observer.message_accepted(info, envelope, writer.queue_id, event.size)
            log_info(
                "{queue_id}: client=[{ip}] helo={helo} from=<{sender}> size={size} nrcpt={nrcpt} "
                "proto={proto}{tls}{auth}",
                queue_id=writer.queue_id,
                ip=info.client_address,
                helo=info.helo,
                sender=envelope.sender,
                size=event.size,
                nrcpt=len(envelope.recipients),
                proto=envelope.protocol,
                tls=f" tls={info.tls.version}" if info.tls else "",
                auth=f" sasl_username={info.auth}" if info.auth else "",
            )
            self._send(f"250 2.0.0 Ok: queued as {writer.queue_id}\r\n".encode())

        def allowed(objection: Reply | None) -> None:
            if objection is not None:
                writer.abort()
                self.reply(objection)
                return
            self._ask(writer.commit, (), committed)

        self._ask(self.policy.end_of_data, (self.info, envelope, event.size), allowed)

    # -- commands -------------------------------------------------------------------------------

    def _ehlo(self, arg: str) -> None:
        self._greet(_ascii.strip(arg), esmtp=True)

    def _helo(self, arg: str) -> None:
        self._greet(_ascii.strip(arg), esmtp=False)

    def _greet(self, name: str, esmtp: bool) -> None:
        if (
            not name or " " in name or not name.isprintable()
        ):  # one word, no blank or control of any script
            self.reply(R.HELO_SYNTAX)
            return

        def then(objection: Reply | None) -> None:
            if objection is not None:
                self.reply(objection)
                return
            self._reset()
            info = self.info
            info.helo, info.esmtp = name, esmtp
            self.state = _READY
            if esmtp:
                greeting = f"250-{self.settings.hostname} Hello {_ascii.printable(name)} [{info.client_address}]\r\n"
                self._send(greeting.encode() + self._ehlo_tail())
            else:
                self.reply(Reply(250, None, self.settings.hostname))

        self._ask(self.policy.helo, (self.info, name), then)

    def _ehlo_tail(self) -> bytes:
        """The EHLO reply after its first line, as sent (built once per listener and TLS/AUTH state)."""
        key = (self.settings.starttls and not self.tls_active, self._auth_offered())
        tails = self.settings._ehlo_tails
        tail = tails.get(key)
        if tail is None:
            ext = self.extensions()
            tail = tails[key] = (
                "".join(f"250-{e}\r\n" for e in ext[:-1]).encode() + f"250 {ext[-1]}\r\n".encode()
            )
        return tail

    def extensions(self) -> list[str]:
        s = self.settings
        ext = ["PIPELINING", f"SIZE {s.max_message_size}", "8BITMIME", "ENHANCEDSTATUSCODES"]
        if s.smtputf8:
            ext.append("SMTPUTF8")
        if s.dsn:
            ext.append("DSN")
        if s.chunking:
            ext += ["CHUNKING", "BINARYMIME"] if s.binarymime else ["CHUNKING"]
        if s.starttls and not self.tls_active:
            ext.append("STARTTLS")
        if self._auth_offered():
            ext.append("AUTH " + " ".join(s.auth_mechanisms))
        return ext

    def _auth_offered(self) -> bool:
        s = self.settings
        return (
            bool(s.auth_mechanisms)
            and self.checker is not None
            and not self.info.auth
            and (self.tls_active or s.allow_plaintext_auth)
        )

    def _mail(self, arg: str) -> None:
        if self.state is _GREETED:
            self.reply(R.NEED_HELO)
            return
        if self._txn is not None:
            self.reply(R.NESTED_MAIL)
            return
        if self.settings.require_auth and not self.info.auth:
            self.reply(Reply(530, "5.7.0", "Authentication required"))
            return
        try:
            inner, rest = p.split_path(arg, "FROM")
            path = p.parse_path(inner, allow_null=True, allow_postmaster=False)
            params = p.parse_params(rest)
        except p.PathError as e:
            if e.syntax:
                self.reply(Reply(501, "5.5.4", f"Syntax: MAIL FROM:<address> ({e.reason})"))
            else:
                self.reply(Reply(501, "5.1.7", f"Bad sender address syntax ({e.reason})"))
            return
        txn = _Transaction(path.address, params)
        problem = self._mail_params(txn, params)
        if problem is None and path.utf8 and not txn.smtputf8:
            problem = R.NEED_SMTPUTF8
        if problem is not None:
            self.reply(problem)
            return

        def then(objection: Reply | None) -> None:
            if objection is not None:
                self.reply(objection)
                return
            self._txn = txn
            self.state = _MAIL
            self.reply(R.SENDER_OK)

        self._ask(self.policy.mail, (self.info, path.address, params), then)

    def _mail_params(self, txn: _Transaction, params: dict[str, str | None]) -> Reply | None:
        if params and not self.info.esmtp:
            return Reply(555, "5.5.4", "Error: parameters need EHLO")
        for key, value in params.items():
            if key == "SIZE":
                size = _ascii.number(value or "", 20)
                if size is None:
                    return Reply(501, "5.5.4", "Bad SIZE parameter")
                txn.size = size
                if txn.size > self.settings.max_message_size:
                    return Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
            elif key == "BODY":
                body = _ascii.upper(value or "")
                if body not in ("7BIT", "8BITMIME", "BINARYMIME") or (
                    body == "BINARYMIME" and not self.settings.chunking
                ):
                    return Reply(501, "5.5.4", "Bad BODY parameter")
                if body == "BINARYMIME" and not self.settings.binarymime:
                    return Reply(
                        555,
                        "5.5.4",
                        "BODY=BINARYMIME not offered: no route onward is known to carry it",
                    )
                txn.body = None if body == "7BIT" else body
            elif key == "SMTPUTF8" and self.settings.smtputf8:
                if value is not None:
                    return Reply(501, "5.5.4", "SMTPUTF8 takes no value")
                txn.smtputf8 = True
            elif key == "RET" and self.settings.dsn:
                ret = _ascii.upper(value or "")
                if ret not in ("FULL", "HDRS"):
                    return Reply(501, "5.5.4", "Bad RET parameter")
                txn.ret = ret
            elif key == "ENVID" and self.settings.dsn:
                try:
                    envid = p.decode_xtext(value or "")
                except p.PathError:
                    envid = ""
                if not envid or len(value or "") > 100:
                    return Reply(501, "5.5.4", "Bad ENVID parameter")
                txn.envid = envid
            elif key == "AUTH":
                pass  # RFC 4954 5: accepted and not passed on (we do not trust it)
            else:
                return Reply(555, "5.5.4", f"Unsupported option: {key}")
        return None

    def _rcpt(self, arg: str) -> None:
        if self.state is _GREETED:
            self.reply(R.NEED_HELO)
            return
        txn = self._txn
        if txn is None:
            self.reply(R.NEED_MAIL)
            return
        txn.rcpt_attempts += 1
        try:
            inner, rest = p.split_path(arg, "TO")
            path = p.parse_path(inner, allow_null=False, allow_postmaster=True)
            params = p.parse_params(rest)
        except p.PathError as e:
            if e.syntax:
                self.reply(Reply(501, "5.5.4", f"Syntax: RCPT TO:<address> ({e.reason})"))
            else:
                self.reply(Reply(501, "5.1.3", f"Bad recipient address syntax ({e.reason})"))
            return
        notify: tuple[str, ...] = ()
        orcpt: str | None = None
        for key, value in params.items():
            if key == "NOTIFY" and self.settings.dsn:
                items = tuple(_ascii.upper(value or "").split(","))
                if not (
                    items == ("NEVER",)
                    or (items and set(items) <= _NOTIFY and len(set(items)) == len(items))
                ):
                    self.reply(Reply(501, "5.5.4", "Bad NOTIFY parameter"))
                    return
                notify = items
            elif key == "ORCPT" and self.settings.dsn:
                addr_type, semi, xtext = (value or "").partition(";")
                try:
                    decoded = p.decode_xtext(xtext) if semi else ""
                except p.PathError:
                    decoded = ""
                if not decoded or not p.is_addr_type(addr_type) or len(value or "") > 500:
                    self.reply(Reply(501, "5.5.4", "Bad ORCPT parameter"))
                    return
                orcpt = f"{addr_type};{decoded}"
            else:
                self.reply(Reply(555, "5.5.4", f"Unsupported option: {key}"))
                return
        if path.utf8 and not txn.smtputf8:
            self.reply(R.NEED_SMTPUTF8)
            return
        if len(txn.recipients) >= self.settings.max_recipients:
            self.reply(R.TOO_MANY_RECIPIENTS)
            txn.overshoot += 1
            if txn.overshoot > self.settings.recipient_overshoot_limit:
                self._count_error()  # a client that never takes the 452 for an answer
            return
        address = path.address
        if address == "postmaster":
            address = f"postmaster@{self.settings.hostname}"

        def then(objection: Reply | None) -> None:
            if objection is not None:
                self.reply(objection)
                return
            if self._txn is txn:
                txn.recipients.append(Recipient(address, notify, orcpt))
                self.reply(R.RCPT_OK)
            else:
                self.reply(
                    R.BAD_SEQUENCE
                )  # the transaction went away meanwhile (cannot happen in order)

        self._ask(self.policy.rcpt, (self.info, txn.sender, path.address, params), then)

    def _envelope(self, txn: _Transaction) -> Envelope:
        info = self.info
        return Envelope(
            sender=txn.sender,
            recipients=tuple(txn.recipients),
            helo=info.helo or "",
            client_address=info.client_address,
            client_name=info.client_name,
            protocol=protocol_name(
                info.esmtp, info.tls is not None, info.auth is not None, txn.smtputf8
            ),
            body=txn.body,
            smtputf8=txn.smtputf8,
            size=txn.size,
            ret=txn.ret,
            envid=txn.envid,
            auth=info.auth,
            received_at=self.clock.seconds(),
            trusted=info.trusted or info.auth is not None,
        )

    def _data(self, arg: str) -> None:
        if self.state is _GREETED:
            self.reply(R.NEED_HELO)
            return
        txn = self._txn
        if txn is None:
            self.reply(R.NEED_MAIL)
            return
        if not txn.recipients:
            self.reply(R.NO_VALID_RCPT if txn.rcpt_attempts else R.NEED_RCPT)
            return
        if _ascii.strip(arg):
            self.reply(R.NO_ARGUMENTS)
            return
        if txn.bdat_started or txn.body == "BINARYMIME":
            self.reply(Reply(503, "5.5.1", "Error: use BDAT for this message"))
            return
        envelope = self._envelope(txn)

        def then(objection: Reply | None) -> None:
            if objection is None:
                objection = self._open_message(envelope)
            if objection is not None:
                self.reply(objection)
                return
            self.state = _DATA
            self.parser.begin_data(self.settings.max_message_size)
            self.reply(R.START_DATA)

        self._ask(self.policy.data, (self.info, envelope), then)

    def _data_end(self, event: p.DataEnd) -> None:
        self._finish_message(event)

    _envelope_in_data: Envelope

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

    # -- STARTTLS (RFC 3207) ---------------------------------------------------------------------

    def _starttls(self, arg: str) -> None:
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
                "session {id}: discarded {n} octets sent after STARTTLS",
                id=self.info.session_id,
                n=dropped,
            )
        self._reset()
        self.info.helo, self.info.esmtp, self.info.auth = None, False, None
        self.state = _GREETED
        self.tls_active = True
        self.out.start_tls()

    # -- AUTH (RFC 4954) ------------------------------------------------------------------------

    def _auth(self, arg: str) -> None:
        if not self.settings.auth_mechanisms or self.checker is None:
            self.reply(Reply(503, "5.5.1", "Error: authentication not enabled"))
            return
        if self.state is _GREETED:
            self.reply(R.NEED_HELO)
            return
        if self.info.auth:
            self.reply(Reply(503, "5.5.1", "Error: already authenticated"))
            return
        if self._txn is not None:
            self.reply(Reply(503, "5.5.1", "Error: MAIL transaction in progress"))
            return
        throttle = self.auth_failures_by_ip
        if throttle is not None and throttle.exceeded(self.info.client_address):
            self._close(
                Reply(421, "4.7.0", "Error: too many authentication failures from your address")
            )
            return
        if not (self.tls_active or self.settings.allow_plaintext_auth):
            self.reply(
                Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
            )
            return
        mechanism, _, initial = _ascii.strip(arg).partition(" ")
        mechanism = _ascii.upper(mechanism)
        if mechanism not in self.settings.auth_mechanisms or mechanism not in sasl.MECHANISMS:
            self.reply(Reply(504, "5.5.4", "Unrecognized authentication type"))
            return
        responses: list[bytes] = []
        if initial:
            try:
                responses.append(b"" if initial == "=" else sasl.b64decode(initial))
            except sasl.SASLError:
                self.reply(Reply(501, "5.5.2", "Cannot decode response"))
                return
        self._sasl = (mechanism, responses)
        self._sasl_step()

    def _sasl_step(self) -> None:
        assert self._sasl is not None
        mechanism, responses = self._sasl
        challenges = sasl.MECHANISMS[mechanism]
        if len(responses) < len(challenges):
            self.state = _AUTH
            challenge = base64.b64encode(challenges[len(responses)])
            self.out.write(b"334 " + challenge + b"\r\n")  # "334 " even when empty (RFC 4954 4)
            return
        self.state = _READY
        self._sasl = None
        try:
            user, password = sasl.credentials_from(mechanism, responses)
        except sasl.SASLError as e:
            self.reply(Reply(501, "5.5.2", f"Cannot decode response ({e})"))
            return
        assert self.checker is not None
        check = maybeDeferred(
            self.checker.requestAvatarId, UsernamePassword(user.encode(), password.encode())
        )
        check.addCallbacks(lambda avatar: (True, user), lambda f: (False, f))
        self._ask(lambda: check, (), self._authenticated)

    def _sasl_response(self, event: p.Event) -> None:
        self.state = _READY
        if not isinstance(event, p.Command):
            self._sasl = None
            self.reply(Reply(501, "5.5.2", "Cannot decode response"))
            return
        line = _ascii.strip(event.line)
        if line == "*":
            self._sasl = None
            self.reply(Reply(501, "5.7.0", "Authentication aborted"))
            return
        try:
            response = sasl.b64decode(line)
        except sasl.SASLError:
            self._sasl = None
            self.reply(Reply(501, "5.5.2", "Cannot decode response"))
            return
        assert self._sasl is not None
        self._sasl[1].append(response)
        self._sasl_step()

    def _authenticated(self, result: tuple[bool, Any]) -> None:
        ok, detail = result
        if ok:
            self.info.auth = detail
            self.reply(Reply(235, "2.7.0", "Authentication successful"))
            return
        if not isinstance(detail, Failure) or not detail.check(*_LOGIN_FAILURES):
            log.failure("credentials check failed in session {id}", detail, id=self.info.session_id)
            self.reply(Reply(454, "4.7.0", "Temporary authentication failure"))
            return
        self.auth_failures += 1
        if self.auth_failures_by_ip is not None:
            self.auth_failures_by_ip.hit(self.info.client_address)
        log.info(
            "session {id}: authentication failed from [{ip}]",
            id=self.info.session_id,
            ip=self.info.client_address,
        )
        self.reply(Reply(535, "5.7.8", "Authentication credentials invalid"))
        if self.auth_failures >= self.settings.max_auth_failures:
            self._close(Reply(421, "4.7.0", "Error: too many authentication failures"))

    # -- CHUNKING (RFC 3030) --------------------------------------------------------------------

    def _bdat(self, arg: str) -> None:
        if not self.settings.chunking:
            self.reply(R.UNKNOWN_COMMAND)
            return
        parts = _ascii.split(arg)
        size = _ascii.number(parts[0], 18) if 1 <= len(parts) <= 2 else None
        if size is None or (len(parts) == 2 and _ascii.upper(parts[1]) != "LAST"):
            # without a size we cannot tell its octets from commands: stop here
            self._close(Reply(501, "5.5.4", "Syntax: BDAT size [LAST]"))
            return
        last = len(parts) == 2
        txn = self._txn
        problem: Reply | None = None
        if self.state is _GREETED:
            problem = R.NEED_HELO
        elif txn is None:
            problem = R.NEED_MAIL
        elif not txn.recipients:
            problem = R.NO_VALID_RCPT if txn.rcpt_attempts else R.NEED_RCPT
        elif txn.bdat_failed is not None:
            problem = txn.bdat_failed
        if problem is not None or txn is None:
            self._skip_chunk(size, last, problem or R.BAD_SEQUENCE)
            return
        if txn.bdat_started:
            self._read_chunk(txn, size, last)
            return
        envelope = self._envelope(txn)

        def then(objection: Reply | None) -> None:
            if objection is None:
                objection = self._open_message(envelope)
            if objection is not None:
                txn.bdat_failed = objection
                self._skip_chunk(size, last, objection)
                return
            txn.bdat_started = True
            self._read_chunk(txn, size, last)

        self._ask(self.policy.data, (self.info, envelope), then)

    def _read_chunk(self, txn: _Transaction, size: int, last: bool) -> None:
        self.state = _DATA
        self.parser.begin_bdat(
            size,
            last,
            self.settings.max_message_size,
            txn.bdat_total,
            binary=txn.body == "BINARYMIME",
        )

    def _skip_chunk(self, size: int, last: bool, reply: Reply) -> None:
        """Read a chunk we will not take, and answer ``reply`` once it is consumed."""
        self._bdat_reply = reply
        self._prev_state = self.state
        self.state = _DATA
        self.parser.begin_bdat(size, last, 0, 1, binary=True)
        self.parser.doom(p.DataError.TOO_BIG)

    def _bdat_end(self, event: p.DataEnd) -> None:
        if self._bdat_reply is not None:
            reply, self._bdat_reply = self._bdat_reply, None
            self.state = self._prev_state
            if event.last and self._txn is not None and self._txn.bdat_failed is not None:
                self._reset()
            self.reply(reply)
            return
        txn = self._txn
        assert txn is not None
        txn.bdat_total = event.size
        if event.last:
            self._finish_message(event)
            return
        self.state = _MAIL
        failure = _DATA_ERRORS[event.error] if event.error is not None else self._reject
        if failure is not None:
            if self._writer is not None:
                self._writer.abort()
                self._writer = None
            txn.bdat_failed = failure
            self.reply(failure)
            return
        self.reply(Reply(250, "2.0.0", f"Ok: {event.size} octets received"))

    _prev_state = _READY

    def _help(self, arg: str) -> None:
        verbs = " ".join(sorted(self._COMMANDS))
        self.reply(Reply(214, "2.0.0", f"Commands: {verbs}"))


#: The wire form of each fixed reply in ``replies``, by identity (a dict lookup on an int; the
#: constants live as long as the process, so no other object can share their id).
_WIRE: dict[int, bytes] = {id(r): r.encode() for r in vars(R).values() if isinstance(r, Reply)}


@functools.lru_cache(maxsize=16)
def _greeting(hostname: str) -> bytes:
    return Reply(220, None, f"{hostname} ESMTP mailrelay").encode()


_DATA_ERRORS = {
    p.DataError.TOO_BIG: R.TOO_BIG,
    p.DataError.LINE_TOO_LONG: R.TEXT_LINE_TOO_LONG,
    p.DataError.BARE_NEWLINE: R.BARE_NEWLINE_DATA,
}


def _login_failures() -> tuple[type[Exception], ...]:
    from twisted.cred import error

    return (error.UnauthorizedLogin, error.UnhandledCredentials)


_LOGIN_FAILURES = _login_failures()
