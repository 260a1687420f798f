"""Messages with a prefix that intake adds once (a DKIM signature), and committing one to any
store: shared by the spool/memory tests and the PostgreSQL ones."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from zope.interface.verify import verifyObject

from mailrelay.envelope import Envelope, Recipient
from mailrelay.interfaces import IPrependingWriter
from mailrelay.queue.spool import SEGMENT_BODY_MAX

ENV = Envelope("a@example.org", (Recipient("b@example.test"),), received_at=1700000000.0)
#: Any octets come back as they were (a non-ASCII d= of an IDN domain, folded lines).
PREFIX = b"DKIM-Signature: v=1; d=\xc3\xa9x.test; s=s1;\r\n\tb=c2lnbmF0dXJl\r\n"
SMALL = b"From: a@example.org\r\n\r\nsmall\r\n"  # packed into a segment
LARGE = b"From: a@example.org\r\n\r\n" + b"x" * SEGMENT_BODY_MAX  # a file of its own


def commit(store: Any, body: bytes, prefix: bytes = PREFIX) -> defer.Deferred[str]:
    """Write ``body`` to a new message of ``store``, prepend ``prefix`` (if any), commit."""
    writer = store.open(ENV)
    assert verifyObject(IPrependingWriter, writer)
    writer.write(body)
    if prefix:
        writer.prepend(prefix)
    return writer.commit()
