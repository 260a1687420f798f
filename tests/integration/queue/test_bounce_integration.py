"""A real relay bounces: smtp-sink refuses the recipient with a 5xx; the sender's domain is routed
to a second sink, where the RFC 3464 report arrives from <> and parses back with ``email``."""

from __future__ import annotations

import email
import email.policy
import smtplib

import pytest

from tests.support.peers import SMTPSink
from tests.support.relay import RelayProcess

pytestmark = pytest.mark.integration


def test_a_refused_recipient_is_bounced_to_the_sender_through_the_queue():
    refusing = SMTPSink(flags=["-f", "RCPT"], dump=False).start()
    senders = SMTPSink().start()
    relay = RelayProcess(
        f'[[routes]]\ntype = "static"\ndomains = ["example.test"]\n'
        f'hosts = ["127.0.0.1:{refusing.port}"]\n'
        f'[[routes]]\ntype = "static"\ndomains = ["example.org"]\n'
        f'hosts = ["127.0.0.1:{senders.port}"]\n'
    ).start()
    try:
        with smtplib.SMTP("127.0.0.1", relay.port) as client:
            client.ehlo("client.example.org")
            client.mail("alice@example.org")
            client.rcpt("bob@example.test")
            client.data(
                b"From: alice@example.org\r\nSubject: hello bob\r\n"
                b"Message-ID: <hb@example.org>\r\n\r\nhi\r\n"
            )
        senders.wait_for(1, timeout=30)
        relay.wait_log("status=bounced")
        relay.wait_log("sender non-delivery notification")
        (t,) = senders.transactions()
        assert t.sender == "" and t.recipients == ["alice@example.org"]
        report = email.message_from_bytes(t.data, policy=email.policy.default)
        assert report.get_content_type() == "multipart/report"
        human, status, original = report.get_payload()
        blocks = status.get_payload()
        assert blocks[0]["Reporting-MTA"] == f"dns; {relay.hostname}"
        assert blocks[1]["Final-Recipient"] == "rfc822; bob@example.test"
        assert blocks[1]["Action"] == "failed" and blocks[1]["Status"].startswith("5.")
        assert blocks[1]["Diagnostic-Code"].startswith("smtp; 5")
        assert original.get_payload()[0]["Message-ID"] == "<hb@example.org>"
    finally:
        relay.cleanup()
        refusing.stop()
        senders.stop()
