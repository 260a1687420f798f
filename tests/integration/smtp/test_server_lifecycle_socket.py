"""Sessions ending, and a client that never reads, over real sockets on 127.0.0.1 (issue 19)."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import threads

from mailrelay.config import ServerConfig
from mailrelay.smtp.session import PAUSE_ABOVE
from tests.support.peers import flood_unread
from tests.support.smtp.certs import make_certs
from tests.support.smtp.fakes import listen

pytestmark = pytest.mark.integration


def read_until_closed(s: socket.socket) -> bytes:
    received = b""
    try:
        while chunk := s.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass  # an abort: closed all the same
    return received


@pytest_twisted.inlineCallbacks
def test_a_client_silent_after_starttls_is_closed_at_the_idle_timeout(tmp_path):
    _, cert, key = make_certs(tmp_path)
    config = ServerConfig(
        hostname="mx.example.test",
        local_domains=("example.test",),
        idle_timeout=1.0,
        tls_certificate=str(cert),
        tls_key=str(key),
    )
    factory, listening = listen(config)
    port = yield listening

    def client() -> bytes:
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=30) as s:
            s.recv(1024)
            s.sendall(b"EHLO client.example.org\r\nSTARTTLS\r\n")
            return read_until_closed(s)  # then nothing, not even a ClientHello

    try:
        said = yield threads.deferToThread(client)
    finally:
        yield port.stopListening()
    assert said.endswith(b"220 2.0.0 Ready to start TLS\r\n")  # and then the server hung up
    assert not factory.protocols and factory.connections == 0


@pytest_twisted.inlineCallbacks
def test_a_client_that_pipelines_and_never_reads_is_paused():
    config = ServerConfig(hostname="mx.example.test", local_domains=("example.test",))
    factory, listening = listen(config)
    port = yield listening
    flood = b"NOOP\r\n" * (16 * 1024 * 1024 // 6)  # 16 MiB of commands, no reply read

    s = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=30)
    try:

        def paused() -> bool:  # the server takes no more: no need to wait for the client to notice
            return any(p.session._blocked and p.session._paused for p in factory.protocols)

        sent = yield threads.deferToThread(flood_unread, s, flood, 30, paused)
        (protocol,) = factory.protocols
        session = protocol.session
        # what it costs us: the replies it has not read (the transport's buffer) and its
        # commands we hold (the parser's) are bounded; the rest waits in the kernel, not here
        assert sent < len(flood), "the server read all 16 MiB from a client that reads nothing"
        assert session._blocked and session._paused
        assert session.parser.buffered <= PAUSE_ABOVE + 65536
        s.setblocking(True)
        # it reads at last: the server answers on, in order
        replies = yield threads.deferToThread(read_replies, s, 100_000)
        assert replies >= 100_000
    finally:
        s.close()
        yield port.stopListening()


def read_replies(s: socket.socket, count: int) -> int:
    """Read ``count`` replies, each a 250 to a NOOP."""
    received, buf = 0, b""
    while received < count:
        chunk = s.recv(65536)
        if not chunk:
            break
        lines = (buf + chunk).split(b"\r\n")
        buf = lines.pop()
        assert set(lines) <= {b"250 2.0.0 Ok"}
        received += len(lines)
    return received
