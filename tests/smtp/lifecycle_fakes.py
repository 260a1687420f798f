"""In-memory transports that end (or fail to end) a connection the way real ones do.

``StringTransport`` takes every ``loseConnection`` as done. Twisted's TLS does not: until its
handshake completes it holds our writes and closes nothing, and after it, it waits for the
client's close_notify; and a TCP close waits for the client to read what we sent. A client that
does none of these holds the connection until we abort it. ``StubbornTransport`` models that,
and a send buffer that pauses its producer, so tests can ask whether a session really ends and
what a client that never reads costs.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from zope.interface import directlyProvides

from mailrelay.config import ServerConfig
from tests.smtp.fakes import Conn

#: Unread octets over which the transport pauses its producer (Twisted's TCP bufferSize).
SEND_BUFFER = 64 * 1024


class StubbornTransport(StringTransport):
    """A connection to a client that never reads, never completes a TLS handshake it has not
    completed yet, and never answers a TLS close: only ``abortConnection`` ends it."""

    tls_options: Any = None
    handshake_done = False
    close_requested = False

    def startTLS(self, options: Any) -> None:
        self.tls_options = options

    def start_implicit_tls(self) -> None:
        """Make this an implicit-TLS connection (before the protocol connects)."""
        self.tls_options = "implicit"
        directlyProvides(self, ISSLTransport)

    unread = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        self.unread += len(data)
        if self.producer is not None and self.unread > SEND_BUFFER:
            self.producer.pauseProducing()

    def loseConnection(self) -> None:
        self.close_requested = True  # waits for the client, which does nothing

    def loseWriteConnection(self) -> None:
        self.close_requested = True

    def abortConnection(self) -> None:
        self.disconnected = True
        self.disconnecting = True

    @property
    def ended(self) -> bool:
        return bool(self.disconnected)

    def read_all(self) -> bytes:
        """The client reads everything: the buffer drains, the producer may go on."""
        data = self.value()
        self.clear()
        self.unread = 0
        if self.producer is not None:
            self.producer.resumeProducing()
        return data


def stubborn_conn(tls: str = "plain", **kw: Any) -> Conn:
    """A ``Conn`` over a ``StubbornTransport``; ``tls``: "plain", "starttls" or "implicit"."""
    config = kw.pop("config", None) or ServerConfig(
        hostname="mx.example.test", local_domains=("example.test",)
    )
    if tls == "implicit":

        class Implicit(StubbornTransport):
            def __init__(self, *a: Any, **k: Any) -> None:
                super().__init__(*a, **k)
                self.start_implicit_tls()

        return Conn(config=config, transport_class=Implicit, **kw)
    if tls == "starttls":
        import attrs

        c = Conn(config=config, transport_class=StubbornTransport, tls_options=object(), **kw)
        c.factory.settings = attrs.evolve(c.factory.settings, starttls=True)
        c.server.session.settings = c.factory.settings
        return c
    return Conn(config=config, transport_class=StubbornTransport, **kw)
