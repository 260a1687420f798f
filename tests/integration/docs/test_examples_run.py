"""The config ``make run`` uses really starts a relay, and the README's recipe, run as written,
lands mail in var/mail. (The examples checked in memory:
tests/unit/docs/test_examples_config.py.)"""

from __future__ import annotations

import shlex
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.docs import MAKE_RUN_CONFIG, ROOT, recipe
from tests.support.peers import free_port, wait_listening

TWISTD = Path(sys.executable).parent / "twistd"


@contextmanager
def make_run(conf: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """``make run``'s command with ``conf``, in its directory (log: twistd.log there), listening on
    ``port`` (else the test fails with the log); stopped by SIGTERM, else SIGKILL, when the block
    ends."""
    log_path = conf.parent / "twistd.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [str(TWISTD), "-n", "--pidfile=", "mailrelay", "--config", str(conf)],
        cwd=conf.parent,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        try:
            wait_listening("127.0.0.1", port, timeout=20, proc=proc)
        except (RuntimeError, TimeoutError) as e:
            log.flush()
            pytest.fail(f"{e}\n{log_path.read_text(errors='replace')}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


@pytest.mark.integration
def test_make_run_config_starts(tmp_path: Path) -> None:
    """``make run``'s command with the example (on a free port, spool in a temp dir)
    answers EHLO, and SIGTERM stops it cleanly."""
    text = MAKE_RUN_CONFIG.read_text()
    port = free_port()
    spool = tmp_path / "spool"
    for old, new in [
        ("tcp:2525:interface=127.0.0.1", f"tcp:{port}:interface=127.0.0.1"),
        ('path = "var/spool"', f'path = "{spool}"'),
    ]:
        assert old in text, f"examples/mailrelay.toml no longer has {old!r}; update this test"
        text = text.replace(old, new)
    conf = tmp_path / "mailrelay.toml"
    conf.write_text(text)
    with make_run(conf, port) as proc:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            code, text_reply = client.ehlo("client.example.org")
            assert code == 250, text_reply
            lines = text_reply.decode().splitlines()
            assert lines[0].startswith("relay.example.test")
            assert {"PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"} <= {
                x.split()[0] for x in lines[1:]
            }
            assert client.noop()[0] == 250
        assert spool.is_dir()
        proc.send_signal(signal.SIGTERM)
        # twistd stops the reactor cleanly, then re-raises the signal so that its exit status tells
        # how it ended (twisted.scripts.twistd.runApp): -SIGTERM is the clean ending, like 0.
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    output = (tmp_path / "twistd.log").read_text(errors="replace")
    assert "Traceback" not in output, output
    assert "Main loop terminated." in output and "Server Shut Down." in output, output


@pytest.mark.integration
def test_readme_recipe_lands_in_var_mail(tmp_path: Path) -> None:
    """The README's recipe as a new user runs it: ``make run``'s command with the example config (in
    a fresh directory, on a free port), the README's swaks command, and the message in
    var/mail/new."""
    port = free_port()
    text = MAKE_RUN_CONFIG.read_text()
    assert "tcp:2525:" in text
    conf = tmp_path / "mailrelay.toml"
    conf.write_text(text.replace("tcp:2525:", f"tcp:{port}:"))
    (tmp_path / "var").mkdir()  # as make run does
    with make_run(conf, port):
        command = recipe(ROOT / "README.md").replace("127.0.0.1:2525", f"127.0.0.1:{port}")
        sent = subprocess.run(shlex.split(command), cwd=tmp_path, capture_output=True, timeout=30)
        assert sent.returncode == 0, sent.stdout.decode(errors="replace")
        new = tmp_path / "var" / "mail" / "new"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (new.is_dir() and any(new.iterdir())):
            time.sleep(0.05)
        files = list(new.iterdir()) if new.is_dir() else []
        assert len(files) == 1, (tmp_path / "twistd.log").read_text(errors="replace")
        message = files[0].read_bytes()
        assert b"Delivered-To: you@demo.test\n" in message
        assert b"X-Mailer: swaks" in message
    assert "Traceback" not in (tmp_path / "twistd.log").read_text(errors="replace")
