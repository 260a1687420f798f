"""How a server session ends, and what it holds meanwhile (in memory, on a task.Clock).

Every way a session ends must end its TCP connection within a bound whatever state TLS is in, and
a client that pipelines without reading must not grow our memory (issue 19, items 1 and 8b).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from twisted.internet.address import IPv4Address

from mailrelay.config import ServerConfig
from mailrelay.envelope import Reply
from mailrelay.smtp.server import CLOSE_LINGER, SHUTDOWN_LINGER
from mailrelay.smtp.session import PAUSE_ABOVE
from tests.support.smtp.fakes import (
    SEND_BUFFER,
    Conn,
    DeferredPolicy,
    StubbornTransport,
    stubborn_conn,
)

BYE = Reply(421, "4.3.2", "mx.example.test Service shutting down")
IDLE = 300.0


def handshake(c: Conn) -> None:
    c.transport.handshake_done = True  # type: ignore[attr-defined]
    c.server.handshakeCompleted()


# Each: how the session is brought to its end. The linger bound is the longest a closed
# connection may wait for the client before we drop it.
ENDINGS: dict[str, Callable[[Conn], None]] = {
    "QUIT": lambda c: c.send("QUIT\r\n"),
    "idle timeout": lambda c: c.clock.advance(IDLE),
    "too many errors": lambda c: c.send("BOGUS\r\n" * 20),
    "protocol error (HTTP)": lambda c: c.send("GET / HTTP/1.1\r\n"),
    "limit (BDAT without size)": lambda c: c.send("BDAT x\r\n"),
    "shutdown, idle": lambda c: c.factory.drain(BYE),
    "shutdown deadline mid-DATA": lambda c: (
        c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<u@example.test>\r\nDATA\r\nhalf\r\n"),
        c.factory.drain(BYE),
        c.factory.close_all(BYE),
    ),
}


@pytest.mark.parametrize("ending", list(ENDINGS))
@pytest.mark.parametrize("tls", ["plain", "tls established"])
def test_every_way_a_session_ends_drops_a_client_that_never_hangs_up_within_a_bound(
    ending: str, tls: str
) -> None:
    c = stubborn_conn("starttls" if tls != "plain" else "plain")
    if tls != "plain":
        c.send("EHLO c\r\nSTARTTLS\r\n")
        handshake(c)
    c.send("EHLO c\r\n")
    ENDINGS[ending](c)
    assert c.server.session.state.name == "CLOSED"
    assert c.transport.close_requested or c.transport.ended  # type: ignore[attr-defined]
    c.clock.advance(max(CLOSE_LINGER, SHUTDOWN_LINGER))
    assert c.transport.ended, f"{ending} over {tls}: the connection is still held"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "ending",
    [
        e
        for e in ENDINGS
        if e
        not in (
            "QUIT",
            "too many errors",
            "protocol error (HTTP)",
            "limit (BDAT without size)",
            "shutdown deadline mid-DATA",
        )
    ],
)
def test_a_client_silent_after_starttls_is_dropped_at_once_when_its_session_ends(
    ending: str,
) -> None:
    c = stubborn_conn("starttls")
    c.send("EHLO c\r\nSTARTTLS\r\n")
    assert c.transport.tls_options is not None  # type: ignore[attr-defined]
    ENDINGS[ending](c)  # the client never starts the handshake
    assert c.transport.ended  # type: ignore[attr-defined]


def test_an_implicit_tls_client_that_never_handshakes_is_dropped_at_the_idle_timeout() -> None:
    c = stubborn_conn("implicit")
    assert c.server.session.tls_active
    c.clock.advance(IDLE - 1)
    assert not c.transport.ended  # type: ignore[attr-defined]
    c.clock.advance(1)
    assert c.transport.ended  # type: ignore[attr-defined]


def test_a_refused_connection_is_dropped_within_a_bound_too() -> None:
    config = ServerConfig(
        hostname="mx.example.test", local_domains=("example.test",), max_connections_per_ip=1
    )
    first = stubborn_conn(config=config)
    addr = IPv4Address("TCP", "192.0.2.10", 40001)
    refused = first.factory.buildProtocol(addr)
    transport = StubbornTransport(peerAddress=addr, hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
    transport.start_implicit_tls()  # the 421 waits for a handshake the client never makes
    refused.makeConnection(transport)
    assert transport.close_requested and not transport.ended
    first.clock.advance(CLOSE_LINGER)
    assert transport.ended
    refused.connectionLost(None)


# -- a client that never reads (8b) ---------------------------------------------------------------


def flood(c: Conn, data: bytes, chunk: int = 65536) -> int:
    """Send ``data`` as a socket would: only while the server reads. Returns what it took."""
    sent = 0
    while (
        sent < len(data)
        and c.transport.producerState == "producing"
        and not c.server.session.state.name == "CLOSED"
    ):
        c.send(data[sent : sent + chunk])
        sent += chunk
    return min(sent, len(data))


def test_a_client_that_pipelines_and_never_reads_is_paused_with_bounded_memory() -> None:
    c = stubborn_conn()
    c.ehlo()
    c.transport.clear()
    commands = b"NOOP\r\n" * (1024 * 1024 // 6)  # 1 MiB of pipelined commands
    taken = flood(c, commands)
    assert c.transport.producerState == "paused", "still reading from a client that reads nothing"
    assert c.transport.unread <= SEND_BUFFER + 1024  # type: ignore[attr-defined]  # replies held for the client: the send buffer, one more
    assert c.server.session.parser.buffered <= PAUSE_ABOVE + 65536  # its commands held: bounded too
    assert taken < len(commands) // 2
    # it reads at last: we answer what we hold and read again, in order, until all is answered
    answered = 0
    while answered < len(commands) // 6:
        out = c.transport.read_all()  # type: ignore[attr-defined]
        assert out and set(out.split(b"\r\n")[:-1]) == {b"250 2.0.0 Ok"}
        answered += out.count(b"\r\n")
        taken += flood(c, commands[taken:])
    assert answered == len(commands) // 6 and not c.closed


def test_a_blocked_session_still_ends_at_the_idle_timeout() -> None:
    c = stubborn_conn()
    c.ehlo()
    flood(c, b"NOOP\r\n" * 200_000)
    assert c.transport.producerState == "paused"
    c.clock.advance(IDLE)
    assert c.server.session.state.name == "CLOSED"
    c.clock.advance(CLOSE_LINGER)
    assert c.transport.ended  # type: ignore[attr-defined]


def test_input_before_the_greeting_is_bounded() -> None:
    config = ServerConfig(
        hostname="mx.example.test", local_domains=("example.test",), greet_delay=2.0
    )
    c = stubborn_conn(config=config)
    taken = flood(c, b"NOOP\r\n" * 1_000_000)
    assert c.transport.producerState == "paused"
    assert c.server.session.parser.buffered <= PAUSE_ABOVE + 65536 and taken < 1024 * 1024
    c.clock.advance(2.0)  # it talked first: refused, as before
    assert c.codes() == [554] and c.server.session.state.name == "CLOSED"


def test_input_while_an_answer_is_pending_is_bounded() -> None:
    policy = DeferredPolicy()
    c = stubborn_conn(policy=policy)
    c.send("EHLO c\r\n")
    assert policy.pending
    taken = flood(c, b"NOOP\r\n" * 1_000_000)
    assert c.transport.producerState == "paused"
    assert c.server.session.parser.buffered <= PAUSE_ABOVE + 65536 and taken < 1024 * 1024
    policy.answer()  # answered: the commands held are taken as the client reads the replies
    while c.transport.unread:  # type: ignore[attr-defined]
        c.transport.read_all()  # type: ignore[attr-defined]
    assert c.transport.producerState == "producing"
    assert c.server.session.parser.buffered < len(b"NOOP\r\n")  # all taken but a line cut short


def test_a_refusal_during_an_implicit_tls_handshake_may_still_reach_the_client_in_bound() -> None:
    """The connect policy refuses before the handshake is done: the reply waits in the TLS layer for
    a client that completes it, for CLOSE_LINGER at most; a timeout or a shutdown aborts at once."""
    from mailrelay.envelope import Reply as R

    class Refusing(DeferredPolicy):
        def connect(self, session):  # type: ignore[no-untyped-def]
            return R(554, "5.7.1", "go away")

    c = stubborn_conn("implicit", policy=Refusing())
    assert c.server.session.state.name == "CLOSED"
    assert c.transport.close_requested and not c.transport.ended  # type: ignore[attr-defined]
    c.clock.advance(CLOSE_LINGER)
    assert c.transport.ended  # type: ignore[attr-defined]
