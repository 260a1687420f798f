"""MX routing through a real relay: NSD answers, smtp-sinks stand in for the MX hosts.

Every MX host of the zone is on 127.0.0.x / ::1, so one port serves them all: a sink on
127.0.0.1 is mx1, a sink on 127.0.0.2 is mx2, and nothing listens on 127.0.0.3 (dead.fallback.test).
"""

from __future__ import annotations

import smtplib
import time

import pytest

from tests.support.peers import SMTPSink
from tests.support.relay import RelayProcess
from tests.support.routing.nsd import NSD

pytestmark = pytest.mark.integration


def received(sink: SMTPSink) -> list[str]:
    return sorted(r for t in sink.transactions() for r in t.recipients)


def test_each_domain_reaches_its_mx_and_a_refusing_first_mx_falls_back_to_the_second(
    nsd: NSD,
) -> None:
    mx1 = SMTPSink(host="127.0.0.1").start()
    mx2 = SMTPSink(host="127.0.0.2", port=mx1.port).start()
    relay = RelayProcess(f"""
[[routes]]
type = "mx"
nameservers = ["127.0.0.1:{nsd.port}"]
port = {mx1.port}
""")
    try:
        relay.start()
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            client.sendmail(
                "s@example.test",  # bounces go to example.test's MX: mx1
                [
                    "a@example.test",  # MX 10 mx1 (127.0.0.1), 20 mx2, 30 mx3
                    "b@other.test",  # MX 10 mx2 (127.0.0.2)
                    "c@fallback.test",  # MX 10 dead (127.0.0.3: refused), 20 mx1
                    "d@cnamemx.test",  # MX 10 alias → CNAME mx1
                    "e@nomx.test",  # no MX: its own A, 127.0.0.2
                    "f@nullmx.test",  # null MX: never delivered, bounced at once
                    "g@nxdomain.test",
                ],  # no such domain: bounced at once
                b"Subject: mx\r\n\r\nvia DNS\r\n",
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(received(mx1)) + len(received(mx2)) < 6:
            time.sleep(0.05)
        delivered = [t for t in mx1.transactions() + mx2.transactions() if t.sender]
        assert all(t.data.endswith(b"\r\nvia DNS\r\n") for t in delivered)
        assert received(mx2) == ["b@other.test", "e@nomx.test"]
        assert received(mx1) == [
            "a@example.test",
            "c@fallback.test",
            "d@cnamemx.test",
            "s@example.test",
        ]
        (bounce,) = [t for t in mx1.transactions() if not t.sender]
        assert b"Final-Recipient: rfc822; f@nullmx.test" in bounce.data
        assert b"Status: 5.1.10" in bounce.data and b"Status: 5.1.2" in bounce.data
    finally:
        relay.cleanup()
        for sink in (mx1, mx2):
            sink.cleanup()
