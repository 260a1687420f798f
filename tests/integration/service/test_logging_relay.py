"""Logs of a real relay: a line per connection, per accepted message and per delivery attempt;
``--log-format json`` gives one JSON object per line; credentials never appear, in either format;
Twisted's start/stop chatter stays out of the default log. (The observers alone:
tests/unit/service/test_logging.py.)"""

from __future__ import annotations

import base64
import json

import pytest

from mailrelay.smtp.auth import hash_password
from tests.support.relay import RelayProcess
from tests.support.reliability.helpers import Raw, route_to, stuff

PASSWORD = "Corr3ct-h0rse-battery"
WRONG = "Wr0ng-guess-staple"


def run_relay(tmp_path, sink, log_format: str) -> RelayProcess:
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password(PASSWORD, iterations=1000)}\n")
    body = f'[server]\nauth_password_file = "{users}"\nallow_plaintext_auth = true\n' + route_to(
        sink.port
    )
    relay = RelayProcess(body, args=["--log-format", log_format]).start()
    try:
        with Raw(relay.port) as c:
            c.greet()
            wrong = base64.b64encode(f"\0alice\0{WRONG}".encode()).decode()
            assert c.cmd(f"AUTH PLAIN {wrong}").startswith(b"535")
            right = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
            assert c.cmd(f"AUTH PLAIN {right}").startswith(b"235")
            assert c.cmd("MAIL FROM:<sender@example.org>").startswith(b"250")
            assert c.cmd("RCPT TO:<rcpt@example.test>").startswith(b"250")
            assert c.cmd("DATA").startswith(b"354")
            c.send(stuff(b"Subject: logged\r\n\r\nhello\r\n"))
            reply = c.reply()
            assert reply.startswith(b"250"), reply
            assert c.cmd("QUIT").startswith(b"221")
        sink.wait_for(1)
        relay.wait_log("status=sent")
        assert relay.stop() == 0
    except BaseException:
        relay.cleanup()
        raise
    return relay


def assert_no_credentials(text: str) -> None:
    for secret in (PASSWORD, WRONG):
        assert secret not in text
        assert base64.b64encode(f"\0alice\0{secret}".encode()).decode() not in text


@pytest.mark.integration
def test_text_log_has_a_line_per_connection_message_and_attempt_and_no_credentials(
    tmp_path, smtp_sink
):
    relay = run_relay(tmp_path, smtp_sink, "text")
    try:
        text = relay.log_text()
        assert "disconnect from [127.0.0.1]" in text
        assert "from=<sender@example.org> size=" in text and "sasl_username=alice" in text
        assert "to=<rcpt@example.test>" in text and "status=sent" in text
        assert_no_credentials(text)
    finally:
        relay.cleanup()


@pytest.mark.integration
def test_json_log_format_is_one_object_per_line_with_the_fields(tmp_path, smtp_sink):
    relay = run_relay(tmp_path, smtp_sink, "json")
    try:
        text = relay.log_text()
        assert_no_credentials(text)
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        assert records and all({"time", "level", "namespace", "text"} <= r.keys() for r in records)
        accepted = [r for r in records if r.get("sender") == "sender@example.org"]
        assert len(accepted) == 1
        queue_id = accepted[0]["queue_id"]
        assert accepted[0]["size"] > 0 and accepted[0]["ip"] == "127.0.0.1"
        sent = [r for r in records if r.get("queue_id") == queue_id and r.get("status") == "sent"]
        assert len(sent) == 1 and sent[0]["rcpt"] == "rcpt@example.test"
        assert any(r["text"].startswith("disconnect from [127.0.0.1]") for r in records)
        assert any("SIGTERM: stopping" in r["text"] for r in records)
    finally:
        relay.cleanup()


CHATTER = (
    "Starting factory",
    "Stopping factory",
    "Starting protocol",
    "Stopping protocol",
    "connection established",
    "connection lost",
    "DatagramProtocol",
    "UDP Port",
    "GET /metrics",
)


@pytest.mark.integration
def test_default_log_has_no_twisted_start_stop_lines(tmp_path, smtp_sink):
    """Twisted's per-factory and per-protocol lines (each outbound connection, each DNS query, each
    ``mailrelay queue`` command, each metrics scrape) stay out of the default log."""
    import smtplib
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    from tests.support.peers import free_port
    from tests.support.routing.nsd import NSD

    nsd = NSD().start()
    metrics = free_port()
    relay = RelayProcess(
        f'[metrics]\nlisten = "tcp:{metrics}:interface=127.0.0.1"\n[[routes]]\ntype = '
        f'"mx"\nnameservers = ["127.0.0.1:{nsd.port}"]\nport = '
        f"{smtp_sink.port}\n"
    )
    try:
        relay.start()
        with smtplib.SMTP("127.0.0.1", relay.port) as client:
            client.sendmail("s@example.org", ["r@example.test"], b"Subject: quiet\r\n\r\nhello\r\n")
        smtp_sink.wait_for(1)
        relay.wait_log("status=sent")
        listed = subprocess.run(
            [
                str(Path(sys.executable).with_name("mailrelay")),
                "queue",
                "list",
                "--config",
                str(relay.config),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as page:
            assert b"mailrelay_messages_accepted_total" in page.read()
        assert relay.stop() == 0
        text = relay.log_text()
        assert "status=sent" in text and "mailrelay stopped" in text
        assert [line for line in text.splitlines() if any(c in line for c in CHATTER)] == []
    finally:
        relay.cleanup()
        nsd.cleanup()
