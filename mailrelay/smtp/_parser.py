"""Sans-I/O SMTP input: bytes in, events out (commands, message text, end of data).

No sockets, no clock, no Twisted: the session pulls one event at a time with ``next_event()`` and
switches the parser's mode itself (``begin_data``, ``begin_bdat``, ``discard_buffer``), because only
the session knows whether a DATA will be answered 354 — so nothing pipelined is ever read in the
wrong mode.

Line rules (RFC 5321 2.3.8, 4.5.3.1):

- Only CRLF ends a line. In command mode a bare CR or LF inside a line makes it a bad line
  (``LineError.BARE_NEWLINE``, answered 500 5.5.2); it never splits it into two commands.
- A command line longer than ``command_line_limit`` octets (CRLF included) is reported once as
  ``LineError.TOO_LONG``; the rest of that line is discarded as it arrives and never read as a
  command. Memory stays bounded by the limit.
- DATA text: **a bare LF or bare CR anywhere in the message rejects the whole message** (the session
  answers 550 5.6.0 after the final dot and drops it). End of data is *only* CRLF "." CRLF with the
  first CRLF being a real line end, so ``\\n.\\n``, ``\\r.\\r``, ``\\r\\n.\\r``, ``\\n.\\r\\n`` and
  friends can neither end the data early nor smuggle a second message: they are part of the one
  (rejected) message. We reject rather than normalise because a normalised body would be read by
  a downstream MTA differently from how we read it.
- A text line longer than ``text_line_limit`` (CRLF included) or more text than ``max_size``
  dooms the message the same way: the rest is read and thrown away (never buffered beyond one line),
  and ``DataEnd.error`` tells the session which reply to give.

DATA is scanned in chunks, everything received so far at once, never with a Python call per line:
one ``split(CRLF)`` finds the end of data (``list.index(b".")``) and feeds the line-length and
bare CR/LF checks (``max(map(len, ...))``, a join and two memchr searches); dot-unstuffing is one
``replace(b"\\r\\n.", b"\\r\\n")``. About 4 ms of CPU per MiB here.
"""

from __future__ import annotations

import enum

import attrs

from mailrelay import _ascii

# The path grammar moved to ``mailrelay.paths``; its names stay importable from here.
from mailrelay.paths import (
    Path,
    PathError,
    decode_xtext,
    is_addr_type,
    parse_mailbox,
    parse_params,
    parse_path,
    split_path,
)

CRLF = b"\r\n"
# Octet values for ``in`` tests: ``13 in data`` is one memchr, while ``b"\r" in data`` first tries
# the argument as an integer and raises (and swallows) a TypeError every time: ~10x dearer.
_CR, _LF = 13, 10


class LineError(enum.Enum):
    TOO_LONG = "too long"
    BARE_NEWLINE = "bare CR or LF"
    BAD_ENCODING = "not UTF-8"


class DataError(enum.Enum):
    TOO_BIG = "message too big"
    LINE_TOO_LONG = "line too long"
    BARE_NEWLINE = "bare CR or LF"


@attrs.define
class Command:
    """One command line: ``verb`` upper-cased, ``argument`` what follows the first space.

    ``line`` is the whole line as sent (an AUTH response is not a command).
    """

    verb: str
    argument: str
    line: str = attrs.field(default="", eq=False, repr=False)


@attrs.define
class BadLine:
    """A command line that cannot be a command (too long, bare CR/LF, not UTF-8)."""

    error: LineError


@attrs.define
class DataChunk:
    """Message text, dot-unstuffed, CRLF line endings (BDAT: the octets as sent)."""

    data: bytes


@attrs.define
class DataEnd:
    """The final dot (or the last BDAT chunk) arrived. ``size`` counts octets of message text."""

    size: int
    error: DataError | None = None
    last: bool = True  # False for a non-LAST BDAT chunk


Event = Command | BadLine | DataChunk | DataEnd


def _line_problem(text: bytes, limit: int) -> DataError | None:
    """Bare CR/LF or a line over ``limit`` (CRLF included) in complete lines of text.

    One split, one join and two memchr searches: measured about 40% cheaper per 64 KiB than
    counting CRLF, CR and LF separately.
    """
    lines = text.split(CRLF)
    rest = b"".join(lines) if len(lines) > 1 else text
    if _CR in rest or _LF in rest:
        return DataError.BARE_NEWLINE
    if len(text) > limit and max(map(len, lines)) > limit - 2:
        return DataError.LINE_TOO_LONG
    return None


class _Mode(enum.Enum):
    COMMAND = enum.auto()
    DATA = enum.auto()
    BDAT = enum.auto()


# plain module names: ``_Mode.X`` costs an enum metaclass ``__getattr__`` call on Python 3.11
_COMMAND, _DATA, _BDAT = _Mode.COMMAND, _Mode.DATA, _Mode.BDAT


class Parser:
    """Incremental SMTP input parser; ``feed`` bytes, then ``next_event()`` until ``None``."""

    def __init__(self, command_line_limit: int = 512, text_line_limit: int = 1000) -> None:
        self.command_line_limit = command_line_limit
        self.text_line_limit = text_line_limit
        self._buf = b""
        self._mode = _COMMAND
        self._skipping_line = False  # inside an overlong line whose rest is being discarded
        self._pending: Event | None = None  # DataEnd owed after the last DataChunk
        # DATA / BDAT state
        self._max_size = 0
        self._size = 0
        self._error: DataError | None = None
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_strict = True

    # -- what the session asks ------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Octets received and not yet turned into events (for flow control)."""
        return len(self._buf)

    @property
    def in_data(self) -> bool:
        return self._mode is not _COMMAND

    def feed(self, data: bytes) -> None:
        if self._buf:
            self._buf += data
        else:
            self._buf = bytes(data)

    def discard_buffer(self) -> int:
        """Drop all received but not parsed (after STARTTLS: RFC 3207 5). Returns its size."""
        n = len(self._buf)
        self._buf = b""
        self._skipping_line = False
        return n

    def begin_data(self, max_size: int) -> None:
        """Read dot-terminated message text (after 354)."""
        self._mode = _DATA
        self._max_size = max_size
        self._size = 0
        self._error = None
        self._skipping_line = False

    def begin_bdat(self, size: int, last: bool, max_size: int, total: int, binary: bool) -> None:
        """Read exactly ``size`` octets of a BDAT chunk (RFC 3030); ``total`` is what came before.

        Unless ``binary`` (BODY=BINARYMIME), bare CR/LF and overlong lines doom the message as in
        DATA; a CRLF split across two chunks is seen whole.
        """
        self._mode = _BDAT
        self._bdat_left = size
        self._bdat_last = last
        self._bdat_strict = not binary
        self._max_size = max_size
        if total == 0:
            self._size = 0
            self._error = None
            self._tail = b""

    def doom(self, error: DataError) -> None:
        """Stop passing message text on (the session knows better, e.g. a BDAT after an error)."""
        if self._error is None:
            self._error = error

    def next_event(self) -> Event | None:
        if self._pending is not None:
            event, self._pending = self._pending, None
            return event
        if self._mode is _COMMAND:
            # the usual complete, well-formed command line, without a further call
            buf = self._buf
            i = buf.find(CRLF)
            if i < 0 or self._skipping_line or i + 2 > self.command_line_limit:
                return self._next_command() if buf else None
            line = buf[:i]
            if _CR in line or _LF in line or not line.isascii():
                return self._next_command()
            self._buf = buf[i + 2 :]
            text = line.decode("ascii")
            verb, _, arg = text.partition(" ")
            return Command(verb.upper(), arg, text)
        if self._mode is _DATA:
            return self._next_data()
        return self._next_bdat()

    # -- command mode ---------------------------------------------------------------------------

    def _next_command(self) -> Event | None:
        buf = self._buf
        i = buf.find(CRLF)
        if self._skipping_line:
            if i < 0:
                # keep a lone trailing CR: it may be the start of the CRLF we are waiting for
                self._buf = b"\r" if buf.endswith(b"\r") else b""
                return None
            self._buf = buf[i + 2 :]
            self._skipping_line = False
            return BadLine(LineError.TOO_LONG)
        if i < 0:
            if len(buf) >= self.command_line_limit:
                self._skipping_line = True
                self._buf = b"\r" if buf.endswith(b"\r") else b""
                return self._next_command()
            return None
        line = buf[:i]
        self._buf = buf[i + 2 :]
        if i + 2 > self.command_line_limit:
            return BadLine(LineError.TOO_LONG)
        if _CR in line or _LF in line:
            return BadLine(LineError.BARE_NEWLINE)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return BadLine(LineError.BAD_ENCODING)
        verb, _, arg = text.partition(" ")
        return Command(_ascii.upper(verb), arg, text)  # "quıt".upper() would be QUIT

    # -- DATA mode ------------------------------------------------------------------------------

    def _next_data(self) -> Event | None:
        buf = self._buf
        if not buf:
            return None
        # One split gives the end of data (a complete line that is exactly ".") and the lines
        # the checks need; a bytes.find for CRLF "." CRLF costs more than the split on text
        # whose every line ends in CRLF.
        lines = buf.split(CRLF)
        rest = lines.pop()  # the unfinished last line (b"" when buf ends with CRLF)
        try:
            # while skipping, lines[0] is the tail of an overlong line, not a line of its own
            end = lines.index(b".", 1 if self._skipping_line else 0)
        except ValueError:
            end = -1
        ended = end >= 0
        if ended:
            cut = sum(map(len, lines[:end])) + 2 * end  # where the line "." starts
            rest = buf[cut + 3 :]
            del lines[end:]
        else:
            cut = len(buf) - len(rest)
        self._buf = rest
        chunk = self._text(lines, buf, cut) if lines else b""
        if not ended and len(rest) >= self.text_line_limit:
            # an unfinished line already too long: drop it as it comes, remember the error
            self.doom(DataError.LINE_TOO_LONG)
            self._skipping_line = True
            self._buf = rest[-1:] if rest.endswith(b"\r") else b""  # a CR may pair with the next LF
        if ended:
            self._mode = _COMMAND
            self._skipping_line = False
            end_event = DataEnd(self._size, self._error)
            if chunk:
                self._pending = end_event
                return DataChunk(chunk)
            return end_event
        return DataChunk(chunk) if chunk else None

    def _text(self, lines: list[bytes], buf: bytes, cut: int) -> bytes:
        """Complete lines of stuffed text, CRLFs split off (the first is the tail of an overlong
        line when skipping), which are ``buf[:cut]`` → the unstuffed text with its CRLFs."""
        start = 0
        if self._skipping_line:
            start = len(lines[0]) + 2
            del lines[0]
            self._skipping_line = False
            if not lines:
                return b""
        if self._error is not None:
            return b""
        rest = b"".join(lines)
        if _CR in rest or _LF in rest:
            self.doom(DataError.BARE_NEWLINE)
            return b""
        if max(map(len, lines)) > self.text_line_limit - 2:
            self.doom(DataError.LINE_TOO_LONG)
            return b""
        body = buf[start:cut]  # the lines with their CRLFs: one copy, not a join of each line again
        if body[:1] == b".":
            body = body[1:]
        body = body.replace(b"\r\n.", CRLF)
        self._size += len(body)
        if self._size > self._max_size:
            self.doom(DataError.TOO_BIG)
            return b""
        return body

    # -- BDAT mode ------------------------------------------------------------------------------

    def _next_bdat(self) -> Event | None:
        if self._bdat_left == 0:
            return self._bdat_end()
        buf = self._buf
        if not buf:
            return None
        take = buf[: self._bdat_left]
        self._buf = buf[len(take) :]
        self._bdat_left -= len(take)
        self._size += len(take)
        out = b""
        if self._error is None:
            if self._size > self._max_size:
                self.doom(DataError.TOO_BIG)
            elif self._bdat_strict:
                self._check_bdat(take)
            if self._error is None:
                out = take
        if out:
            return DataChunk(out)
        return self._bdat_end() if self._bdat_left == 0 else None

    def _bdat_end(self) -> Event:
        self._mode = _COMMAND
        if self._bdat_last and self._bdat_strict and self._error is None and self._tail:
            # text that does not end with CRLF keeps a partial last line; a lone CR there is bare
            if self._tail.endswith(b"\r"):
                self.doom(DataError.BARE_NEWLINE)
        return DataEnd(self._size, self._error, last=self._bdat_last)

    def _check_bdat(self, data: bytes) -> None:
        """Line rules over BDAT text, with the unfinished last line (``_tail``) carried over."""
        joined = self._tail + data
        last = joined.rfind(CRLF)
        complete, tail = (joined[: last + 2], joined[last + 2 :]) if last >= 0 else (b"", joined)
        limit = self.text_line_limit
        problem = _line_problem(complete, limit) if complete else None
        if problem is None and (_LF in tail or _CR in tail[:-1]):
            problem = DataError.BARE_NEWLINE
        elif problem is None and len(tail) >= limit:
            problem = DataError.LINE_TOO_LONG
        if problem is not None:
            self.doom(problem)
        self._tail = tail

    _tail = b""


__all__ = [
    "CRLF",
    "BadLine",
    "Command",
    "DataChunk",
    "DataEnd",
    "DataError",
    "Event",
    "LineError",
    "Parser",
    "Path",
    "PathError",
    "decode_xtext",
    "is_addr_type",
    "parse_mailbox",
    "parse_params",
    "parse_path",
    "split_path",
]
