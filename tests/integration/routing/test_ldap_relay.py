"""LDAP routing through a real relay: slapd + NSD + smtp-sink, twistd in a child process."""

from __future__ import annotations

import smtplib
import time

import pytest

from tests.support.peers import SMTPSink
from tests.support.relay import RelayProcess
from tests.support.routing.nsd import NSD
from tests.support.routing.slapd import BASE, BIND_DN, BIND_PASSWORD, Slapd

pytestmark = pytest.mark.integration


def relay_config(slapd: Slapd, nsd: NSD, sink: SMTPSink) -> str:
    return f"""[server]
local_domains = ["example.test", "example.net"]

[queue]
retry_schedule = ["1s"]

[[routes]]
type = "ldap"
uri = "{slapd.uri}"
bind_dn = "{BIND_DN}"
bind_password = "{BIND_PASSWORD}"
base = "{BASE}"
domains = ["example.test", "example.net", "example.org"]
missing = "reject"
nameservers = ["127.0.0.1:{nsd.port}"]
port = {sink.port}
positive_ttl = "0s"
negative_ttl = "0s"
timeout = "2s"
"""


def test_verified_at_rcpt_rewritten_routed_and_deferred_while_slapd_is_down(
    nsd: NSD, smtp_sink: SMTPSink
) -> None:
    slapd = Slapd().start()
    relay = RelayProcess(relay_config(slapd, nsd, smtp_sink))
    try:
        relay.start()
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            client.ehlo("client.example.org")
            client.mail("s@example.org")
            assert client.rcpt("nobody@example.test")[0] == 550  # not in the directory: refused now
            assert client.rcpt("alice@example.test")[0] == 250
            assert client.rcpt("whoever@example.net")[0] == 250  # the @example.net catch-all
            assert client.data(b"Subject: one\r\n\r\nfirst\r\n")[0] == 250
        transactions = smtp_sink.wait_for(1) and smtp_sink.transactions()
        while sum(len(t.recipients) for t in transactions) < 2:
            time.sleep(0.05)
            transactions = smtp_sink.transactions()
        # mailRoutingAddress rewrote both; mailHost mx1.example.test and example.test's MX lead to
        # the sink
        assert sorted(r for t in transactions for r in t.recipients) == [
            "alice@mailstore1.example.test",
            "postmaster@example.test",
        ]

        slapd.stop()
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            client.ehlo("client.example.org")
            client.mail("s@example.org")
            code, text = client.rcpt("bob@example.test")
            assert (code, text[:5]) == (451, b"4.4.3")  # cannot verify now: the client retries
            # dave@example.org is routed by LDAP too but not verified (not a local domain): queued
            assert client.rcpt("dave@example.org")[0] == 250
            assert client.data(b"Subject: two\r\n\r\nsecond\r\n")[0] == 250
        time.sleep(2.5)  # at least one retry while the directory is down
        assert "dave@example.org" not in [r for t in smtp_sink.transactions() for r in t.recipients]
        slapd.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if "dave@example.org" in [r for t in smtp_sink.transactions() for r in t.recipients]:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"dave's message was not delivered\n{relay.log_text()[-3000:]}")
    finally:
        relay.cleanup()
        slapd.cleanup()
