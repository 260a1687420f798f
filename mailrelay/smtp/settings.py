"""What a server session is given: its settings, and the small interfaces it talks through.

The wire knows no config file: ``mailrelay.listener`` turns ``[server]`` into ``SessionSettings``
(and an embedder may build them by hand). Everything here is a value or a ``Protocol``; the
session's collaborators (the connection, the intake stage, the AUTH throttle) are passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs

from mailrelay.envelope import Envelope, Reply, SessionInfo

# The session's view of its collaborators, as typing Protocols: the zope interfaces they provide
# (``IReactorTime``, ``interfaces.IMessageSink``, ``observer.IRelayObserver``) say the same for
# ``verifyObject``, but a type checker without a zope plugin cannot call through them.


class DelayedCall(Protocol):
    """A call ``Clock.callLater`` scheduled (``IDelayedCall``)."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class Clock(Protocol):
    """The part of ``IReactorTime`` the session uses."""

    def seconds(self) -> float: ...

    def callLater(  # noqa: N802 - Twisted's name
        self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> DelayedCall: ...


class MessageWriter(Protocol):
    """One message being stored (``interfaces.IMessageWriter``)."""

    queue_id: str

    def write(self, data: bytes) -> None: ...

    def commit(self) -> Any: ...  # None, or a Deferred firing once the message is durable

    def abort(self) -> None: ...


class MessageSink(Protocol):
    """Where messages go (``interfaces.IMessageSink``): a writer per accepted DATA/BDAT."""

    def open(self, envelope: Envelope) -> MessageWriter: ...


class Observer(Protocol):
    """What the server tells an ``observer.IRelayObserver`` (``observer.RelayObserver``)."""

    def connection_opened(self, info: SessionInfo) -> None: ...

    def connection_closed(self, info: SessionInfo) -> None: ...

    def connection_refused(self, client_address: str, reply: Reply) -> None: ...

    def tls_established(self, direction: str, version: str) -> None: ...

    def command_rejected(self, verb: str, reply: Reply) -> None: ...

    def message_accepted(
        self, info: SessionInfo, envelope: Envelope, queue_id: str, size: int
    ) -> None: ...


class SessionOutput(Protocol):
    """What the session needs from its connection."""

    def write(self, data: bytes) -> None: ...

    def lose_connection(self) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def start_tls(self) -> None: ...


class MessageIntake(Protocol):
    """One message's text on its way to the store (see ``mailrelay.intake``)."""

    header: bytes  # written before the text (our Received header)
    rejection: Reply | None  # set once the message must be refused (a mail loop)

    def feed(self, data: bytes) -> bytes:
        """Take the next piece of text; return the octets to store before it."""
        ...


class Intake(Protocol):
    """Starts the intake of each message (``mailrelay.intake.Intake``)."""

    def start(self, info: SessionInfo, envelope: Envelope, queue_id: str) -> MessageIntake: ...


class AuthThrottle(Protocol):
    """AUTH failures per client address across sessions (``policy.limits.RateCounter``)."""

    def exceeded(self, key: str) -> bool: ...

    def hit(self, key: str) -> None: ...


def _ehlo_tails(settings: SessionSettings) -> dict[tuple[bool, bool], bytes]:
    """The EHLO reply after its first line, as sent, by (STARTTLS offered, AUTH offered)."""
    tails = {}
    for starttls in (False, True):
        for auth in (False, True):
            ext = extensions(settings, starttls, auth)
            lines = [f"250-{e}\r\n" for e in ext[:-1]] + [f"250 {ext[-1]}\r\n"]
            tails[starttls, auth] = "".join(lines).encode()
    return tails


@attrs.frozen
class SessionSettings:
    """The limits and extensions of one listener, and its intake stage."""

    hostname: str
    intake: Intake = attrs.field(kw_only=True)
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
    greet_delay: float = 0.0  # wait this long before the greeting; talking before it is rejected
    limit_trusted: bool = False  # greet_delay for trusted clients too (Postfix exempts mynetworks)
    # Derived once here (every session of a listener sends the same), never written later.
    greeting: bytes = attrs.field(init=False, eq=False, hash=False, repr=False)
    ehlo_tails: dict[tuple[bool, bool], bytes] = attrs.field(
        init=False, eq=False, hash=False, repr=False
    )

    @greeting.default
    def _build_greeting(self) -> bytes:
        return Reply(220, None, f"{self.hostname} ESMTP mailrelay").encode()

    @ehlo_tails.default
    def _build_ehlo_tails(self) -> dict[tuple[bool, bool], bytes]:
        return _ehlo_tails(self)


def extensions(settings: SessionSettings, starttls: bool, auth: bool) -> list[str]:
    """The EHLO keywords offered, given whether STARTTLS and AUTH are on offer right now."""
    s = settings
    ext = ["PIPELINING", f"SIZE {s.max_message_size}", "8BITMIME", "ENHANCEDSTATUSCODES"]
    if s.smtputf8:
        ext.append("SMTPUTF8")
    if s.dsn:
        ext.append("DSN")
    if s.chunking:
        ext += ["CHUNKING", "BINARYMIME"] if s.binarymime else ["CHUNKING"]
    if starttls:
        ext.append("STARTTLS")
    if auth:
        ext.append("AUTH " + " ".join(s.auth_mechanisms))
    return ext
