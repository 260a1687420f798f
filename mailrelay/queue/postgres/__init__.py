"""The shared queue on PostgreSQL: ``PostgresStore`` for a running node (see ``store`` for its
parts and thread model), ``PostgresQueueReader`` for the CLI, ``schema`` for ``db upgrade``."""

from mailrelay.queue.postgres.connections import database_failure, usable
from mailrelay.queue.postgres.offline import PostgresQueueReader
from mailrelay.queue.postgres.queries import CHUNK
from mailrelay.queue.postgres.queries import decode as _decode  # tests/queue/test_spool.py
from mailrelay.queue.postgres.queries import encode as _encode  # tests/queue/test_spool.py
from mailrelay.queue.postgres.schema import SchemaError
from mailrelay.queue.postgres.store import PostgresStore

__all__ = [
    "CHUNK",
    "PostgresQueueReader",
    "PostgresStore",
    "SchemaError",
    "_decode",
    "_encode",
    "database_failure",
    "usable",
]
