"""The real PostgreSQL of the test machine (127.0.0.1:5432, trust): started if down, one schema per
test.

Each test gets a fresh schema of a unique name and a DSN whose ``search_path`` points at it, and the
schema is dropped afterwards, so tests never see (or touch) each other's or anyone else's tables.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

psycopg = pytest.importorskip("psycopg")

HOST, PORT, DATABASE = "127.0.0.1", 5432, "test"
_USERS = ("postgres", "root")


def _base_dsn(user: str) -> str:
    return f"host={HOST} port={PORT} dbname={DATABASE} user={user} connect_timeout=3"


def _try_connect() -> str | None:
    for user in _USERS:
        try:
            psycopg.connect(_base_dsn(user)).close()
            return _base_dsn(user)
        except psycopg.OperationalError:
            continue
    return None


def server_dsn() -> str:
    """A DSN of the server (starting the cluster if it is installed but down); skips without one."""
    dsn = _try_connect()
    if dsn is not None:
        return dsn
    if not os.path.isdir("/etc/postgresql") or not shutil.which("pg_ctlcluster"):
        pytest.skip("PostgreSQL is not installed")
    for version in os.listdir("/etc/postgresql"):
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
            check=False,
            capture_output=True,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        dsn = _try_connect()
        if dsn is not None:
            return dsn
        time.sleep(0.3)
    pytest.fail("PostgreSQL is installed but would not start")


def schema_dsn(base: str, schema: str) -> str:
    return f"{base} options='-csearch_path={schema}'"


@contextmanager
def temp_schema(prefix: str = "mr_test") -> Iterator[str]:
    """A DSN on a brand-new schema, dropped (with everything in it) at the end."""
    base = server_dsn()
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield schema_dsn(base, schema)
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
