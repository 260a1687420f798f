"""SIGTERM to a real ``twistd mailrelay``: stop listening, let the message in hand finish, exit 0.

Each test runs a real relay process (tests/support/relay.py) whose static route points at smtp-sink.
"""

from __future__ import annotations

import os
import signal
import socket

import pytest

from tests.support.peers import SMTPSink
from tests.support.relay import RelayProcess
from tests.support.reliability.helpers import Raw, route_to

pytestmark = pytest.mark.integration


@pytest.fixture
def sink(smtp_sink: SMTPSink) -> SMTPSink:
    return smtp_sink


def relay_with(sink_port: int, shutdown_timeout: str) -> RelayProcess:
    body = f'[server]\nshutdown_timeout = "{shutdown_timeout}"\n' + route_to(sink_port)
    return RelayProcess(body)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


def sigterm(relay: RelayProcess) -> None:
    assert relay.proc is not None
    os.kill(relay.proc.pid, signal.SIGTERM)
    relay.wait_log("SIGTERM: stopping")


def test_a_message_in_flight_at_sigterm_is_accepted_and_delivered_and_the_relay_exits_0(sink):
    relay = relay_with(sink.port, "30s").start()
    try:
        with Raw(relay.port) as c:
            c.greet()
            assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
            assert c.cmd("RCPT TO:<b@example.test>").startswith(b"250")
            assert c.cmd("DATA").startswith(b"354")
            c.send(
                b"Subject: in flight at SIGTERM\r\nMessage-ID: <inflight@relay.test>\r\n\r\nfirst "
                b"half\r\n"
            )
            sigterm(relay)
            relay.wait_log("waiting for 1 sessions to finish")
            assert refused(relay.port), "still listening after SIGTERM"
            c.send(b"second half\r\n.\r\n")
            reply = c.reply()
            assert reply.startswith(b"250 2.0.0"), reply
            # the transaction over, the session is closed for the shutdown
            assert c.reply().startswith(b"421 4.3.2")
            assert c.closed()
        assert relay.proc is not None
        rc = relay.proc.wait(timeout=30)
        relay.proc = None
        assert rc == 0, relay.log_text()[-3000:]
        log = relay.log_text()
        assert "mailrelay stopped" in log
        delivered_before_exit = bool(sink.messages())
        if not delivered_before_exit:  # stopped before its first attempt: spooled for the next run
            relay.start()
            sink.wait_for(1, 20)
        print(
            f"\nmessage in flight at SIGTERM delivered "
            f"{'before exit' if delivered_before_exit else 'after restart'}"
        )
        body = sink.messages()[0]
        assert b"first half\nsecond half\n" in body.replace(b"\r\n", b"\n")
    finally:
        relay.cleanup()


def test_idle_sessions_are_closed_at_once_with_421(sink):
    # A deadline far beyond the test's patience: only closing idle sessions at once lets it exit.
    relay = relay_with(sink.port, "10m").start()
    try:
        with Raw(relay.port) as idle, Raw(relay.port) as greeted_only:
            idle.greet()
            assert greeted_only.reply().startswith(b"220")
            sigterm(relay)
            assert idle.reply().startswith(b"421 4.3.2")
            assert greeted_only.reply().startswith(b"421 4.3.2")
            assert idle.closed() and greeted_only.closed()
        assert relay.proc is not None
        assert relay.proc.wait(timeout=20) == 0
        relay.proc = None
    finally:
        relay.cleanup()


def test_at_the_deadline_a_stalled_transaction_is_cut_and_nothing_half_written_remains(sink):
    relay = relay_with(sink.port, "1s").start()
    try:
        with Raw(relay.port) as c:
            c.greet()
            assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
            assert c.cmd("RCPT TO:<b@example.test>").startswith(b"250")
            assert c.cmd("DATA").startswith(b"354")
            c.send(b"Subject: never finished\r\n\r\n" + b"x" * 70000 + b"\r\n")
            sigterm(relay)
            assert c.reply().startswith(b"421 4.3.2")
            assert c.closed()
        assert relay.proc is not None
        assert relay.proc.wait(timeout=20) == 0
        relay.proc = None
        assert "shutdown timeout: closing 1 sessions" in relay.log_text()
        assert "#critical]" not in relay.log_text()  # no unhandled CancelledError (issue 19, 8d)
        assert relay.queue_files() == [], "a half-written message was left in the spool"
        assert sink.messages() == []
    finally:
        relay.cleanup()


def test_a_message_caught_by_the_stop_before_its_delivery_stays_due_at_once():
    """The queue stopping between routing and delivery must not push the message to its next
    retry."""
    from twisted.internet import defer, task

    from mailrelay.config import QueueConfig
    from mailrelay.envelope import Envelope, Recipient
    from mailrelay.queue.manager import QueueManager
    from mailrelay.testing import FakeRouter, MemoryQueueStore, RecordingDeliverer, route_to

    clock = task.Clock()
    clock.advance(1_000_000)
    store = MemoryQueueStore(clock)
    answer: defer.Deferred = defer.Deferred()
    router = FakeRouter({"*": lambda rcpt, env: answer})
    deliverer = RecordingDeliverer()
    manager = QueueManager(
        store,
        router,
        deliverer,
        clock,
        QueueConfig(retry_schedule=(3600.0,)),
        "relay.test",
        jitter=lambda d: d,
    )
    manager.start()
    queue_id = store.inject(
        Envelope("a@example.org", (Recipient("b@example.test"),)), b"Subject: x\r\n\r\nx\r\n"
    )
    clock.advance(0)
    assert router.calls, "the attempt has begun: it is routing"
    stopped = manager.stop(grace=5)
    stopped_at = clock.seconds()
    answer.callback(route_to("127.0.0.1", 2525))
    clock.advance(5)
    assert stopped.called
    assert deliverer.calls == []
    assert (
        store.messages[queue_id].next_attempt <= stopped_at
    )  # still due at once, not an hour later


def test_sessions_stuck_at_the_deadline_end_cleanly_with_no_critical_line(tmp_path):
    """Mid-DATA, stalled inside TLS, idle: every session ends and the stop logs no unhandled
    CancelledError (issue 19, 8d); a client silent after STARTTLS goes at once, like an idle one."""
    import gc

    from twisted.internet import task
    from twisted.logger import LogLevel, globalLogPublisher

    from mailrelay import config
    from mailrelay.service import MailRelayService
    from mailrelay.smtp.server import SHUTDOWN_LINGER
    from tests.support.smtp.fakes import Conn, StubbornTransport

    clock = task.Clock()
    cfg = config.loads(
        f'[server]\nhostname = "mx.example.test"\ntrusted_networks = ["192.0.2.0/24"]\n'
        f'listen = ["tcp:0:interface=127.0.0.1"]\nshutdown_timeout = "30s"\n'
        f'[spool]\npath = "{tmp_path / "spool"}"\n'
    )
    relay = MailRelayService(cfg, reactor=clock)
    factory = relay.factory
    factory.tls_options = object()
    factory.settings = __import__("attrs").evolve(factory.settings, starttls=True)

    def conn(client: str) -> Conn:
        c = Conn(factory=factory, client=client, transport_class=StubbornTransport)
        c.server.session.settings = factory.settings
        c.ehlo()
        return c

    mid_data, in_tls, idle = conn("192.0.2.1"), conn("192.0.2.2"), conn("192.0.2.3")
    mid_data.send(
        "MAIL FROM:<a@example.org>\r\nRCPT TO:<u@elsewhere.example>\r\nDATA\r\nSubject: half\r\n"
    )
    assert mid_data.codes() == [250, 250, 354]
    in_tls.send("STARTTLS\r\n")  # and then not a byte of the handshake
    critical: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_level") in (LogLevel.critical, LogLevel.error):
            critical.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        done = relay._drain_sessions(clock.seconds() + 30)
        assert in_tls.transport.ended and idle.server.session.state.name == "CLOSED"  # at once
        assert not mid_data.server.session.state.name == "CLOSED"
        for c in (in_tls, idle):  # the transports report what they did
            if c.transport.ended:
                c.proto.connectionLost(None)
        clock.advance(SHUTDOWN_LINGER)
        assert idle.transport.ended  # it never answered our close: dropped
        idle.proto.connectionLost(None)
        clock.advance(30)  # the deadline: the message in hand is cut
        assert mid_data.server.session.state.name == "CLOSED" and mid_data.codes() == [421]
        assert not done.called  # until the connection is really gone
        clock.advance(SHUTDOWN_LINGER)
        assert mid_data.transport.ended
        mid_data.proto.connectionLost(None)
        assert done.called and not factory.protocols
        del done
        gc.collect()  # an unhandled failure in a Deferred is logged when the Deferred goes
    finally:
        globalLogPublisher.removeObserver(observe)
    assert critical == []
