"""In-memory collaborators for server tests: a recording sink whose commits fire by hand, a
policy that answers through Deferreds, and a connected protocol on a StringTransport; and, for
tests with real clients, the same server on a loopback port (``listen``).

The last section: in-memory transports that end (or fail to end) a connection the way real ones
do (``StubbornTransport``, ``stubborn_conn``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from zope.interface import directlyProvides, implementer

from mailrelay.config import ServerConfig
from mailrelay.envelope import Envelope, Reply
from mailrelay.interfaces import IMessageSink, IMessageWriter, IPolicy
from mailrelay.listener import server_factory
from mailrelay.policy import build_policy
from mailrelay.smtp.server import SMTPServerFactory, SMTPServerProtocol


@implementer(IMessageWriter)
class RecordingWriter:
    def __init__(self, envelope: Envelope, queue_id: str, auto_commit: bool) -> None:
        self.envelope = envelope
        self.queue_id = queue_id
        self.chunks: list[bytes] = []
        self.aborted = False
        self.committed = False
        self.commit_d: defer.Deferred[str] | None = None
        self.auto_commit = auto_commit

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def write(self, data: bytes) -> None:
        assert not self.aborted and not self.committed
        self.chunks.append(data)

    def commit(self) -> defer.Deferred[str]:
        self.commit_d = defer.Deferred()
        if self.auto_commit:
            self.fire()
        return self.commit_d

    def fire(self) -> None:
        assert self.commit_d is not None
        self.committed = True
        self.commit_d.callback(self.queue_id)

    def abort(self) -> None:
        self.aborted = True


@implementer(IMessageSink)
class RecordingSink:
    def __init__(self, auto_commit: bool = True) -> None:
        self.writers: list[RecordingWriter] = []
        self.auto_commit = auto_commit

    def open(self, envelope: Envelope) -> RecordingWriter:
        w = RecordingWriter(envelope, f"Q{len(self.writers) + 1:04d}", self.auto_commit)
        self.writers.append(w)
        return w

    @property
    def committed(self) -> list[RecordingWriter]:
        return [w for w in self.writers if w.committed]


@implementer(IPolicy)
class DeferredPolicy:
    """Every stage answers through a Deferred kept in ``pending`` until the test fires it."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, tuple[Any, ...], defer.Deferred[Reply | None]]] = []

    def _ask(self, stage: str, *args: Any) -> defer.Deferred[Reply | None]:
        d: defer.Deferred[Reply | None] = defer.Deferred()
        self.pending.append((stage, args, d))
        return d

    def answer(self, reply: Reply | None = None) -> str:
        stage, _, d = self.pending.pop(0)
        d.callback(reply)
        return stage

    def connect(self, session: Any) -> None:
        return None

    def helo(self, session: Any, name: str) -> defer.Deferred[Reply | None]:
        return self._ask("helo", name)

    def mail(self, session: Any, sender: str, params: Any) -> defer.Deferred[Reply | None]:
        return self._ask("mail", sender)

    def rcpt(
        self, session: Any, sender: str, recipient: str, params: Any
    ) -> defer.Deferred[Reply | None]:
        return self._ask("rcpt", recipient)

    def data(self, session: Any, envelope: Envelope) -> defer.Deferred[Reply | None]:
        return self._ask("data")

    def end_of_data(
        self, session: Any, envelope: Envelope, size: int
    ) -> defer.Deferred[Reply | None]:
        return self._ask("end_of_data", size)


class Conn:
    """One server connection in memory; ``send`` bytes, read ``replies()`` as they came out."""

    def __init__(
        self,
        config: ServerConfig | None = None,
        sink: RecordingSink | None = None,
        policy: IPolicy | None = None,
        client: str = "192.0.2.10",
        clock: Clock | None = None,
        factory: SMTPServerFactory | None = None,
        transport_class: type[StringTransport] = StringTransport,
        **extras: Any,
    ) -> None:
        self.config = config or ServerConfig(
            hostname="mx.example.test", local_domains=("example.test",)
        )
        self.sink = sink if sink is not None else RecordingSink()
        self.clock = clock or Clock()
        self.policy = policy if policy is not None else build_policy(self.config)
        self.factory = factory or server_factory(
            self.config, self.sink, self.policy, self.clock, **extras
        )
        cls = IPv6Address if ":" in client else IPv4Address
        addr = cls("TCP", client, 40000)
        self.proto = self.factory.buildProtocol(addr)
        self.transport = transport_class(peerAddress=addr, hostAddress=cls("TCP", "127.0.0.1", 25))
        self.proto.makeConnection(self.transport)
        self._seen = 0

    @property
    def server(self) -> SMTPServerProtocol:
        assert isinstance(self.proto, SMTPServerProtocol)
        return self.proto

    def send(self, data: bytes | str) -> None:
        self.proto.dataReceived(data.encode() if isinstance(data, str) else data)

    def output(self) -> bytes:
        out = self.transport.value()[self._seen :]
        self._seen = len(self.transport.value())
        return out

    def replies(self) -> list[tuple[int, str]]:
        """New complete replies since the last call: (code, text of the last line)."""
        result = []
        for line in self.output().decode().split("\r\n"):
            if len(line) >= 4 and line[3] == " ":
                result.append((int(line[:3]), line[4:]))
        return result

    def codes(self) -> list[int]:
        return [code for code, _ in self.replies()]

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def ehlo(self) -> None:
        self.replies()
        self.send("EHLO client.example.org\r\n")
        assert self.codes() == [250]


class TLSStringTransport(StringTransport):
    """Records ``startTLS``; the test then calls ``handshakeCompleted`` itself."""

    tls_options: Any = None

    def startTLS(self, options: Any) -> None:
        self.tls_options = options


def stuff(message: bytes) -> bytes:
    """Dot-stuff a CRLF message and append the end of data."""
    lines = message.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines) + b".\r\n"


def listen(
    config: ServerConfig, sink: RecordingSink | None = None
) -> tuple[SMTPServerFactory, defer.Deferred[IListeningPort]]:
    """The server for ``config`` on a free port of 127.0.0.1, in the running reactor, committing to
    ``sink`` (a new RecordingSink by default); → the factory and its port once it listens."""
    from twisted.internet import reactor

    factory = server_factory(
        config, sink if sink is not None else RecordingSink(), build_policy(config), reactor
    )
    return factory, serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)


@contextmanager
def logged_failures() -> Iterator[list[dict[str, Any]]]:
    """Every event logged with a traceback inside the block: none may come from client input."""
    seen: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None:
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(observer)


# -- transports that end (or fail to end) a connection the way real ones do ---------------------
#
# ``StringTransport`` takes every ``loseConnection`` as done. Twisted's TLS does not: until its
# handshake completes it holds our writes and closes nothing, and after it, it waits for the
# client's close_notify; and a TCP close waits for the client to read what we sent. A client that
# does none of these holds the connection until we abort it. ``StubbornTransport`` models that,
# and a send buffer that pauses its producer, so tests can ask whether a session really ends and
# what a client that never reads costs.

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
