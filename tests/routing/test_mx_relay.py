"""MX routing through a real relay: NSD answers, the first MX refuses, the second one gets the mail."""

from __future__ import annotations

import smtplib

import pytest

from tests.peers import SMTPSink
from tests.relay import RelayProcess
from tests.routing.nsd import NSD

pytestmark = pytest.mark.integration


def test_connection_refused_on_the_first_mx_then_the_second_mx_delivers(nsd: NSD, smtp_sink: SMTPSink) -> None:
    # fallback.test: MX 10 dead.fallback.test (127.0.0.3, nothing listens), MX 20 mx1 (127.0.0.1, ::1)
    relay = RelayProcess(f"""
[[routes]]
type = "mx"
nameservers = ["127.0.0.1:{nsd.port}"]
port = {smtp_sink.port}
""").start()
    try:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            client.sendmail("s@example.org", ["a@fallback.test", "b@cnamemx.test"],
                            b"Subject: mx\r\n\r\nvia DNS\r\n")
        smtp_sink.wait_for(1)
        transactions = smtp_sink.transactions()
        recipients = sorted(r for t in transactions for r in t.recipients)
        assert recipients == ["a@fallback.test", "b@cnamemx.test"]
        assert all(t.data.endswith(b"\r\nvia DNS\r\n") for t in transactions)
    finally:
        relay.cleanup()
