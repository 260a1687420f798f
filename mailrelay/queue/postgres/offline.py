"""The shared queue for short-lived tools: ``mailrelay queue`` with no instance answering on this
machine reads and edits the same rows every node sees, blocking, on one connection."""

from __future__ import annotations

import io
from typing import IO

import psycopg
from zope.interface import implementer

from mailrelay.envelope import QueuedMessage
from mailrelay.interfaces import IOfflineSharedQueue
from mailrelay.queue.postgres import queries, schema


@implementer(IOfflineSharedQueue)
class PostgresQueueReader:
    """Blocking access to the shared queue (the CLI's offline queue API)."""

    def __init__(self, dsn: str, connect_timeout: int = 5) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True, connect_timeout=connect_timeout)
        schema.check(self.conn)

    def close(self) -> None:
        self.conn.close()

    def scan_ids(self) -> list[str]:
        return [
            r[0]
            for r in self.conn.execute("SELECT queue_id FROM mailrelay_message ORDER BY queue_id")
        ]

    def read_message(self, queue_id: str) -> QueuedMessage:
        row = self.conn.execute(
            "SELECT state FROM mailrelay_message WHERE queue_id = %s", (queue_id,)
        ).fetchone()
        if row is None:
            raise KeyError(queue_id)
        return queries.decode(row[0])

    def body_size(self, queue_id: str) -> int:
        row = self.conn.execute(
            "SELECT body_size FROM mailrelay_message WHERE queue_id = %s", (queue_id,)
        ).fetchone()
        if row is None:
            raise KeyError(queue_id)
        return int(row[0])

    def open_body(self, queue_id: str, limit: int = 2 * queries.CHUNK) -> IO[bytes]:
        """The start of the body (enough for its headers), as a file."""
        rows = self.conn.execute(
            "SELECT data FROM mailrelay_body WHERE queue_id = %s AND seq < %s ORDER BY seq",
            (queue_id, -(-limit // queries.CHUNK)),
        ).fetchall()
        return io.BytesIO(b"".join(bytes(r[0]) for r in rows))

    def save_now(self, message: QueuedMessage) -> None:
        with self.conn.transaction():
            queries.save(self.conn, message)

    def remove_now(self, queue_id: str) -> None:
        with self.conn.transaction():
            queries.remove(self.conn, queue_id)

    def make_due(self, queue_id: str | None, now: float) -> list[str]:
        """``flush`` with no node answering here: due now, and every running node told."""
        channel = schema.channel_name(self.conn)
        with self.conn.transaction():
            return queries.make_due(self.conn, queue_id, now, channel, "cli")
