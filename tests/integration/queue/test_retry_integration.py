"""A real relay against a real smtp-sink that answers 4xx (or hangs up) first and 250 later: the
message is deferred — logged Postfix-style — retried, and delivered once; never bounced early."""

from __future__ import annotations

import re

import pytest

from tests.support.peers import SMTPSink, free_port
from tests.support.relay import RelayProcess

pytestmark = pytest.mark.integration

BODY = (
    b"From: s@example.org\r\nSubject: retried\r\nMessage-ID: <retry@example.org>\r\n\r\nagain and "
    b"again\r\n"
)


@pytest.mark.parametrize(
    "flags",
    [["-r", "RCPT"], ["-q", "DATA"], ["-Q", "MAIL"]],
    ids=["450-at-RCPT", "hangup-after-DATA", "421-at-MAIL"],
)
def test_temporary_trouble_is_retried_then_delivered_once(flags):
    import smtplib

    port = free_port()
    bad = SMTPSink(port=port, flags=flags, dump=False).start()
    relay = RelayProcess(
        f'[queue]\nretry_schedule = ["1s"]\n[[routes]]\ntype = "static"\ndomains = ["*"]\n'
        f'hosts = ["127.0.0.1:{port}"]\n'
    ).start()
    good = None
    try:
        with smtplib.SMTP("127.0.0.1", relay.port) as client:
            client.sendmail("s@example.org", ["r@example.test"], BODY)
        relay.wait_log("status=deferred")
        line = next(x for x in relay.log_text().splitlines() if "status=deferred" in x)
        assert re.search(
            r"[0-9A-Z]{18}: to=<r@example.test>, relay=\S+, delay=[\d.]+, delays=[\d.]+, "
            r"dsn=4\.\d+\.\d+, status=deferred \(4\d\d",
            line,
        ), line
        bad.stop()
        good = SMTPSink(port=port).start()
        good.wait_for(1, timeout=30)
        relay.wait_log("status=sent")
        assert good.transactions()[0].recipients == ["r@example.test"]
        assert "status=bounced" not in relay.log_text()
    finally:
        relay.cleanup()
        bad.stop()
        if good is not None:
            good.stop()
    assert len(good.messages()) == 1
