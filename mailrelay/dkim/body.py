"""The body hash of a DKIM signature (``bh=``), computed as the body streams past.

``RelaxedBodyHash`` is fed the body in pieces cut anywhere and gives the SHA-256 of the body under
"relaxed" canonicalization (RFC 6376 3.4.4): trailing whitespace of each line dropped, runs of
whitespace made one space, empty lines at the end dropped. It matches dkimpy's canonicalization
octet for octet, its corners included: a bare LF ends a line as CRLF does, and a last line
without a line break keeps its trailing whitespace and gets a CRLF (the tests compare the two).

What it keeps between pieces is bounded whatever the input: at most two octets of the current
line (a whitespace and a CR whose meaning the next octet decides) and a count of the empty lines
that are only hashed if a non-empty line follows. Each piece is handled with ``bytes`` methods
(find, replace: a few passes at C speed, ~2-5 ms per MiB of ordinary text, where regular
expression substitutions matching every space took ~90 ms), so feeding it on the reactor thread
costs little more than copying the piece. Nothing is quadratic in a long whitespace run.
"""

from __future__ import annotations

import hashlib
import re

_BARE_LF = re.compile(rb"(?<!\r)\n")
#: Empty lines hashed at a time when a long run of them turns out not to end the body.
_BLANKS_AT_ONCE = 32 * 1024


class RelaxedBodyHash:
    """SHA-256 of a message body in relaxed canonicalization, fed in pieces (``update``)."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._carry = b""  # the undecided end of the current line: b"", b" ", b"\r" or b" \r"
        self._mid_line = False  # some of the current line's content is already hashed
        self._blank = 0  # empty lines not hashed yet: dropped if nothing but them follows
        self._done = False

    def update(self, data: bytes) -> None:
        """Take the next octets of the body."""
        assert not self._done, "update() after digest()"
        if self._carry:
            data = self._carry + data
        # What the next octet may still change: a CR (a line end if LF follows) and the
        # whitespace before it (dropped if that is a line end)
        end = len(data) - 1 if data.endswith(b"\r") else len(data)
        cut = len(data[:end].rstrip(b" \t"))
        self._carry = _compress(data[cut:]) if cut < len(data) else b""
        if cut == 0:
            return
        decided = data[:cut] if cut < len(data) else data
        newline = decided.rfind(b"\n")
        if newline >= 0:
            self._lines(decided[: newline + 1])
            decided = decided[newline + 1 :]
        if decided:  # the start of a line; it ends in an octet other than whitespace or CR
            self._hash_blanks()
            self._hash.update(_compress(decided))
            self._mid_line = True

    def digest(self) -> bytes:
        """The hash of the whole body; the end of the stream (no ``update`` after it)."""
        if not self._done:
            self._done = True
            if self._carry:  # a last line without a line break: kept as it is, then CRLF
                self._hash_blanks()
                self._hash.update(self._carry + b"\r\n")
            elif self._mid_line:
                self._hash.update(b"\r\n")
        return self._hash.digest()

    def _lines(self, text: bytes) -> None:
        """Hash whole lines (``text`` ends with LF), holding back the empty lines at its end."""
        canonical = _compress(text)
        if canonical.count(b"\n") != canonical.count(b"\r\n"):  # a bare LF ends a line too
            canonical = _BARE_LF.sub(b"\r\n", canonical)
        if b" \r\n" in canonical:  # whitespace at the end of a line (one space, compressed)
            canonical = canonical.replace(b" \r\n", b"\r\n")
        content = len(canonical.rstrip(b"\r\n"))
        # after the last octet other than CR/LF: line ends, possibly after lines of CRs only
        # ("\r\r\n" is a line whose content is a CR); every LF in `canonical` follows a CR
        crs = canonical.rfind(b"\r\r", content)
        if crs >= 0:
            kept = crs + 3
        elif content > 0 or self._mid_line:
            kept = content + 2  # the line break of a line with content
        else:
            kept = 0
        if kept:
            self._hash_blanks()
            self._hash.update(canonical if kept == len(canonical) else canonical[:kept])
        self._blank += (len(canonical) - kept) // 2
        self._mid_line = False

    def _hash_blanks(self) -> None:
        while self._blank:
            n = min(self._blank, _BLANKS_AT_ONCE)
            self._hash.update(b"\r\n" * n)
            self._blank -= n


def _compress(text: bytes) -> bytes:
    """Every run of spaces and tabs made one space."""
    if b"\t" in text:
        text = text.replace(b"\t", b" ")
    while b"  " in text:  # each pass halves the runs: log2 of the longest run passes
        text = text.replace(b"  ", b" ")
    return text
