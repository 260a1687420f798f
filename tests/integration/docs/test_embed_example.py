"""examples/embed.py runs: its own web page and a relay in one process; mail flows; SIGTERM exits
0."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support.peers import free_port, wait_listening

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "embed.py"


def test_embed_example_serves_its_page_and_relays_mail(tmp_path, smtp_sink):
    smtp_port, web_port = free_port(), free_port()
    cfg = tmp_path / "relay.toml"
    cfg.write_text(
        f'[server]\nhostname = "embed.mailrelay.test"\nlisten = '
        f'["tcp:{smtp_port}:interface=127.0.0.1"]\n[spool]\npath = '
        f'"{tmp_path / "spool"}"\n[[routes]]\ntype = "static"\ndomains = ["*"]\nhosts = '
        f'["127.0.0.1:{smtp_sink.port}"]\n'
    )
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), str(cfg), f"tcp:{web_port}:interface=127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_listening("127.0.0.1", smtp_port, proc=proc)
        wait_listening("127.0.0.1", web_port, proc=proc)
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=20) as client:
            client.sendmail("a@example.org", ["b@example.test"], b"Subject: embedded\r\n\r\nhi\r\n")
        smtp_sink.wait_for(1)
        assert b"by embed.mailrelay.test" in smtp_sink.messages()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/", timeout=10) as response:
            page = response.read().decode()
        assert "mailrelay embedded in my program" in page
        assert "accepted: 1" in page
        assert "from=<a@example.org>" in page  # our own observer saw the message
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode(errors="replace")
        # the relay's log reaches the program's stdout, as docs/embedding.rst says
        assert b"from=<a@example.org>" in out and b"status=sent" in out, out.decode(
            errors="replace"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
