"""The ``mailrelay queue`` commands against a running twistd instance (over its control socket)
and, once it has stopped, against its spool. (The CLI in process: tests/unit/cli/test_cli.py.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

MAILRELAY = str(Path(sys.executable).with_name("mailrelay"))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MAILRELAY, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.integration
def test_cli_against_a_running_twistd_instance_and_after_it_stops(tmp_path):
    import smtplib

    from tests.support.peers import free_port
    from tests.support.relay import RelayProcess

    dead = free_port()  # nothing listens there: every attempt is deferred
    relay = RelayProcess(
        f'[queue]\nretry_schedule = ["1h"]\n[[routes]]\ntype = "static"\ndomains = ["*"]\n'
        f'hosts = ["127.0.0.1:{dead}"]\n'
    ).start()
    try:
        with smtplib.SMTP("127.0.0.1", relay.port) as client:
            client.sendmail(
                "s@example.org", ["r@example.test"], b"Subject: stuck\r\n\r\nwaiting\r\n"
            )
            client.sendmail("s@example.org", ["q@example.test"], b"Subject: doomed\r\n\r\nbye\r\n")
        relay.wait_log("status=deferred")
        assert os.path.exists(relay.spool / "control.sock")
        listed = cli("queue", "list", "--config", str(relay.config))
        assert listed.returncode == 0, listed.stderr
        ids = re.findall(r"^([0-9A-Z]{18})[ !*]", listed.stdout, re.M)
        assert (
            len(ids) == 2
            and "r@example.test" in listed.stdout
            and "in 2 Requests." in listed.stdout
        )
        doomed = next(
            i
            for i in ids
            if "Subject: doomed" in cli("queue", "show", i, "--config", str(relay.config)).stdout
        )
        assert cli("queue", "delete", doomed, "--config", str(relay.config)).returncode == 0
        flushed = cli("queue", "flush", "--config", str(relay.config))
        assert flushed.returncode == 0 and "flushed 1 message" in flushed.stdout
    finally:
        relay.stop()
    # stopped: the spool is read directly
    offline_list = cli("queue", "list", "--config", str(relay.config))
    assert offline_list.returncode == 0 and "in 1 Request." in offline_list.stdout
    assert doomed not in offline_list.stdout
    relay.cleanup()
