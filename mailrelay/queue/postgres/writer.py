"""Receiving a message and committing it: the 250 is only ever given for mail the database holds.

Thread model:

- reactor thread: ``MessageWriter`` (one per message being received) writes the body to a local
  file; ``commit`` closes the file and hands a ``Commit`` (an immutable value: id, envelope, path,
  size) to ``CommitThread.submit``, which keeps the Deferred in a dict only this thread touches.
- the commit thread (``mailrelay-pg-writer``) owns ONE connection, used by no other thread. It
  takes every ``Commit`` waiting in its ``SimpleQueue`` (up to ``BATCH``) and stores them in one
  transaction (group commit): rows, body chunks (``COPY``), ``NOTIFY``. After ``COMMIT`` it
  renames the bodies into the ``BodyCache`` and sends ``(queue_id, Failure or None)`` pairs back
  with ``reactor.callFromThread``, where the Deferreds fire. A message that fails is alone in
  its failure: a batch that fails for another reason than the database being out of reach is
  stored again one by one. Database out of reach: ``database_failure()`` (451 4.3.0).
- ``stop`` queues ``None``: the thread commits what came before it, closes its connection and
  says so through ``callFromThread``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import IO, Any

import attrs
import psycopg
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.envelope import Envelope
from mailrelay.interfaces import IPrependingWriter
from mailrelay.queue.postgres import queries
from mailrelay.queue.postgres.bodies import BodyCache, unlink
from mailrelay.queue.postgres.connections import Connections, database_failure, usable
from mailrelay.queue.postgres.schema import Preparation
from mailrelay.queue.store import new_message, storage_failure

log = Logger()

BATCH = 200  # commits per transaction at most


@attrs.frozen
class Commit:
    """A received message, its body in the closed file ``path``: what the commit thread stores."""

    queue_id: str
    envelope: Envelope
    path: str
    size: int
    prefix: bytes = b""  # delivered in front of the body; kept in the row's state


Outcome = tuple[str, Failure | None]  # (queue_id, None when committed)


@implementer(IPrependingWriter)
class MessageWriter:
    """One message being received: the body goes to a local file until the commit copies it."""

    def __init__(
        self,
        queue_id: str,
        envelope: Envelope,
        path: str,
        submit: Callable[[Commit], defer.Deferred[str]],
    ) -> None:
        self.queue_id = queue_id
        self.envelope = envelope
        self.path = path
        self.submit = submit
        self.size = 0
        self.done = False
        self.error: OSError | None = None
        self.file: IO[bytes] | None = None
        self.prefix = b""
        try:
            self.file = open(self.path, "xb", buffering=queries.CHUNK)  # noqa: SIM115 - until commit
        except OSError as e:
            self._fail(e)

    def _fail(self, error: OSError) -> None:
        if self.error is None:
            log.error(
                "pgstore: cannot buffer message {queue_id}: {error}",
                queue_id=self.queue_id,
                error=error,
            )
        self.error = error
        self._discard()

    def _discard(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
            self.file = None
        unlink(self.path)

    def write(self, data: bytes) -> None:
        if self.done or self.error is not None:
            return
        try:
            assert self.file is not None
            self.file.write(data)
            self.size += len(data)
        except OSError as e:
            self._fail(e)

    def prepend(self, header: bytes) -> None:
        self.prefix = header

    def commit(self) -> defer.Deferred[str]:
        if self.done:
            raise RuntimeError(f"message {self.queue_id} already committed or aborted")
        self.done = True
        if self.error is None:
            try:
                assert self.file is not None
                self.file.close()  # flushes the buffer; the commit thread reads the file
                self.file = None
            except OSError as e:
                self._fail(e)
        if self.error is not None:
            return defer.fail(storage_failure())
        return self.submit(Commit(self.queue_id, self.envelope, self.path, self.size, self.prefix))

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self._discard()


class CommitThread:
    """The group-commit thread and its connection (see the module docstring for what it owns)."""

    def __init__(
        self,
        reactor: Any,
        connections: Connections,
        preparation: Preparation,
        bodies: BodyCache,
        node_id: str,
        committed: Callable[[str], None],
    ) -> None:
        self.reactor = reactor
        self.connections = connections
        self.preparation = preparation
        self.bodies = bodies
        self.node_id = node_id
        self.committed = committed  # on the reactor thread, for each id before its Deferred fires
        self._jobs: queue.SimpleQueue[Commit | None] = queue.SimpleQueue()
        self._waiting: dict[str, defer.Deferred[str]] = {}  # reactor thread only
        self._thread: threading.Thread | None = None
        self._stopped: defer.Deferred[None] | None = None

    # -- the reactor thread ----------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mailrelay-pg-writer", daemon=True)
        self._thread.start()

    def submit(self, commit: Commit) -> defer.Deferred[str]:
        """Store ``commit``; the Deferred fires with its id once the database holds it."""
        if self._thread is None:
            unlink(commit.path)
            return defer.fail(database_failure())
        d: defer.Deferred[str] = defer.Deferred()
        self._waiting[commit.queue_id] = d
        self._jobs.put(commit)
        return d

    def stop(self) -> defer.Deferred[None]:
        """Commit what was submitted, close the connection, end the thread."""
        thread = self._thread
        if thread is None:
            return defer.succeed(None)
        self._stopped = defer.Deferred()
        self._jobs.put(None)

        def joined(result: None) -> None:
            thread.join()
            self._thread = None

        return self._stopped.addCallback(joined)

    def _done(self, outcomes: list[Outcome]) -> None:
        for queue_id, failure in outcomes:
            d = self._waiting.pop(queue_id)
            if failure is not None:
                d.errback(failure)
                continue
            self.committed(queue_id)
            d.callback(queue_id)

    def _ended(self) -> None:
        assert self._stopped is not None
        self._stopped.callback(None)

    # -- the commit thread -----------------------------------------------------------------

    def _run(self) -> None:
        conn: psycopg.Connection | None = None
        stopping = False
        while not stopping:
            batch: list[Commit] = []
            job = self._jobs.get()
            while True:
                if job is None:
                    stopping = True
                else:
                    batch.append(job)
                if len(batch) >= BATCH:
                    break
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
            if batch:
                conn, outcomes = self._commit(conn, batch)
                self.reactor.callFromThread(self._done, outcomes)
        if conn is not None:
            conn.close()
        self.reactor.callFromThread(self._ended)

    def _commit(
        self, conn: psycopg.Connection | None, batch: list[Commit]
    ) -> tuple[psycopg.Connection | None, list[Outcome]]:
        """Store ``batch`` in one transaction; the connection to use next, and the outcomes."""
        try:
            if conn is not None and not usable(conn):  # ended while the thread had nothing to do
                conn.close()
                conn = None
            if conn is None:
                conn = self.connections.connect()
            channel = self.preparation.ensure(conn)
            self._store(conn, channel, batch)
            outcomes: list[Outcome] = []
            for job in batch:
                self.bodies.keep(job.path, job.queue_id)
                outcomes.append((job.queue_id, None))
            return conn, outcomes
        except Exception as e:
            if conn is not None and (conn.closed or conn.broken):
                conn.close()
                conn = None
            elif conn is not None:
                try:
                    conn.rollback()
                except psycopg.Error:
                    conn.close()
                    conn = None
            if len(batch) > 1 and not isinstance(e, psycopg.OperationalError):
                # One bad message must not fail its neighbours: store them one by one.
                outcomes = []
                for job in batch:
                    conn, (one,) = self._commit(conn, [job])
                    outcomes.append(one)
                return conn, outcomes
            log.error(
                "pgstore: cannot store {count} message(s): {error}", count=len(batch), error=e
            )
            for job in batch:
                unlink(job.path)
            return conn, [(job.queue_id, Failure(database_failure())) for job in batch]

    def _store(self, conn: psycopg.Connection, channel: str, batch: list[Commit]) -> None:
        rows = [
            (
                job.queue_id,
                queries.encode(new_message(job.queue_id, job.envelope, job.prefix)),
                job.size,
            )
            for job in batch
        ]
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO mailrelay_message (queue_id, state, body_size) VALUES (%s, %s, %s)",
                rows,
            )
            with cur.copy("COPY mailrelay_body (queue_id, seq, data) FROM STDIN") as copy:
                for job in batch:
                    with open(job.path, "rb") as f:
                        seq = 0
                        while chunk := f.read(queries.CHUNK):
                            copy.write_row((job.queue_id, seq, chunk))
                            seq += 1
        queries.notify(conn, channel, self.node_id, [job.queue_id for job in batch])
        conn.commit()
