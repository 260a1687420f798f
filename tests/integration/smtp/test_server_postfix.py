"""Postfix as a real upstream client: it relays into mailrelay's server over STARTTLS."""

from __future__ import annotations

import smtplib

import pytest
import pytest_twisted
from twisted.internet import threads

from mailrelay.config import ServerConfig
from tests.support.delivery.postfix import PostfixRelay
from tests.support.relay import wait_until
from tests.support.smtp.certs import make_certs
from tests.support.smtp.fakes import RecordingSink, listen

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        __import__("shutil").which("postfix") is None
        and not __import__("os").path.exists("/usr/sbin/postfix"),
        reason="needs postfix",
    ),
]


@pytest_twisted.inlineCallbacks
def test_postfix_relays_into_mailrelay_over_starttls(tmp_path):
    ca, cert, key = make_certs(tmp_path)
    config = ServerConfig(
        hostname="mx.example.test",
        local_domains=("example.test",),
        trusted_networks=(),
        tls_certificate=str(cert),
        tls_key=str(key),
    )
    sink = RecordingSink()
    _, listening = listen(config, sink)
    port = yield listening
    postfix = PostfixRelay(port.getHost().port)
    with open(postfix.etc / "main.cf", "a") as f:  # its smtp client must use STARTTLS to reach us
        f.write("smtp_tls_security_level = encrypt\nsmtp_tls_loglevel = 1\n")
    body = (
        b"Subject: via postfix\r\nMessage-ID: <pf1@example.org>\r\n\r\n.dot line\r\n"
        + b"x" * 900
        + b"\r\n"
    )
    try:
        yield threads.deferToThread(postfix.start)

        def send():
            with smtplib.SMTP("127.0.0.1", postfix.port, timeout=20) as s:
                s.sendmail("sender@example.org", ["user@example.test"], body)

        yield threads.deferToThread(send)
        yield wait_until(lambda: sink.committed, 15)
        log = postfix.log()
    finally:
        yield threads.deferToThread(postfix.stop)
        yield port.stopListening()
    assert sink.committed, log
    w = sink.committed[0]
    assert w.envelope.protocol == "ESMTPS"
    assert [r.address for r in w.envelope.recipients] == ["user@example.test"]
    received = w.data.split(b"\r\n\r\n")[0]
    assert received.startswith(
        b"Received: from postfix.mailrelay.test ([127.0.0.1])\r\n\t(using TLSv1."
    )
    assert w.data.endswith(b"\r\n\r\n.dot line\r\n" + b"x" * 900 + b"\r\n")
    assert "TLS connection established to 127.0.0.1" in log


@pytest_twisted.inlineCallbacks
def test_hop_count_and_a_leading_continuation_line_as_postfix_has_them(tmp_path):
    """The same messages to a real Postfix (hopcount_limit = 50) and to us: the same verdicts on
    48 and 49 Received headers (and on 60 Delivered-To, which do not count), and the same empty
    line after the trace header when the text begins with whitespace."""
    config = ServerConfig(hostname="mx.example.test", local_domains=("example.test",))
    sink = RecordingSink()
    _, listening = listen(config, sink)
    port = yield listening
    postfix = PostfixRelay(port.getHost().port)
    hops = [
        b"".join(
            b"Received: from h%d by h%d; Mon, 7 Dec 2026 10:00:00 +0000\r\n" % (i, i)
            for i in range(n)
        )
        + b"Subject: %d hops\r\n\r\nbody\r\n" % n
        for n in (48, 49)
    ]
    hops.append(
        b"Delivered-To: someone@example.test\r\n" * 60 + b"Subject: not counted\r\n\r\nbody\r\n"
    )
    forged = (
        b" by trusted-gateway.example with ESMTPS id X;\r\n"
        b"\tMon, 7 Dec 2026 10:00:00 +0000\r\nbody\r\n"
    )

    def verdicts(smtp_port: int) -> list[int]:
        codes = []
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=20) as s:
            for message in hops:
                try:
                    s.sendmail("sender@example.org", ["user@example.test"], message)
                    codes.append(250)
                except smtplib.SMTPDataError as e:
                    codes.append(e.smtp_code)
                    s.rset()
        return codes

    try:
        yield threads.deferToThread(postfix.start)
        theirs = yield threads.deferToThread(verdicts, postfix.port)
        ours = yield threads.deferToThread(verdicts, port.getHost().port)

        def send_forged(smtp_port: int) -> None:
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=20) as s:
                s.sendmail("sender@example.org", ["user@example.test"], forged)

        yield threads.deferToThread(send_forged, postfix.port)
        yield threads.deferToThread(send_forged, port.getHost().port)
        # Postfix relays it to us
        yield wait_until(lambda: sum(w.data.endswith(forged) for w in sink.committed) == 2, 15)
        log = postfix.log()
    finally:
        yield threads.deferToThread(postfix.stop)
        yield port.stopListening()
    assert theirs == ours == [250, 554, 250]
    received = [w.data for w in sink.committed if w.data.endswith(forged)]
    assert (
        len(received) == 2 and sum(b"by postfix.mailrelay.test" in data for data in received) == 1
    ), log
    for (
        data
    ) in received:  # Postfix's trace (then ours), and ours alone: each ends before an empty line
        trace = data[: -len(forged)]
        assert trace.endswith(b"\r\n\r\n") and b"trusted-gateway" not in trace
