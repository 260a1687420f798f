"""Sans-I/O pieces of the ESMTP client: reply parsing, EHLO keywords, dot-stuffing.

Kept apart from the protocol so each is table- and property-tested without a transport.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence

from mailrelay import _ascii
from mailrelay.envelope import Envelope, Recipient, Reply

MAX_REPLY_LINE = 4096  # RFC 5321 says 512; real servers send longer text lines
MAX_REPLY_LINES = 1000

_ENHANCED = re.compile(r"^([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: |$)")  # ASCII digits, not \d
_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")


class ReplyError(Exception):
    """The peer sent something that is not an SMTP reply: the session cannot go on."""


_SINGLE_LINE_CACHE: dict[bytes, Reply] = {}  # Reply is frozen: identical lines share one value


class ReplyParser:
    """Bytes in, complete ``Reply`` values out; multiline replies joined with ``\\n``.

    The enhanced status code (RFC 3463) is taken from the first line when its class matches the
    reply code, and removed from every line that repeats it.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._lines: list[str] = []
        self._code: int | None = None

    def reset(self) -> None:
        """Forget what is buffered (after STARTTLS, plaintext read before the handshake is void)."""
        self._buffer = b""
        self._lines = []
        self._code = None

    def feed(self, data: bytes) -> Iterator[Reply]:
        """The complete replies in ``data`` (plus what was buffered), one at a time.

        Lazy on purpose: a caller that stops early (STARTTLS) never parses what followed, so
        garbage after the 220 cannot fail the session. Raises ``ReplyError`` at a bad line.
        """
        buf = self._buffer + data if self._buffer else data
        lines = buf.split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > MAX_REPLY_LINE:
            raise ReplyError(f"reply line longer than {MAX_REPLY_LINE} bytes")
        return self._replies(lines)

    def _replies(self, lines: list[bytes]) -> Iterator[Reply]:
        cache = _SINGLE_LINE_CACHE
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not self._lines:  # fast path: a one-line reply seen before ("250 2.1.5 Ok")
                cached = cache.get(line)
                if cached is not None:
                    yield cached
                    continue
            reply = self._line(line)
            if reply is not None:
                if "\n" not in reply.text and len(line) < 128:
                    if len(cache) >= 512:
                        cache.clear()
                    cache[line] = reply
                yield reply

    def _line(self, raw: bytes) -> Reply | None:
        if len(raw) > MAX_REPLY_LINE:
            raise ReplyError(f"reply line longer than {MAX_REPLY_LINE} bytes")
        if len(raw) < 3 or not raw[:3].isdigit() or (len(raw) > 3 and raw[3:4] not in b" -"):
            raise ReplyError(f"malformed reply line {raw[:80]!r}")
        code = int(raw[:3])
        if not 200 <= code <= 599:
            raise ReplyError(f"reply code {code} out of range")
        if self._code is not None and code != self._code:
            raise ReplyError(
                f"reply code changed from {self._code} to {code} within a multiline reply"
            )
        self._code = code
        self._lines.append(raw[4:].decode("utf-8", "replace"))
        if len(self._lines) > MAX_REPLY_LINES:
            raise ReplyError("too many lines in one reply")
        if raw[3:4] == b"-":
            return None
        lines, self._lines, self._code = self._lines, [], None
        return _make_reply(code, lines)


def _make_reply(code: int, lines: list[str]) -> Reply:
    m = _ENHANCED.match(lines[0])
    enhanced = None
    if m and m.group(1) == str(code)[0]:
        enhanced = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
        prefix = enhanced + " "
        lines = [
            ln[len(prefix) :] if ln.startswith(prefix) else ("" if ln == enhanced else ln)
            for ln in lines
        ]
    return Reply(code, enhanced, "\n".join(lines))


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """The extensions of an EHLO reply: upper-case keyword → its parameters (``""`` if none)."""
    ext: dict[str, str] = {}
    for line in reply.lines()[1:]:
        keyword, _, params = _ascii.strip(line).partition(" ")
        keyword = _ascii.upper(keyword)  # "ſize".upper() would be SIZE
        if keyword.startswith("AUTH="):  # the pre-RFC 4954 spelling some servers still send
            ext.setdefault("AUTH", _ascii.strip(f"{keyword[5:]} {params}"))
        elif keyword:
            ext[keyword] = _ascii.strip(params)
    return ext


class DotStuffer:
    """Message bytes in, DATA-ready bytes out, in chunks split anywhere.

    Every line ending becomes CRLF (a bare LF or bare CR too, so no end-of-data sequence can be
    smuggled), a line that starts with ``.`` gets a second one (RFC 5321 4.5.2), also when the line
    starts at a chunk boundary. ``finish()`` gives the end: a CRLF if the text did not end with one,
    then ``.`` CRLF. The common case (CRLF only) costs two ``count``s and one ``replace``.
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._pending_cr = False

    def feed(self, chunk: bytes) -> bytes:
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._pending_cr = True
        if not chunk:
            return b""
        crlf = chunk.count(b"\r\n")
        if crlf != chunk.count(b"\n") or crlf != chunk.count(b"\r"):
            chunk = _LINE_ENDINGS.sub(b"\r\n", chunk)
        out = chunk.replace(b"\n.", b"\n..")
        if self._at_line_start and out[:1] == b".":
            out = b"." + out
        self._at_line_start = out.endswith(b"\n")
        return out

    def finish(self) -> bytes:
        end = b""
        if self._pending_cr:
            self._pending_cr = False
            end = b"\r\n"
            self._at_line_start = True
        if not self._at_line_start:
            end += b"\r\n"
        self._at_line_start = True
        return end + b".\r\n"


def normalise_crlf(chunk: bytes, pending_cr: bool) -> tuple[bytes, bool]:
    """CRLF line endings for BDAT (no dot-stuffing): the bytes to send and the new pending CR."""
    if pending_cr:
        chunk = b"\r" + chunk
    pending = chunk.endswith(b"\r")
    if pending:
        chunk = chunk[:-1]
    crlf = chunk.count(b"\r\n")
    if crlf != chunk.count(b"\n") or crlf != chunk.count(b"\r"):
        chunk = _LINE_ENDINGS.sub(b"\r\n", chunk)
    return chunk, pending


def xtext(value: str) -> str:
    """RFC 3461 xtext: ``+`` and ``=`` and anything outside ``!``..``~`` as ``+XX``."""
    return "".join(
        c if "!" <= c <= "~" and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
        for c in value
    )


def mail_params(
    envelope: Envelope, size: int | None, ext: Mapping[str, str], extra: Sequence[str] = ()
) -> str:
    """The MAIL FROM parameters the peer's extensions allow (others are dropped, never sent)."""
    params = []
    if size is not None and "SIZE" in ext:
        params.append(f"SIZE={size}")
    if envelope.body in ("8BITMIME", "BINARYMIME") and envelope.body in ext:
        params.append(f"BODY={envelope.body}")
    if envelope.smtputf8 and "SMTPUTF8" in ext:
        params.append("SMTPUTF8")
    if "DSN" in ext:
        if envelope.ret:
            params.append(f"RET={envelope.ret}")
        if envelope.envid:
            params.append(f"ENVID={xtext(envelope.envid)}")
    params.extend(extra)
    return "".join(" " + p for p in params)


def rcpt_params(rcpt: Recipient, ext: Mapping[str, str]) -> str:
    """DSN parameters of one RCPT TO, when the peer offers DSN."""
    params = []
    if "DSN" in ext:
        if rcpt.notify:
            params.append("NOTIFY=" + ",".join(rcpt.notify))
        if rcpt.orcpt:
            kind, sep, addr = rcpt.orcpt.partition(";")
            params.append(
                f"ORCPT={kind};{xtext(addr)}" if sep else f"ORCPT=rfc822;{xtext(rcpt.orcpt)}"
            )
    return "".join(" " + p for p in params)
