"""The shared PostgreSQL queue goes away under a running relay: a private cluster (initdb in a temp
dir, its own port) so the machine's shared server is never touched.

While the database is down no message is accepted unsaved (a 4xx, never a 250), the relay keeps
serving, and once the database is back mail is accepted and delivered again — each message once.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.peers import free_port
from tests.support.reliability.helpers import Raw, route_to, stuff, wait_for_ids

# initdb and connection timeouts make this ~30 s: it runs in make soak (the store-level "database
# down → 451" test of tests/integration/queue/test_postgres.py runs in make test)
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.soak]


class PrivatePostgres:
    """``initdb`` + ``pg_ctl`` as the postgres user, on a free port of 127.0.0.1, fsync off."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins or subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
            pytest.skip("PostgreSQL server binaries or the postgres user are missing")
        self.bin = Path(bins[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="mailrelay-pg-"))
        shutil.chown(self.dir, "postgres")
        self.port = free_port()
        self.dsn = (
            f"host=127.0.0.1 port={self.port} dbname=postgres user=postgres connect_timeout=3"
        )

    def _as_postgres(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["runuser", "-u", "postgres", "--", *args], capture_output=True, text=True, timeout=120
        )

    def init(self) -> PrivatePostgres:
        done = self._as_postgres(
            str(self.bin / "initdb"),
            "-D",
            str(self.dir / "data"),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        )
        if done.returncode != 0:
            pytest.skip(f"initdb failed: {done.stderr[-300:]}")
        return self

    def start(self) -> None:
        done = self._as_postgres(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.dir / "data"),
            "-l",
            str(self.dir / "log"),
            "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
            "-w",
            "start",
        )
        assert done.returncode == 0, (
            done.stderr + (self.dir / "log").read_text(errors="replace")[-2000:]
        )

    def stop(self) -> None:
        self._as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop"
        )

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def send(port: int, mid: str) -> bytes:
    with Raw(port) as c:
        c.greet()
        mail = c.cmd("MAIL FROM:<s@example.org>")
        if not mail.startswith(b"250"):
            return mail
        assert c.cmd("RCPT TO:<u@example.test>").startswith(b"250")
        data = c.cmd("DATA")
        if not data.startswith(b"354"):
            return data
        c.send(stuff(f"Message-ID: <{mid}>\r\n\r\nhello\r\n".encode()))
        final = c.reply()
        assert c.cmd("NOOP").startswith(b"250")  # the session survives either way
        return final


def test_database_down_never_accepts_unsaved_and_resumes(relays, sinks):
    pytest.importorskip("psycopg")
    pg = PrivatePostgres().init()
    try:
        pg.start()
        sink = sinks()
        # keys right after RelayProcess's own "[spool] path" line land in [spool]
        relay = relays(
            f'backend = "postgresql"\ndsn = "{pg.dsn}"\n[queue]\nretry_schedule = ["1s"]\n'
            + route_to(sink.port),
            start=False,
        )
        upgraded = subprocess.run(
            [
                str(Path(sys.executable).parent / "mailrelay"),
                "db",
                "upgrade",
                "--config",
                str(relay.config),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
        relay.start()
        assert send(relay.port, "before@pg.test").startswith(b"250 2.0.0")
        assert wait_for_ids(sink, ["<before@pg.test>"], timeout=20) == {"<before@pg.test>": 1}
        pg.stop()
        down = [send(relay.port, f"down{i}@pg.test") for i in range(3)]
        alive = relay.proc is not None and relay.proc.poll() is None
        pg.start()
        restarted_at = len(relay.log_text())
        deadline = time.monotonic() + 30
        after = send(relay.port, "after@pg.test")
        while not after.startswith(b"250") and time.monotonic() < deadline:  # reconnecting
            time.sleep(0.5)
            after = send(relay.port, "after@pg.test")
        accepted_down = [f"<down{i}@pg.test>" for i, r in enumerate(down) if r.startswith(b"250")]
        want = ["<before@pg.test>", "<after@pg.test>", *accepted_down]
        got = wait_for_ids(sink, want, timeout=30)
        log = relay.log_text()
    finally:
        pg.cleanup()
    print(
        f"\nPostgreSQL down: replies while down {[r.decode().strip()[:40] for r in down]}; relay "
        f"alive: {alive}; after it returned → {after.decode().strip()[:40]}; at the sink: "
        f"{dict(got)}"
    )
    assert alive
    assert all(r[:1] == b"4" for r in down), (
        down
    )  # never a 250 for a message the database did not keep
    assert after.startswith(b"250 2.0.0")
    assert got == {m: 1 for m in want}
    assert "status=bounced" not in log
    back = log[restarted_at:]  # a database that came back costs no failed call and no critical line
    assert "AdminShutdown" not in back and "critical" not in back, back
