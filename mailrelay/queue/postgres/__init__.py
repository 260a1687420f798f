"""The shared queue on PostgreSQL: ``PostgresStore`` for a running node (``store`` lists its
parts and their thread model), ``PostgresQueueReader`` for the CLI, ``schema`` for
``mailrelay db upgrade``."""

from mailrelay.queue.postgres.offline import PostgresQueueReader
from mailrelay.queue.postgres.queries import decode as _decode  # tests/unit/queue/test_spool.py
from mailrelay.queue.postgres.queries import encode as _encode  # tests/unit/queue/test_spool.py
from mailrelay.queue.postgres.schema import SchemaError
from mailrelay.queue.postgres.store import PostgresStore

__all__ = ["PostgresQueueReader", "PostgresStore", "SchemaError", "_decode", "_encode"]
