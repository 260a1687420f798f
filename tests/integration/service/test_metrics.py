"""Prometheus ``/metrics`` of a running relay, scraped over a real socket after real mail."""

from __future__ import annotations

import smtplib
import time

import pytest
import pytest_twisted
from twisted.internet import threads

from mailrelay import config
from mailrelay.envelope import Envelope, Recipient, Reply
from mailrelay.metrics import RelayMetrics, outcome, queue_id_time
from mailrelay.observer import FanOut, RelayObserver
from mailrelay.queue.store import QueueIdGenerator
from mailrelay.service import MailRelayService
from tests.support.metrics import scrape, value
from tests.support.peers import free_port
from tests.support.reliability.helpers import Raw, stuff

pytestmark = pytest.mark.integration


def relay_config(tmp_path, sink_port: int, dead_port: int, metrics: bool = True) -> config.Config:
    metrics_table = '[metrics]\nlisten = "tcp:0:interface=127.0.0.1"\n' if metrics else ""
    return config.loads(
        f"""
[server]
hostname = "metrics.mailrelay.test"
listen = ["tcp:0:interface=127.0.0.1"]
trusted_networks = []
local_domains = ["example.test", "down.test"]
max_message_size = 4000
[spool]
path = "{tmp_path / "spool"}"
[queue]
retry_schedule = ["1h"]
{metrics_table}
[[routes]]
type = "static"
domains = ["down.test"]
hosts = ["127.0.0.1:{dead_port}"]
[[routes]]
type = "static"
domains = ["example.test"]
hosts = ["127.0.0.1:{sink_port}"]
""",
        "metrics.toml",
    )


def send_traffic(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        for i in range(2):
            client.sendmail(
                "a@example.org", ["b@example.test"], f"Subject: m{i}\r\n\r\nhi\r\n".encode()
            )
        client.sendmail("a@example.org", ["c@down.test"], b"Subject: deferred\r\n\r\nhi\r\n")
    with Raw(port) as c:
        c.greet()
        assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
        assert c.cmd("RCPT TO:<x@elsewhere.example>").startswith(b"554 5.7.1")  # relay denied
        assert c.cmd("RCPT TO:<b@example.test>").startswith(b"250")
        assert c.cmd("DATA").startswith(b"354")
        c.send(stuff(b"Subject: too big\r\n\r\n" + (b"x" * 900 + b"\r\n") * 10))
        assert c.reply().startswith(b"552 5.3.4")
        assert c.cmd("BOGUS").startswith(b"500 5.5.2")
        assert c.cmd("QUIT").startswith(b"221")


@pytest_twisted.inlineCallbacks
def test_metrics_after_real_mail(tmp_path, smtp_sink):
    relay = MailRelayService(relay_config(tmp_path, smtp_sink.port, free_port()))
    relay.startService()
    try:
        yield relay.listeners[0].listening
        yield relay.metrics_listener.listening
        smtp_port = relay.ports[0].getHost().port
        metrics_port = relay.metrics_listener.port.getHost().port
        yield threads.deferToThread(send_traffic, smtp_port)
        yield threads.deferToThread(smtp_sink.wait_for, 2, 20)

        def settled():
            deadline = time.monotonic() + 20
            while True:
                s = scrape(metrics_port)
                done = (
                    value(s, "mailrelay_deliveries_total", outcome="deferred") >= 1
                    and value(s, "mailrelay_queue_active_messages") == 0
                    and value(s, "mailrelay_connections_open") == 0
                )
                if done or time.monotonic() > deadline:
                    return s
                time.sleep(0.05)

        s = yield threads.deferToThread(settled)
    finally:
        yield relay.stopService()

    assert value(s, "mailrelay_connections_total") == 2
    assert value(s, "mailrelay_connections_open") == 0
    assert value(s, "mailrelay_messages_accepted_total") == 3
    assert value(s, "mailrelay_message_size_bytes_count") == 3
    assert value(s, "mailrelay_smtp_rejections_total", command="RCPT", status="5.7.1") == 1
    assert value(s, "mailrelay_smtp_rejections_total", command="DATA", status="5.3.4") == 1
    assert value(s, "mailrelay_smtp_rejections_total", command="UNKNOWN", status="5.5.2") == 1
    assert value(s, "mailrelay_messages_rejected_total", reason="5.3.4") == 1
    assert value(s, "mailrelay_deliveries_total", outcome="sent") == 2
    assert value(s, "mailrelay_deliveries_total", outcome="deferred") == 1
    assert value(s, "mailrelay_delivery_attempt_seconds_count") == 3
    assert value(s, "mailrelay_delivery_delay_seconds_count") == 2  # only the delivered ones
    assert value(s, "mailrelay_outbound_connections_total", tls="no") >= 1
    # the deferred message waits for its retry in an hour: still queued, and aged
    assert value(s, "mailrelay_queue_messages") == 1
    assert value(s, "mailrelay_queue_active_messages") == 0
    assert 0 <= value(s, "mailrelay_queue_oldest_age_seconds") < 3600


@pytest_twisted.inlineCallbacks
def test_metrics_are_off_without_a_listen_key_and_registries_are_per_service(tmp_path):
    one = MailRelayService(relay_config(tmp_path / "1", 2600, 2601, metrics=False))
    two = MailRelayService(relay_config(tmp_path / "2", 2600, 2601, metrics=False))
    assert one.metrics_listener is None
    assert all(listener.description.startswith("tcp:0") for listener in one.listeners)
    one.metrics.accepted.inc()
    assert one.metrics.registry is not two.metrics.registry
    assert two.metrics.registry.get_sample_value("mailrelay_messages_accepted_total") == 0
    assert one.metrics.registry.get_sample_value("mailrelay_messages_accepted_total") == 1
    yield None


def test_queue_id_time_reads_the_minting_time():
    class Clock:
        def seconds(self) -> float:
            return 1_764_000_000.123

    queue_id = QueueIdGenerator(Clock())()
    assert queue_id_time(queue_id) == pytest.approx(1_764_000_000.123, abs=0.001)
    assert queue_id_time("not-an-id!") is None


def test_outcomes_and_histograms_of_a_metrics_observer():
    m = RelayMetrics()
    assert [outcome(Reply(c, None, "")) for c in (250, 451, 550)] == ["sent", "deferred", "bounced"]
    env = Envelope("a@example.org", (Recipient("b@example.test"),))
    m.recipient_unrouted(env, "b@example.test", Reply(550, "5.1.2", "no route"))
    m.recipient_unrouted(env, "b@example.test", Reply(451, "4.3.0", "routing error"))
    m.delivery_attempted(env, Reply(451, "4.4.1", "later"), "[127.0.0.1]:25", 0.5)
    assert m.registry.get_sample_value("mailrelay_deliveries_total", {"outcome": "bounced"}) == 1
    assert m.registry.get_sample_value("mailrelay_deliveries_total", {"outcome": "deferred"}) == 2
    assert (
        m.registry.get_sample_value("mailrelay_delivery_attempt_seconds_count") == 1
    )  # routing is no attempt
    m.outbound_connection("[127.0.0.1]:25", "TLSv1.3 TLS_AES_256_GCM_SHA384")
    m.tls_established("inbound", "TLSv1.2")
    get = m.registry.get_sample_value
    assert get("mailrelay_outbound_connections_total", {"tls": "yes"}) == 1
    assert (
        get("mailrelay_tls_handshakes_total", {"direction": "outbound", "version": "TLSv1.3"}) == 1
    )
    assert (
        get("mailrelay_tls_handshakes_total", {"direction": "inbound", "version": "TLSv1.2"}) == 1
    )


def test_fan_out_tells_each_observer_what_it_knows_of():
    """An observer written against an older IRelayObserver (no recipient_unrouted, no base class)
    is left out of the new event, not broken by it; a failing one is logged and skipped."""
    heard = []

    class Old:
        def connection_refused(self, client_address, reply):
            heard.append(("old", client_address))

    class Failing(RelayObserver):
        def recipient_unrouted(self, envelope, recipient, reply):
            raise RuntimeError("boom")

    class New(RelayObserver):
        def recipient_unrouted(self, envelope, recipient, reply):
            heard.append(("new", recipient))

    fan = FanOut([Old(), Failing(), New()])
    env = Envelope("a@example.org", (Recipient("b@example.test"),))
    fan.recipient_unrouted(env, "b@example.test", Reply(550, "5.1.2", "no route"))
    fan.connection_refused("192.0.2.1", Reply(421, "4.7.0", "too many"))
    assert heard == [("new", "b@example.test"), ("old", "192.0.2.1")]
