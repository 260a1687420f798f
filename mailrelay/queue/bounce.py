"""Delivery status notifications (RFC 3464) for the sender: failed, delayed, relayed, delivered.

A report is a ``multipart/report; report-type=delivery-status`` with a human part, a
``message/delivery-status`` part (one block per recipient) and the original message — whole when
RET=FULL (the default) and it is small, otherwise only its headers (``text/rfc822-headers``), so a
bounce of a huge message stays small. The original of an SMTPUTF8 message comes back as
``message/global`` (or ``message/global-headers``), and a status part with UTF-8 in it is a
``message/global-delivery-status`` (RFC 6533). The report is sent with SMTPUTF8 only when its
recipient's address needs it; else these parts go base64-encoded, so a hop without it takes it.
The report is produced as chunks of bytes so the caller can stream it into the queue like any
other message.
"""

from __future__ import annotations

import base64
import enum
import re
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import IO

from mailrelay.envelope import Envelope, QueuedMessage, Recipient, RecipientStatus

#: Above this size only the original's headers are returned (Postfix's bounce_size_limit).
RETURN_SIZE_LIMIT = 50_000


class Action(enum.StrEnum):
    """RFC 3464 2.3.3 actions we report."""

    FAILED = "failed"
    DELAYED = "delayed"
    RELAYED = "relayed"  # to a next hop that does not take DSN requests
    DELIVERED = "delivered"  # final delivery (LMTP)


def wants(recipient: Recipient, action: Action) -> bool:
    """Whether the recipient's NOTIFY (RFC 3461 4.1) asks for a report of this ``action``.

    Without NOTIFY, failures and delays are reported and successes are not.
    """
    notify = {n.upper() for n in recipient.notify}
    if "NEVER" in notify:
        return False
    if action in (Action.RELAYED, Action.DELIVERED):
        return "SUCCESS" in notify
    if not notify:
        return True
    return ("FAILURE" if action is Action.FAILED else "DELAY") in notify


def capability_failure(status: RecipientStatus) -> bool:
    """Whether the recipient failed for what the next hop cannot take (RFC 3463 X.6.x, media:
    SMTPUTF8, BINARYMIME, 8-bit; X.3.4, too big), not for who the recipient is. Any client can
    cause that at will, so a report of it to a forged sender is backscatter."""
    reply = status.last_reply
    if reply is None or not reply.enhanced:
        return False
    detail = reply.enhanced.split(".")[1:]
    return detail[:1] == ["6"] or detail == ["3", "4"]


def status_code(status: RecipientStatus, action: Action) -> str:
    """The RFC 3463 code for the report: a pending reply that turned final is an expiry (5.4.7)."""
    reply = status.last_reply
    if action in (Action.RELAYED, Action.DELIVERED):
        return reply.enhanced if reply and reply.enhanced and reply.is_success else "2.0.0"
    if action is Action.DELAYED:
        return reply.enhanced if reply and reply.enhanced and reply.is_temporary else "4.0.0"
    if reply is None or not reply.is_permanent:
        return "5.4.7"
    return reply.enhanced or "5.0.0"


def _date(epoch: float) -> str:
    return format_datetime(datetime.fromtimestamp(epoch, UTC))


def _address_field(address: str) -> str:
    return f"{'utf-8' if not address.isascii() else 'rfc822'}; {address}"


#: Control characters (C0 with CR, LF and NUL, DEL, C1): none may reach a header field of ours.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _clean(text: str, limit: int = 900) -> str:
    """One header-safe line, short enough for SMTP's 998-octet limit with its field name: what
    came from elsewhere (a next hop's reply, ENVID, ORCPT) can neither end the field nor add one."""
    line = " ".join(_CONTROLS.sub(" ", text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


_SUBJECTS = {
    Action.FAILED: "Undelivered Mail Returned to Sender",
    Action.DELAYED: "Delayed Mail (still being retried)",
    Action.RELAYED: "Successful Mail Delivery Report",
    Action.DELIVERED: "Successful Mail Delivery Report",
}

_INTRO = {
    Action.FAILED: "I'm sorry to have to inform you that your message could not\n"
    "be delivered to one or more recipients. The reasons are below.",
    Action.DELAYED: "This is a warning only: your message could not yet be delivered to\n"
    "one or more recipients. Delivery will be retried until {until};\n"
    "you do not need to send it again.",
    Action.RELAYED: "Your message was successfully relayed to the recipients below.\n"
    "(The next system may or may not send a further report on final delivery.)",
    Action.DELIVERED: "Your message was successfully delivered to the recipients below.\n"
    "You will receive no further notification about it.",
}


def _human(
    message: QueuedMessage,
    statuses: Sequence[RecipientStatus],
    action: Action,
    hostname: str,
    until: float | None,
) -> str:
    lines = [f"This is the mail system at host {hostname}.", ""]
    lines.append(_INTRO[action].format(until=_date(until) if until else "it expires"))
    lines.append("")
    for s in statuses:
        reply = s.last_reply
        why = (
            f": host {s.remote} said: {_clean(str(reply))}"
            if s.remote and reply
            else (f": {_clean(str(reply))}" if reply else "")
        )
        if action is Action.FAILED and reply is not None and not reply.is_permanent:
            why = f": delivery time expired; last error{why}"
        lines.append(f"<{s.recipient.address}>{why}")
    lines += ["", f"Queue ID: {message.queue_id}", ""]
    return "\r\n".join(line.replace("\n", "\r\n") for line in lines)


def _status_part(
    message: QueuedMessage,
    statuses: Sequence[RecipientStatus],
    action: Action,
    hostname: str,
    until: float | None,
    now: float,
) -> str:
    env = message.envelope
    head = [f"Reporting-MTA: dns; {hostname}", f"X-Mailrelay-Queue-ID: {message.queue_id}"]
    if env.envid:
        head.append(f"Original-Envelope-Id: {_clean(env.envid)}")
    if env.received_at:
        head.append(f"Arrival-Date: {_date(env.received_at)}")
    blocks = ["\r\n".join(head)]
    for s in statuses:
        block = [f"Final-Recipient: {_address_field(s.recipient.address)}"]
        if s.recipient.orcpt:
            kind, _, addr = s.recipient.orcpt.partition(";")
            block.append(f"Original-Recipient: {_clean(kind)}; {_clean(addr)}")
        block += [f"Action: {action.value}", f"Status: {status_code(s, action)}"]
        if s.remote:
            host = s.remote.split("[", 1)[0]
            block.append(f"Remote-MTA: dns; {_clean(host)}")
        if s.last_reply is not None and s.remote:
            block.append(f"Diagnostic-Code: smtp; {_clean(str(s.last_reply))}")
        elif s.last_reply is not None:
            block.append(f"Diagnostic-Code: X-mailrelay; {_clean(str(s.last_reply))}")
        if s.attempts:
            block.append(f"Last-Attempt-Date: {_date(now)}")
        if action is Action.DELAYED and until:
            block.append(f"Will-Retry-Until: {_date(until)}")
        blocks.append("\r\n".join(block))
    return "\r\n\r\n".join(blocks) + "\r\n"


def _original(
    body: IO[bytes] | None,
    ret: str | None,
    limit: int,
    binary: bool = False,
    international: bool = False,
) -> tuple[str, bytes]:
    """The content type and bytes of the returned original: whole if RET allows, it is small and
    not BINARYMIME (binary content cannot travel inside a report); else its headers. An
    ``international`` (SMTPUTF8) original may have UTF-8 headers: message/global(-headers),
    RFC 6533 5, for message/rfc822 and text/rfc822-headers are ASCII in their headers."""
    if body is None:
        return "", b""
    data = body.read(limit + 1)
    if (ret or "FULL").upper() == "FULL" and len(data) <= limit and not binary:
        return ("message/global" if international else "message/rfc822"), data
    end = data.find(b"\r\n\r\n")
    headers = data[: end + 2] if end >= 0 else data[: data.rfind(b"\r\n") + 2]
    return ("message/global-headers" if international else "text/rfc822-headers"), headers


#: The parts whose 8-bit text may be sent base64-encoded (RFC 6532 3.7, RFC 6533 5); never
#: message/rfc822 (RFC 2046 5.2.1).
_ENCODABLE = frozenset(
    {"message/global", "message/global-headers", "message/global-delivery-status"}
)


def _encoding(kind: str, data: bytes, smtputf8: bool) -> tuple[str, bytes]:
    """The Content-Transfer-Encoding header (or "") and the bytes of one part. A report not sent
    with SMTPUTF8 may meet a hop without it: its UTF-8 parts then go base64 (7-bit), as RFC 6533
    6 asks of a report to such a return path, rather than be refused there."""
    if data.isascii():
        return "", data
    if smtputf8 or kind not in _ENCODABLE:
        return "Content-Transfer-Encoding: 8bit\r\n", data
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    return "Content-Transfer-Encoding: base64\r\n", encoded


def _boundary(base: str, text: bytes) -> str:
    """A boundary found nowhere in the parts (RFC 2046 5.1.1). The queue id is no secret (the client
    reads it in "queued as"), so a returned original could otherwise close the report early."""
    boundary, n = base, 0
    while boundary.encode() in text:
        n += 1
        boundary = f"{base}.{n}"
    return boundary


def report_envelope(message: QueuedMessage, to: str, hostname: str, now: float) -> Envelope:
    """The envelope of a report: from ``<>`` (so it never causes another), NOTIFY=NEVER."""
    env = message.envelope
    return Envelope(
        sender="",
        recipients=(Recipient(to, ("NEVER",)),),
        helo=hostname,
        protocol="local",
        # 8-bit text: a returned 8-bit original, UTF-8 in the notification of an SMTPUTF8 one
        body="8BITMIME" if env.body == "8BITMIME" or env.smtputf8 else None,
        # only for a recipient address that needs it (the report's own header fields are ASCII
        # else): a report marked SMTPUTF8 without need is refused by a hop without it
        smtputf8=not to.isascii(),
        received_at=now,
        trusted=True,  # ours
    )


def build_report(
    message: QueuedMessage,
    statuses: Sequence[RecipientStatus],
    action: Action,
    *,
    to: str,
    hostname: str,
    now: float,
    body: IO[bytes] | None = None,
    until: float | None = None,
    limit: int = RETURN_SIZE_LIMIT,
) -> Iterator[bytes]:
    """The report as chunks of bytes with CRLF line endings, ready for ``IMessageWriter.write``.

    ``body`` is the original message (read up to ``limit`` + 1 bytes); ``until`` is when retries
    stop (for delay warnings).
    """
    env = message.envelope
    smtputf8 = not to.isascii()  # as report_envelope marks it
    human = _human(message, statuses, action, hostname, until)
    status = _status_part(message, statuses, action, hostname, until, now).encode()
    status_kind = (
        "message/delivery-status" if status.isascii() else "message/global-delivery-status"
    )
    status_cte, status = _encoding(status_kind, status, smtputf8)
    kind, original = _original(body, env.ret, limit, env.body == "BINARYMIME", env.smtputf8)
    original_cte, original = _encoding(kind, original, smtputf8)
    boundary = _boundary(
        f"{message.queue_id}.{int(now)}/{hostname}", human.encode() + status + original
    )
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{to}>",
        f"Subject: {_SUBJECTS[action]}",
        f"Date: {_date(now)}",
        f"Message-ID: <{message.queue_id}.{action.value}.{int(now)}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit",
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    yield ("\r\n".join(headers) + "\r\n").encode()
    yield (
        f"--{boundary}\r\n"
        "Content-Description: Notification\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n" + human + f"\r\n--{boundary}\r\n"
        "Content-Description: Delivery report\r\n"
        f"Content-Type: {status_kind}\r\n" + status_cte + "\r\n"
    ).encode() + status
    if kind:
        whole = kind in ("message/rfc822", "message/global")
        description = "Undelivered Message" if whole else "Undelivered Message Headers"
        yield (
            f"\r\n--{boundary}\r\nContent-Description: {description}\r\nContent-Type: {kind}\r\n"
            + original_cte
            + "\r\n"
        ).encode()
        yield original
        if original and not original.endswith(b"\r\n"):
            yield b"\r\n"
    yield f"\r\n--{boundary}--\r\n".encode()
