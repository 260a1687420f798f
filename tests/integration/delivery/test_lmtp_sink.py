"""LMTP delivery through a real relay to Postfix's ``smtp-sink -L``: one reply per recipient after
the final dot, in step over one cached connection. (In memory: tests/unit/delivery/test_lmtp.py.)"""

from __future__ import annotations

import smtplib

import pytest

from tests.support.peers import SMTPSink
from tests.support.relay import RelayProcess
from tests.support.reliability.helpers import route_to


@pytest.mark.integration
def test_relay_delivers_over_lmtp_to_smtp_sink():
    sink = SMTPSink(flags=["-L"]).start()
    relay = RelayProcess(route_to(sink.port, route_extra='protocol = "lmtp"')).start()
    try:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=20) as client:
            for i in range(3):  # over one cached LMTP connection: the replies must stay in step
                client.sendmail(
                    "a@example.org",
                    ["u1@example.test", "u2@example.test", "u3@example.test"],
                    f"Subject: lmtp {i}\r\n\r\nhello\r\n".encode(),
                )
        sink.wait_for(3)
        relay.wait_log("status=sent")
        import time

        deadline = time.monotonic() + 20
        while relay.log_text().count("status=sent") < 9 and time.monotonic() < deadline:
            time.sleep(0.05)
        log = relay.log_text()
        assert log.count("status=sent") == 9, log[-3000:]
        assert "status=deferred" not in log
        assert {tuple(t.recipients) for t in sink.transactions()} == {
            ("u1@example.test", "u2@example.test", "u3@example.test")
        }
        assert relay.stop() == 0
    finally:
        relay.cleanup()
        sink.stop()
