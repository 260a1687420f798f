"""Frozen value objects that travel between the rooms: wire, queue, routing, delivery.

They are plain data (attrs, frozen) so that any room can hold them without knowing the others,
and so the queue can serialise them (see ``to_dict``/``from_dict``). ``SessionInfo`` (what the
wire knows of a client, read by policy, the intake stage and observers) is the one mutable record
here: the session fills it in as the conversation goes, and a policy may set ``trusted``.
"""

from __future__ import annotations

import enum
import itertools
import os
from typing import Any

import attrs


@attrs.frozen
class Reply:
    """An SMTP reply: code, optional enhanced status code (RFC 3463) and text (maybe multiline)."""

    code: int
    enhanced: str | None = None
    text: str = ""

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def lines(self) -> list[str]:
        return self.text.split("\n") if self.text else [""]

    def encode(self) -> bytes:
        """The reply as it goes on the wire, every line prefixed with the enhanced code."""
        out = []
        lines = self.lines()
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            body = f"{self.enhanced} {line}" if self.enhanced else line
            out.append(f"{self.code}{sep}{body}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8")

    def __str__(self) -> str:
        text = " ".join(self.lines())
        return f"{self.code} {self.enhanced} {text}" if self.enhanced else f"{self.code} {text}"

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "enhanced": self.enhanced, "text": self.text}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Reply:
        return cls(int(d["code"]), d.get("enhanced"), d.get("text", ""))


@attrs.frozen
class Recipient:
    """One forward-path with its DSN parameters (RFC 3461)."""

    address: str
    notify: tuple[str, ...] = ()
    orcpt: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "notify": list(self.notify), "orcpt": self.orcpt}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipient:
        return cls(d["address"], tuple(d.get("notify") or ()), d.get("orcpt"))


@attrs.frozen
class Envelope:
    """What the client said around the message: reverse-path, forward-paths, parameters.

    ``sender`` is ``""`` for the null reverse-path ``<>``. ``received_at`` is epoch seconds
    from the injected clock of whoever accepted the message.
    """

    sender: str
    recipients: tuple[Recipient, ...]
    helo: str = ""
    client_address: str = ""
    client_name: str = ""
    protocol: str = "ESMTP"
    body: str | None = None  # None (7BIT), "8BITMIME" or "BINARYMIME"
    smtputf8: bool = False
    size: int | None = None
    ret: str | None = None  # DSN RET=FULL|HDRS
    envid: str | None = None
    auth: str | None = None  # authenticated identity, if any
    received_at: float = 0.0
    # The client authenticated or came from a trusted network: only such a sender hears of a
    # failure it could cause at will (a capability the next hop lacks). None: not recorded (a
    # message queued before format 2, or injected by an embedder): judged when it matters.
    trusted: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self, recurse=False)
        d["recipients"] = [r.to_dict() for r in self.recipients]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Envelope:
        d = dict(d)
        d["recipients"] = tuple(Recipient.from_dict(r) for r in d["recipients"])
        return cls(**d)


def protocol_name(esmtp: bool, tls: bool, auth: bool, smtputf8: bool = False) -> str:
    """``SMTP``, ``ESMTP``, ``ESMTPS``, ``ESMTPA``, ``ESMTPSA`` (RFC 3848) or the UTF8 forms
    (RFC 6531): ``Envelope.protocol`` and the ``with`` clause of the Received header."""
    if not esmtp:
        return "SMTP"
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if auth else "")


@attrs.frozen
class TLSInfo:
    """The TLS of a connection, as the Received header and the logs name it."""

    version: str
    cipher: str


# Session ids: unique in this process and across restarts, cheap (no uuid4 per connection).
_SESSION_PREFIX = os.urandom(3).hex() + "-"
_session_numbers = itertools.count(1)


def _next_session_id() -> str:
    return _SESSION_PREFIX + format(next(_session_numbers), "x")


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
    session_id: str = attrs.field(factory=_next_session_id)
    messages: int = 0  # accepted so far in this session


@attrs.frozen
class NextHop:
    """One host to try, in preference order (lower first).

    ``host`` is what to connect to (an IP address, or a name the deliverer resolves); ``name`` is
    the host name the hop is known by (the MX name), used to verify its TLS certificate and in logs.
    """

    host: str
    port: int = 25
    preference: int = 0
    name: str | None = None


class TLSPolicy(enum.StrEnum):
    NONE = "none"
    MAY = "may"
    ENCRYPT = "encrypt"
    VERIFY = "verify"


@attrs.frozen
class Route:
    """Where one recipient goes next: the answer of a router.

    ``recipient`` is a rewritten address (``None`` keeps the original). Recipients of one message
    whose routes share a ``destination`` are delivered together over one connection.
    ``maildir`` (a directory) replaces the hops: the message is written there as a local capture.
    """

    hops: tuple[NextHop, ...]
    recipient: str | None = None
    tls: TLSPolicy = TLSPolicy.MAY
    auth: tuple[str, str] | None = None
    source: str | None = None
    allow_plaintext_auth: bool = False
    lmtp: bool = False  # deliver over LMTP (RFC 2033), e.g. to a local MDA
    maildir: str | None = None

    @property
    def destination(self) -> tuple[Any, ...]:
        return (
            self.hops,
            self.tls,
            self.auth,
            self.source,
            self.allow_plaintext_auth,
            self.lmtp,
            self.maildir,
        )


class RecipientState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@attrs.frozen
class RecipientStatus:
    """The queue's record of one recipient of one message."""

    recipient: Recipient
    state: RecipientState = RecipientState.PENDING
    attempts: int = 0
    last_reply: Reply | None = None
    remote: str | None = None  # the host[ip]:port that gave last_reply
    # Once delivered, who tells a sender that asked NOTIFY=SUCCESS (RFC 3461 5.2.2): we, with
    # "relayed" (a next hop without DSN) or "delivered" (LMTP: final delivery); or "passed", the
    # next hop took the DSN request and reports itself.
    success: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipient": self.recipient.to_dict(),
            "state": self.state.value,
            "attempts": self.attempts,
            "last_reply": self.last_reply.to_dict() if self.last_reply else None,
            "remote": self.remote,
            "success": self.success,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecipientStatus:
        lr = d.get("last_reply")
        return cls(
            Recipient.from_dict(d["recipient"]),
            RecipientState(d.get("state", "pending")),
            int(d.get("attempts", 0)),
            Reply.from_dict(lr) if lr else None,
            d.get("remote"),
            d.get("success", ""),
        )


@attrs.frozen
class QueuedMessage:
    """A message as the queue holds it: envelope, per-recipient state and schedule.

    ``prefix``: header fields added once, at intake, after the text was stored (a DKIM
    signature): delivery sends them in front of the stored text; the store keeps them in the
    message's record, committed with it. Bounces and ``queue show`` quote the text as received.
    """

    queue_id: str
    envelope: Envelope
    statuses: tuple[RecipientStatus, ...]
    attempts: int = 0
    next_attempt: float = 0.0
    held: bool = False
    warned: bool = False
    prefix: bytes = b""

    @property
    def pending(self) -> tuple[RecipientStatus, ...]:
        return tuple(s for s in self.statuses if s.state is RecipientState.PENDING)
