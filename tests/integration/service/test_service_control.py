"""A real ``twistd mailrelay`` opens its control channel: ``mailrelay queue`` reaches it, and after
the next hop comes up, ``queue flush`` delivers at once instead of at the next retry."""

from __future__ import annotations

import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.peers import SMTPSink, free_port
from tests.support.relay import RelayProcess
from tests.support.reliability.helpers import route_to

pytestmark = pytest.mark.integration

MAILRELAY = str(Path(sys.executable).parent / "mailrelay")


def queue(relay: RelayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MAILRELAY, "queue", *args, "--config", str(relay.config)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_queue_cli_talks_to_a_running_twistd_relay():
    sink_port = free_port()
    relay = RelayProcess('[queue]\nretry_schedule = ["1h"]\n' + route_to(sink_port)).start()
    sink = None
    try:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=20) as client:
            client.sendmail("a@example.org", ["b@example.test"], b"Subject: waiting\r\n\r\nhi\r\n")
        relay.wait_log("status=deferred")
        (relay.spool / "control.sock").stat()
        listed = queue(relay, "list")
        assert listed.returncode == 0, listed.stderr
        assert "b@example.test" in listed.stdout
        sink = SMTPSink(port=sink_port).start()
        flushed = queue(relay, "flush")
        assert flushed.returncode == 0 and "flushed 1 message" in flushed.stdout, flushed
        sink.wait_for(1, 20)
        assert relay.stop() == 0
        assert not (relay.spool / "control.sock").exists()  # removed on a clean stop
    finally:
        relay.cleanup()
        if sink is not None:
            sink.stop()
