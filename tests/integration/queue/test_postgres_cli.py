"""``mailrelay db upgrade`` and ``mailrelay queue ...`` against the shared PostgreSQL queue (real
console script, real server, a schema of the test's own)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from mailrelay.envelope import Envelope, Recipient
from mailrelay.queue.postgres import schema as pg_schema
from tests.support.pgserver import psycopg, temp_schema

pytestmark = pytest.mark.integration

MAILRELAY = str(Path(sys.executable).parent / "mailrelay")


@pytest.fixture
def config(tmp_path):
    with temp_schema() as dsn:
        path = tmp_path / "mailrelay.toml"
        path.write_text(
            f'[server]\nhostname = "cli.mailrelay.test"\n\n[spool]\npath = "{tmp_path / "spool"}"\n'
            f'backend = "postgresql"\ndsn = "{dsn}"\n'
        )
        yield str(path), dsn


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MAILRELAY, *args], capture_output=True, text=True, timeout=60)


def test_db_upgrade_creates_the_schema_once(config):
    path, dsn = config
    first = cli("db", "upgrade", "--config", path)
    assert first.returncode == 0, first.stderr
    assert f"from version 0 to {pg_schema.LATEST}" in first.stdout
    again = cli("db", "upgrade", "--config", path)
    assert again.returncode == 0
    assert f"already at version {pg_schema.LATEST}" in again.stdout
    with psycopg.connect(dsn) as conn:
        assert pg_schema.current_version(conn) == pg_schema.LATEST


def test_db_upgrade_refuses_a_filesystem_config(tmp_path):
    path = tmp_path / "fs.toml"
    path.write_text(f'[server]\nhostname = "x.test"\n[spool]\npath = "{tmp_path}"\n')
    r = cli("db", "upgrade", "--config", str(path))
    assert r.returncode == 1
    assert "no database to upgrade" in r.stderr
    assert "Traceback" not in r.stderr


def test_db_upgrade_reports_an_unreachable_database_in_one_line(tmp_path):
    from tests.support.peers import free_port

    path = tmp_path / "down.toml"
    path.write_text(
        f'[server]\nhostname = "x.test"\n[spool]\npath = "{tmp_path}"\nbackend = "postgresql"\n'
        f'dsn = "host=127.0.0.1 port={free_port()} dbname=test connect_timeout=2"\n'
    )
    r = cli("db", "upgrade", "--config", str(path))
    assert r.returncode == 1
    assert r.stderr.startswith("mailrelay: ") and "Traceback" not in r.stderr


@pytest_twisted.inlineCallbacks
def test_queue_commands_read_and_edit_the_shared_queue_with_no_instance_running(config, tmp_path):
    from mailrelay.queue.postgres import PostgresStore

    path, dsn = config
    store = PostgresStore(dsn, reactor, cache_dir=str(tmp_path / "cache"))
    store.start()
    try:
        w = store.open(
            Envelope("from@example.org", (Recipient("to@dest.test"),), received_at=1700000000.0)
        )
        w.write(b"Subject: shared queue\r\n\r\nhello\r\n")
        qid = yield w.commit()
    finally:
        yield store.stop()
    listed = cli("queue", "list", "--json", "--config", path)
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert entry["queue_id"] == qid
    shown = cli("queue", "show", qid, "--config", path)
    assert shown.returncode == 0, shown.stderr
    assert "Subject: shared queue" in shown.stdout and "to@dest.test" in shown.stdout
    with psycopg.connect(dsn) as conn:  # deferred: its next retry far away
        conn.execute("UPDATE mailrelay_message SET next_attempt = 4e9")
    flushed = cli("queue", "flush", qid, "--config", path)
    assert flushed.returncode == 0 and "flushed 1 message" in flushed.stdout, flushed.stderr
    with psycopg.connect(dsn) as conn:  # due now, for whichever node runs
        assert conn.execute("SELECT next_attempt FROM mailrelay_message").fetchone()[0] < 4e9
    assert cli("queue", "hold", qid, "--config", path).returncode == 0
    with psycopg.connect(dsn) as conn:
        assert conn.execute(
            "SELECT held FROM mailrelay_message WHERE queue_id = %s", (qid,)
        ).fetchone()[0]
    held = cli("queue", "flush", qid, "--config", path)
    assert held.returncode == 1 and "is held" in held.stderr
    with psycopg.connect(dsn, autocommit=True) as listener:  # a running node hears of the release
        schema = listener.execute("SELECT current_schema()").fetchone()[0]
        listener.execute(f'LISTEN "mailrelay_queue_{schema}"')
        assert cli("queue", "release", qid, "--config", path).returncode == 0
        heard = [n.payload for n in listener.notifies(timeout=10, stop_after=1)]
    assert heard == [f"cli {qid}"]
    with psycopg.connect(dsn) as conn:
        assert not conn.execute(
            "SELECT held FROM mailrelay_message WHERE queue_id = %s", (qid,)
        ).fetchone()[0]
    assert cli("queue", "delete", qid, "--config", path).returncode == 0
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM mailrelay_message").fetchone()[0] == 0
    missing = cli("queue", "show", qid, "--config", path)
    assert missing.returncode == 1 and "no such message" in missing.stderr
