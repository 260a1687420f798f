"""Disk full under a running relay: its spool on a 2 MiB tmpfs mounted by the test.

A message that cannot be stored gets 452 4.3.1 (never a 250), nothing half-written stays behind,
the process keeps serving (the same session goes on), and once there is room again mail is
accepted and delivered.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.relay import RelayProcess
from tests.support.reliability.helpers import Raw, route_to, stuff, wait_for_ids

pytestmark = pytest.mark.integration


def send(c: Raw, mid: str, size: int = 0) -> bytes:
    assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
    assert c.cmd("RCPT TO:<b@example.test>").startswith(b"250")
    assert c.cmd("DATA").startswith(b"354")
    text = f"Message-ID: <{mid}>\r\nSubject: disk\r\n\r\n".encode() + (b"y" * 998 + b"\r\n") * (
        size // 1000
    )
    c.send(stuff(text + b"end\r\n"))
    return c.reply()


def fill(path: Path) -> int:
    """Write until the file system is full; returns the octets written."""
    n = 0
    with open(path, "wb", buffering=0) as f:
        for block in (65536, 4096, 1):
            try:
                while True:
                    n += f.write(b"b" * block)
            except OSError:
                pass
    return n


def test_disk_full_gives_452_and_the_relay_recovers_when_space_returns(sinks):
    sink = sinks()
    relay = RelayProcess(route_to(sink.port))
    relay.spool.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(relay.spool)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        shutil.rmtree(relay.dir, ignore_errors=True)
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        relay.start()
        with Raw(relay.port) as c:
            c.greet()
            too_big = send(c, "big@disk.test", size=3 * 1024 * 1024)  # more than the whole disk
            assert too_big.startswith(b"452 4.3.1"), too_big
            assert c.cmd("NOOP").startswith(b"250")
            ballast = relay.spool / "ballast"
            filled = fill(ballast)
            full = [send(c, f"full{i}@disk.test") for i in range(3)]
            assert all(r.startswith(b"452 4.3.1") for r in full), full
            assert c.cmd("NOOP").startswith(b"250")
            leftovers = [p.name for p in relay.spool.rglob("*") if p.is_file() and p != ballast]
            assert leftovers == [] or all(p.endswith(".sock") for p in leftovers), leftovers
            assert relay.proc is not None and relay.proc.poll() is None
            os.unlink(ballast)
            ok = send(c, "after@disk.test")
            assert ok.startswith(b"250 2.0.0"), ok
        with Raw(relay.port) as c2:  # and a new session is served as usual
            c2.greet()
            assert send(c2, "second@disk.test").startswith(b"250 2.0.0")
        got = wait_for_ids(sink, ["<after@disk.test>", "<second@disk.test>"], timeout=20)
        print(
            f"\ndisk full: 3 MiB message on a 2 MiB spool → {too_big.decode().strip()}; disk "
            f"filled "
            f"({filled} octets of ballast) → 3 × {full[0].decode().strip()}; space freed → "
            f"{ok.decode().strip()}; delivered {dict(got)}"
        )
        assert got == {"<after@disk.test>": 1, "<second@disk.test>": 1}
    finally:
        relay.stop()
        subprocess.run(["umount", "-l", str(relay.spool)], check=False)
        shutil.rmtree(relay.dir, ignore_errors=True)
