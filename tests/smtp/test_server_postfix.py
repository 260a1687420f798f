"""Postfix as a real upstream client: it relays into mailrelay's server over STARTTLS."""

from __future__ import annotations

import smtplib

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads
from twisted.internet.endpoints import serverFromString

from mailrelay.config import ServerConfig
from mailrelay.policy import build_policy
from mailrelay.smtp.server import SMTPServerFactory
from tests.delivery.postfix import PostfixRelay
from tests.smtp.certs import make_certs
from tests.smtp.fakes import RecordingSink

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(__import__("shutil").which("postfix") is None and
                                 not __import__("os").path.exists("/usr/sbin/postfix"), reason="needs postfix")]


@pytest_twisted.inlineCallbacks
def test_postfix_relays_into_mailrelay_over_starttls(tmp_path):
    ca, cert, key = make_certs(tmp_path)
    config = ServerConfig(hostname="mx.example.test", local_domains=("example.test",), trusted_networks=(),
                          tls_certificate=str(cert), tls_key=str(key))
    sink = RecordingSink()
    port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        SMTPServerFactory.from_config(config, sink, build_policy(config), reactor))
    postfix = PostfixRelay(port.getHost().port)
    with open(postfix.etc / "main.cf", "a") as f:  # its smtp client must use STARTTLS to reach us
        f.write("smtp_tls_security_level = encrypt\nsmtp_tls_loglevel = 1\n")
    body = b"Subject: via postfix\r\nMessage-ID: <pf1@example.org>\r\n\r\n.dot line\r\n" + b"x" * 900 + b"\r\n"
    try:
        yield threads.deferToThread(postfix.start)

        def send():
            with smtplib.SMTP("127.0.0.1", postfix.port, timeout=20) as s:
                s.sendmail("sender@example.org", ["user@example.test"], body)

        yield threads.deferToThread(send)
        for _ in range(300):
            if sink.committed:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        log = postfix.log()
    finally:
        yield threads.deferToThread(postfix.stop)
        yield port.stopListening()
    assert sink.committed, log
    w = sink.committed[0]
    assert w.envelope.protocol == "ESMTPS"
    assert [r.address for r in w.envelope.recipients] == ["user@example.test"]
    received = w.data.split(b"\r\n\r\n")[0]
    assert received.startswith(b"Received: from postfix.mailrelay.test ([127.0.0.1])\r\n\t(using TLSv1.")
    assert w.data.endswith(b"\r\n\r\n.dot line\r\n" + b"x" * 900 + b"\r\n")
    assert "TLS connection established to 127.0.0.1" in log
