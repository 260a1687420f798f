"""The ``Received:`` trace header (RFC 5321 4.4), with RFC 3848 protocol names.

Built from what the session knows; the date comes from the caller's (injected) clock. Everything the
client chose (its HELO name, its AUTH identity) is reduced to safe printable ASCII so it can neither
break the header nor inject a new one.

Nor can the message text extend it: a header field goes on over every following line that begins
with a space or a tab (RFC 5322 2.2.3), so a message beginning with one would write its first line
(``by trusted-gateway.example ...``) into our header. Such a line cannot begin a header field, so
that text has no header section: it is all body (RFC 5322 2.1), and an empty line between our
header and it says so (``separator``), as Postfix's smtpd does.
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime
from email.utils import format_datetime

from mailrelay.envelope import Envelope, SessionInfo, protocol_name

_UNSAFE = re.compile(r"[^\x21-\x7e]|[()\\]")
# UTF-8 headers (RFC 6532) allow the rest, but not the characters that read as a line break or a
# space somewhere (U+0085 is in the C1 range, U+2028/U+2029 are Unicode's line and paragraph breaks)
_UNSAFE_UTF8 = re.compile(
    r"[\x00-\x20\x7f-\xa0()\\\u1680\u2000-\u200b\u2028-\u202f\u205f\u3000\ufeff]"
)


@functools.lru_cache(maxsize=1024)  # the same HELO names and recipients come again and again
def _safe(text: str, limit: int = 200, utf8: bool = False) -> str:
    return (_UNSAFE_UTF8 if utf8 else _UNSAFE).sub("?", text)[:limit] or "unknown"


def separator(text: bytes) -> bytes:
    """What goes between our header and the message ``text`` (or its first octets): an empty line
    when ``text`` would otherwise go on with our header, else nothing."""
    return b"\r\n" if text[:1] in (b" ", b"\t") else b""


def address_literal(ip: str) -> str:
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


@functools.lru_cache(maxsize=4)
def _date(second: int) -> str:
    """RFC 5322 date; most messages arrive within the same second as another."""
    return format_datetime(datetime.fromtimestamp(second, UTC))


def received_header(info: SessionInfo, envelope: Envelope, queue_id: str, when: float) -> bytes:
    """The header line (folded, CRLF-terminated) to put on top of the message."""
    client = address_literal(info.client_address)
    if info.client_name:
        client = f"{_safe(info.client_name)} {client}"
    lines = [f"Received: from {_safe(info.helo or 'unknown')} ({client})"]
    if info.tls is not None:
        lines.append(f"(using {_safe(info.tls.version)} with cipher {_safe(info.tls.cipher)})")
    if info.auth:
        lines.append(f"(Authenticated sender: {_safe(info.auth)})")
    lines.append(f"by {info.hostname} (mailrelay) with {envelope.protocol} id {queue_id}")
    date = _date(int(when))
    if len(envelope.recipients) == 1:
        rcpt = envelope.recipients[0].address
        lines.append(f"for <{_safe(rcpt, 300, envelope.smtputf8)}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(date)
    return ("\r\n\t".join(lines) + "\r\n").encode("utf-8")


__all__ = ["address_literal", "protocol_name", "received_header", "separator"]
