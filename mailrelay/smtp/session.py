"""The ESMTP server session: an explicit state machine between the parser and the outside world.

It owns no socket and no clock: a ``SessionOutput`` (the thin protocol in ``server.py``) carries
its bytes, ``clock`` dates the messages, ``IPolicy`` answers each stage and ``IMessageSink`` stores
the text. Any policy answer (and the writer's commit) may be a Deferred; while one is pending the
session stops pulling events from the parser, so under PIPELINING the replies still go out in the
order of the commands and nothing buffered is read in the wrong mode.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.envelope import Envelope, Recipient, Reply
from mailrelay.errors import MailRelayError
from mailrelay.interfaces import IMessageSink, IMessageWriter, IPolicy
from mailrelay.policy.received import protocol_name, received_header
from mailrelay.smtp import _parser as p
from mailrelay.smtp import replies as R

log = Logger()

#: While a reply is pending, stop reading from the socket once this much input is buffered.
PAUSE_ABOVE = 256 * 1024
HTTP_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "DELETE", "PATCH"})


class State(enum.Enum):
    CONNECTED = enum.auto()  # greeting not sent yet (the connect policy may be pending)
    GREETED = enum.auto()  # waiting for HELO/EHLO
    READY = enum.auto()  # HELO/EHLO done, no transaction
    MAIL = enum.auto()  # MAIL accepted; RCPTs being collected
    DATA = enum.auto()  # message text streaming in
    CLOSED = enum.auto()


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
    session_id: str = attrs.field(factory=lambda: uuid.uuid4().hex[:12])
    messages: int = 0  # accepted so far in this session


@attrs.frozen
class SessionSettings:
    """The limits and extensions of one listener (from ``ServerConfig`` plus listener extras)."""

    hostname: str
    max_message_size: int = 52428800
    max_recipients: int = 100
    max_errors: int = 20
    command_line_limit: int = 512
    text_line_limit: int = 1000
    idle_timeout: float = 300.0
    data_timeout: float = 600.0
    smtputf8: bool = True
    dsn: bool = True
    trace_header: Callable[[SessionInfo, Envelope, str, float], bytes] = received_header


class SessionOutput(Protocol):
    """What the session needs from its connection."""

    def write(self, data: bytes) -> None: ...

    def lose_connection(self) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...


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
    ) -> None:
        self.settings = settings
        self.info = info
        self.sink = sink
        self.policy = policy
        self.clock = clock
        self.out = out
        self.state = State.CONNECTED
        self.parser = p.Parser(settings.command_line_limit, settings.text_line_limit)
        self.errors = 0
        self._txn: _Transaction | None = None
        self._writer: IMessageWriter | None = None
        self._waiting: Deferred[Any] | None = None
        self._pumping = False
        self._paused = False
        self._commands: dict[str, Callable[[str], None]] = {
            "EHLO": self._ehlo,
            "HELO": self._helo,
            "MAIL": self._mail,
            "RCPT": self._rcpt,
            "DATA": self._data,
            "RSET": self._rset,
            "NOOP": self._noop,
            "QUIT": self._quit,
            "VRFY": self._vrfy,
            "EXPN": self._expn,
            "HELP": self._help,
        }

    # -- the connection's side ------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A policy or the store is answering; the client is waiting on us, not idle."""
        return self._waiting is not None

    @property
    def timeout(self) -> float:
        return self.settings.data_timeout if self.state is State.DATA else self.settings.idle_timeout

    def start(self) -> None:
        self._ask(self.policy.connect, (self.info,), self._connected)

    def data_received(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        self.parser.feed(data)
        if self.state is State.CONNECTED:
            return  # the greeting is not out yet (connect policy pending); keep it for later
        self._pump()

    def connection_lost(self) -> None:
        self.state = State.CLOSED
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def timed_out(self) -> None:
        if self.state is not State.CLOSED:
            self._close(R.TIMEOUT)

    # -- plumbing -------------------------------------------------------------------------------

    def reply(self, reply: Reply) -> None:
        if self.state is State.CLOSED:
            return
        self.out.write(reply.encode())
        if reply.code >= 400:
            self.errors += 1
            if self.errors >= self.settings.max_errors and reply.code != 421:
                self._close(R.TOO_MANY_ERRORS)

    def _close(self, reply: Reply | None = None) -> None:
        if self.state is State.CLOSED:
            return
        if reply is not None:
            self.out.write(reply.encode())
        self.connection_lost()
        self.out.lose_connection()

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._waiting is None and self.state not in (State.CLOSED, State.CONNECTED):
                event = self.parser.next_event()
                if event is None:
                    break
                self._handle(event)
        finally:
            self._pumping = False
        if self._waiting is not None and self.parser.buffered > PAUSE_ABOVE and not self._paused:
            self._paused = True
            self.out.pause()
        elif self._paused and self._waiting is None:
            self._paused = False
            self.out.resume()

    def _ask(self, method: Callable[..., Any], args: tuple[Any, ...], then: Callable[[Any], None]) -> None:
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
        if isinstance(result, Failure):
            if result.check(MailRelayError):
                result = result.value.reply
            else:
                log.failure("policy or store failed in session {id}", result, id=self.info.session_id)
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
        self.state = State.GREETED
        self.out.write(Reply(220, None, f"{self.settings.hostname} ESMTP mailrelay").encode())
        self._pump()

    def _handle(self, event: p.Event) -> None:
        if isinstance(event, p.DataChunk):
            if self._writer is not None:
                self._writer.write(event.data)
        elif isinstance(event, p.DataEnd):
            self._data_end(event)
        elif isinstance(event, p.Command):
            handler = self._commands.get(event.verb)
            if handler is not None:
                handler(event.argument)
            elif event.verb in HTTP_VERBS:
                self._close(R.HTTP_COMMAND)
            else:
                self.reply(R.UNKNOWN_COMMAND)
        elif event.error is p.LineError.TOO_LONG:
            self.reply(R.LINE_TOO_LONG)
        elif event.error is p.LineError.BARE_NEWLINE:
            self.reply(R.BARE_NEWLINE_COMMAND)
        else:
            self.reply(R.NOT_UTF8)

    def _reset(self) -> None:
        self._txn = None

    # -- commands -------------------------------------------------------------------------------

    def _ehlo(self, arg: str) -> None:
        self._greet(arg.strip(), esmtp=True)

    def _helo(self, arg: str) -> None:
        self._greet(arg.strip(), esmtp=False)

    def _greet(self, name: str, esmtp: bool) -> None:
        if not name or " " in name:
            self.reply(R.HELO_SYNTAX)
            return

        def then(objection: Reply | None) -> None:
            if objection is not None:
                self.reply(objection)
                return
            self._reset()
            self.info.helo, self.info.esmtp = name, esmtp
            self.state = State.READY
            greeting = f"{self.settings.hostname} Hello {name} [{self.info.client_address}]"
            if esmtp:
                self.reply(Reply(250, None, "\n".join([greeting, *self.extensions()])))
            else:
                self.reply(Reply(250, None, self.settings.hostname))

        self._ask(self.policy.helo, (self.info, name), then)

    def extensions(self) -> list[str]:
        s = self.settings
        ext = ["PIPELINING", f"SIZE {s.max_message_size}", "8BITMIME", "ENHANCEDSTATUSCODES"]
        if s.smtputf8:
            ext.append("SMTPUTF8")
        if s.dsn:
            ext.append("DSN")
        return ext

    def _needs_helo(self) -> bool:
        if self.state is State.GREETED:
            self.reply(R.NEED_HELO)
            return True
        return False

    def _mail(self, arg: str) -> None:
        if self._needs_helo():
            return
        if self._txn is not None:
            self.reply(R.NESTED_MAIL)
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
            self.state = State.MAIL
            self.reply(R.SENDER_OK)

        self._ask(self.policy.mail, (self.info, path.address, params), then)

    def _mail_params(self, txn: _Transaction, params: dict[str, str | None]) -> Reply | None:
        if params and not self.info.esmtp:
            return Reply(555, "5.5.4", "Error: parameters need EHLO")
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    return Reply(501, "5.5.4", "Bad SIZE parameter")
                txn.size = int(value)
                if txn.size > self.settings.max_message_size:
                    return Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
            elif key == "BODY":
                body = (value or "").upper()
                if body not in ("7BIT", "8BITMIME"):
                    return Reply(501, "5.5.4", "Bad BODY parameter")
                txn.body = None if body == "7BIT" else body
            elif key == "SMTPUTF8" and self.settings.smtputf8:
                if value is not None:
                    return Reply(501, "5.5.4", "SMTPUTF8 takes no value")
                txn.smtputf8 = True
            elif key == "RET" and self.settings.dsn:
                ret = (value or "").upper()
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
        if self._needs_helo():
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
                items = tuple((value or "").upper().split(","))
                if not (items == ("NEVER",) or (items and set(items) <= _NOTIFY and len(set(items)) == len(items))):
                    self.reply(Reply(501, "5.5.4", "Bad NOTIFY parameter"))
                    return
                notify = items
            elif key == "ORCPT" and self.settings.dsn:
                addr_type, semi, xtext = (value or "").partition(";")
                try:
                    decoded = p.decode_xtext(xtext) if semi else ""
                except p.PathError:
                    decoded = ""
                if not decoded or not addr_type or len(value or "") > 500:
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
                self.reply(R.BAD_SEQUENCE)  # the transaction went away meanwhile (cannot happen in order)

        self._ask(self.policy.rcpt, (self.info, txn.sender, path.address, params), then)

    def _envelope(self, txn: _Transaction) -> Envelope:
        info = self.info
        return Envelope(
            sender=txn.sender,
            recipients=tuple(txn.recipients),
            helo=info.helo or "",
            client_address=info.client_address,
            client_name=info.client_name,
            protocol=protocol_name(info.esmtp, info.tls is not None, info.auth is not None, txn.smtputf8),
            body=txn.body,
            smtputf8=txn.smtputf8,
            size=txn.size,
            ret=txn.ret,
            envid=txn.envid,
            auth=info.auth,
            received_at=self.clock.seconds(),
        )

    def _data(self, arg: str) -> None:
        if self._needs_helo():
            return
        txn = self._txn
        if txn is None:
            self.reply(R.NEED_MAIL)
            return
        if not txn.recipients:
            self.reply(R.NO_VALID_RCPT if txn.rcpt_attempts else R.NEED_RCPT)
            return
        if arg.strip():
            self.reply(R.NO_ARGUMENTS)
            return
        envelope = self._envelope(txn)

        def then(objection: Reply | None) -> None:
            if objection is not None:
                self.reply(objection)
                return
            try:
                writer = self.sink.open(envelope)
                writer.write(self.settings.trace_header(self.info, envelope, writer.queue_id, envelope.received_at))
            except MailRelayError as e:
                self.reply(e.reply)
                return
            self._writer = writer
            self._envelope_in_data = envelope
            self.state = State.DATA
            self.parser.begin_data(self.settings.max_message_size)
            self.reply(R.START_DATA)

        self._ask(self.policy.data, (self.info, envelope), then)

    def _data_end(self, event: p.DataEnd) -> None:
        writer, self._writer = self._writer, None
        envelope = self._envelope_in_data
        self.state = State.READY
        self._reset()
        if writer is None:  # cannot happen: DATA mode is only entered with a writer
            self.reply(R.LOCAL_ERROR)
            return
        if event.error is not None:
            writer.abort()
            self.reply(
                {
                    p.DataError.TOO_BIG: R.TOO_BIG,
                    p.DataError.LINE_TOO_LONG: R.TEXT_LINE_TOO_LONG,
                    p.DataError.BARE_NEWLINE: R.BARE_NEWLINE_DATA,
                }[event.error]
            )
            return

        def committed(result: Any) -> None:
            if isinstance(result, Reply):  # a TemporaryFailure/PermanentFailure from commit
                writer.abort()
                self.reply(result)
                return
            self.info.messages += 1
            self.errors = 0
            self.reply(Reply(250, "2.0.0", f"Ok: queued as {writer.queue_id}"))

        def allowed(objection: Reply | None) -> None:
            if objection is not None:
                writer.abort()
                self.reply(objection)
                return
            self._ask(writer.commit, (), committed)

        self._ask(self.policy.end_of_data, (self.info, envelope, event.size), allowed)

    _envelope_in_data: Envelope

    def _rset(self, arg: str) -> None:
        if arg.strip():
            self.reply(R.NO_ARGUMENTS)
            return
        self._reset()
        if self.state is State.MAIL:
            self.state = State.READY
        self.reply(R.OK)

    def _noop(self, arg: str) -> None:
        self.reply(R.OK)

    def _quit(self, arg: str) -> None:
        self._close(R.BYE)

    def _vrfy(self, arg: str) -> None:
        self.reply(R.VRFY if arg.strip() else Reply(501, "5.5.4", "Syntax: VRFY address"))

    def _expn(self, arg: str) -> None:
        self.reply(R.NOT_IMPLEMENTED)

    def _help(self, arg: str) -> None:
        verbs = " ".join(sorted(self._commands))
        self.reply(Reply(214, "2.0.0", f"Commands: {verbs}"))
