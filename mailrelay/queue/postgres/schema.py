"""The PostgreSQL queue schema, versioned: migrations in order, recorded in a table of versions.

``upgrade(dsn)`` (``mailrelay db upgrade``) brings a database (the first schema on the
connection's ``search_path``) to the newest version; several nodes may run it at once (an advisory
lock serialises them). A database newer than this mailrelay is refused rather than written with an
old idea of the tables. ``Preparation`` does the same once per process for a running store, and
names the schema's notification channel.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import psycopg
from twisted.logger import Logger

log = Logger()

#: The migrations, in order: version N is MIGRATIONS[N - 1]. Append; never edit a released one.
MIGRATIONS: Sequence[Sequence[str]] = (
    (
        # One row per queued message: its state (store.message_to_dict as JSON text) plus the
        # columns the scheduler and the leases query by.
        """CREATE TABLE mailrelay_message (
            queue_id text PRIMARY KEY,
            state text NOT NULL,
            next_attempt double precision NOT NULL DEFAULT 0,
            held boolean NOT NULL DEFAULT false,
            body_size bigint NOT NULL,
            lease_owner text,
            lease_until double precision,
            committed_at timestamptz NOT NULL DEFAULT now()
        )""",
        "CREATE INDEX mailrelay_message_due ON mailrelay_message (next_attempt) WHERE NOT held",
        # The body in chunks, streamed in and out; gone with its message.
        """CREATE TABLE mailrelay_body (
            queue_id text NOT NULL REFERENCES mailrelay_message ON DELETE CASCADE,
            seq integer NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (queue_id, seq)
        )""",
    ),
)

LATEST = len(MIGRATIONS)
_LOCK = 0x6D61696C72656C  # pg_advisory_xact_lock key: "mailrel"


class SchemaError(Exception):
    """The database's schema cannot be used by this mailrelay (too new, or not created)."""


def current_version(conn: psycopg.Connection) -> int:
    """The schema version of the connection's database, 0 when mailrelay's tables do not exist."""
    row = conn.execute("SELECT to_regclass('mailrelay_schema_version') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    row = conn.execute("SELECT max(version) FROM mailrelay_schema_version").fetchone()
    return int(row[0] or 0) if row else 0


def upgrade_connection(conn: psycopg.Connection) -> tuple[int, int]:
    """Apply the missing migrations in one transaction on ``conn``: ``(from, to)`` versions."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS mailrelay_schema_version ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        before = current_version(conn)
        if before > LATEST:
            raise SchemaError(
                f"database schema version {before} is newer than this mailrelay ({LATEST})"
            )
        for version in range(before + 1, LATEST + 1):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO mailrelay_schema_version (version) VALUES (%s)", (version,))
    return before, LATEST


def upgrade(dsn: str) -> tuple[int, int]:
    """Create or migrate mailrelay's tables in the database of ``dsn``: ``(from, to)`` versions."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return upgrade_connection(conn)


def check(conn: psycopg.Connection) -> None:
    """Raise ``SchemaError`` unless the database is at exactly this mailrelay's version."""
    version = current_version(conn)
    if version != LATEST:
        raise SchemaError(
            f"database schema version {version}, this mailrelay needs {LATEST}:"
            " run 'mailrelay db upgrade --config FILE'"
        )


def channel_name(conn: psycopg.Connection) -> str:
    """The ``NOTIFY`` channel of the connection's schema: two queues in one database (two schemas)
    never wake each other."""
    row = conn.execute("SELECT current_schema()").fetchone()
    return f"mailrelay_queue_{row[0] if row else 'public'}"[:63]


class Preparation:
    """Once per process, before this store's first statement: the schema created or migrated
    (``auto_upgrade``) or else checked, and the channel named. Called from any thread.

    Two locks: one serialises the preparation itself (it may wait on another node's upgrade),
    the other guards only the channel's value, so that reading ``channel`` never waits for it.
    """

    def __init__(self, auto_upgrade: bool) -> None:
        self.auto_upgrade = auto_upgrade
        self._preparing = threading.Lock()
        self._value = threading.Lock()
        self._channel = ""  # "" until prepared

    @property
    def channel(self) -> str:
        """The notification channel; "" until a connection was prepared."""
        with self._value:
            return self._channel

    def ensure(self, conn: psycopg.Connection) -> str:
        """Prepare through ``conn`` unless done already; the channel. Leaves ``conn`` committed."""
        channel = self.channel
        if channel:
            return channel
        with self._preparing:
            channel = self.channel
            if not channel:
                channel = self._prepare(conn)
                with self._value:
                    self._channel = channel
        return channel

    def _prepare(self, conn: psycopg.Connection) -> str:
        if self.auto_upgrade:
            was_autocommit = conn.autocommit
            conn.commit()
            conn.autocommit = True
            try:
                before, after = upgrade_connection(conn)
            finally:
                conn.autocommit = was_autocommit
            if before != after:
                log.info(
                    "pgstore: schema upgraded from version {before} to {after}",
                    before=before,
                    after=after,
                )
        else:
            check(conn)
        channel = channel_name(conn)
        conn.commit()
        return channel
