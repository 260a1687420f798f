"""Intake ("cleanup" in Postfix): what happens to a message between the wire and the store.

The server session owns the conversation; once a message is opened it hands the text through one
``MessageIntake`` (``Intake.start``), which puts our ``Received:`` header on top (RFC 5321 4.4) and
counts the ones already there (RFC 5321 6.3 loop detection). The session asks its ``rejection``
once the text is complete and refuses the message with it.

Contract of ``MessageIntake.feed(data)``: called with every piece of the message text in order;
it returns the octets to store *before* ``data`` (an empty line when the text would otherwise go
on with our header, see ``received.separator``), usually ``b""``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import attrs

from mailrelay.envelope import Envelope, Reply, SessionInfo
from mailrelay.intake.received import received_header, separator
from mailrelay.smtp import replies as R

#: Stop looking for Received headers after this much header text.
HEADER_SCAN_LIMIT = 1024 * 1024
_RECEIVED = re.compile(rb"(?im)^received[ \t]*:")

TraceHeader = Callable[[SessionInfo, Envelope, str, float], bytes]


@attrs.frozen
class Intake:
    """The intake of one listener: its hop limit and trace header; one ``MessageIntake`` a message.

    ``hopcount_limit``: Received headers, ours included, that make a mail loop (554 5.4.6), as
    Postfix's ``hopcount_limit``.
    """

    hopcount_limit: int = 50
    trace_header: TraceHeader = received_header

    def start(self, info: SessionInfo, envelope: Envelope, queue_id: str) -> MessageIntake:
        header = self.trace_header(info, envelope, queue_id, envelope.received_at)
        return MessageIntake(header, self.hopcount_limit)


class MessageIntake:
    """One message's text on its way in: our header first, then the hop count as it streams."""

    def __init__(self, header: bytes, hopcount_limit: int) -> None:
        self.header = header
        self.rejection: Reply | None = None
        self._limit = hopcount_limit
        self._started = False  # an octet of the message text came
        self._headers: bytes | None = b""  # header text seen so far; None: done looking

    def feed(self, data: bytes) -> bytes:
        """Take the next piece of text; return what goes before it."""
        before = b""
        if not self._started and data:
            self._started = True
            before = separator(data)
            if before:  # the client's first line would go on with our Received: its text is body
                self._headers = None  # no header section, so no Received header to count
        if self._headers is not None:
            self._scan(data)
        return before

    def _scan(self, data: bytes) -> None:
        """Count Received headers until the header section ends.

        As Postfix's cleanup does, ours counts too: with the default limit of 50, a message that
        arrives with 49 is refused, one with 48 goes on (and arrives at the next hop with 49).
        """
        assert self._headers is not None
        head = self._headers + data
        end = 0 if head.startswith(b"\r\n") else head.find(b"\r\n\r\n")
        section = head if end < 0 else head[:end]
        theirs = self._limit - 1  # this many besides ours is a loop
        # fewer lines than that cannot hold that many Received headers: no regex search then
        if section.count(b"\n") + 1 >= theirs and len(_RECEIVED.findall(section)) >= theirs:
            self.rejection = R.TOO_MANY_HOPS
            self._headers = None
        elif end >= 0 or len(head) > HEADER_SCAN_LIMIT:
            self._headers = None
        else:
            self._headers = head
