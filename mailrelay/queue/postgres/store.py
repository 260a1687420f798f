"""The shared queue store on PostgreSQL: several relays, one queue, a dead node's mail taken over.

``PostgresStore`` is the facade (``IQueueStore`` + ``ILeasingStore``); each job is its own module:

- ``writer``: receiving a message and the group commit; a commit's Deferred fires after
  ``COMMIT`` returned, so a 250 is only ever given for mail the database holds. Database down:
  451 4.3.0, nothing accepted unsaved.
- ``bodies``: the local body copies deliveries read (``open_body`` must not block).
- ``leases``: claim, renew, release; the periodic scan that finds a dead node's mail.
- ``listener``: other nodes' commits reach ``subscribe`` callbacks at once (after
  ``remote_delay``, so the receiving node, when not busy, takes its own mail).
- ``connections``: pooled connections for the pool threads; out of reach is TemporaryFailure.
- ``schema``: migrations and the once-per-process preparation; ``queries``: the row format and
  the statements the store shares with ``offline`` (the CLI's reader).

Thread model (psycopg 3 is blocking: no database call runs on the reactor thread):

- the reactor thread runs this facade, every ``MessageWriter``, ``Leases`` and the subscribers;
  the mutable state of all of them (subscribers, leases held, claimed messages, the scan flag,
  the Deferreds of commits waiting) is touched on this thread only.
- the commit thread owns one connection; ``Commit`` values reach it through a ``SimpleQueue``,
  outcomes come back through ``reactor.callFromThread`` (see ``writer``).
- the listener thread owns its ``LISTEN`` connection; ids come back through
  ``reactor.callFromThread``; it is stopped through a ``threading.Event`` (see ``listener``).
- the pool threads (``threadpool``) run the other statements, each on a connection checked out
  of ``Connections`` (a ``LifoQueue``) and put back; their arguments are copies or immutable
  values, results come back through the Deferred of ``deferToThreadPool``.
- shared by all of them: ``Connections`` (its queue), ``Preparation`` (two locks), the settings
  (never changed after ``__init__``) and the cache directory (each thread writes its own names).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Generator
from typing import IO, Any

import attrs
import psycopg
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailrelay.envelope import Envelope, QueuedMessage
from mailrelay.interfaces import (
    IBatchLoader,
    ILeasingStore,
    IQueueStore,
    IScheduleLoader,
    IStartableStore,
)
from mailrelay.queue.postgres import queries
from mailrelay.queue.postgres.bodies import BodyCache
from mailrelay.queue.postgres.connections import Connections, Database
from mailrelay.queue.postgres.leases import Leases
from mailrelay.queue.postgres.listener import Listener
from mailrelay.queue.postgres.schema import Preparation
from mailrelay.queue.postgres.writer import CommitThread, MessageWriter
from mailrelay.queue.store import QueueIdGenerator, is_queue_id

log = Logger()


@implementer(IQueueStore, ILeasingStore, IStartableStore, IScheduleLoader, IBatchLoader)
class PostgresStore:
    """``IQueueStore`` + ``ILeasingStore`` on a PostgreSQL database shared by several nodes.

    The tables live in the first schema of the DSN's ``search_path`` (created or migrated at start
    when ``auto_upgrade``, else checked). ``clock`` (default: the reactor) dates leases and due
    times; ``node_id`` names this node's leases (unique per process by default).
    """

    def __init__(
        self,
        dsn: str,
        reactor: Any,
        threadpool: ThreadPool | None = None,
        *,
        clock: Any = None,
        node_id: str | None = None,
        lease_time: float = 30.0,
        scan_interval: float = 5.0,
        remote_delay: float = 0.2,
        retry_for: float = 120.0,
        cache_dir: str | None = None,
        auto_upgrade: bool = True,
        connect_timeout: int = 5,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.dsn = dsn
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.node_id = node_id or f"{socket.gethostname()}:{os.getpid()}:{randbytes(4).hex()}"
        self.lease_time = lease_time
        self.scan_interval = scan_interval
        self.remote_delay = remote_delay
        self.retry_for = retry_for
        self.auto_upgrade = auto_upgrade
        self.new_id = QueueIdGenerator(self.clock, randbytes)
        self._own_pool = threadpool is None
        self.threadpool = threadpool or ThreadPool(
            minthreads=0, maxthreads=8, name="mailrelay-pgstore"
        )
        self._own_cache = cache_dir is None
        self.cache_dir = cache_dir or tempfile.mkdtemp(prefix="mailrelay-pgstore-")
        os.makedirs(self.cache_dir, mode=0o700, exist_ok=True)
        self._conns = Connections(dsn, connect_timeout)
        self._preparation = Preparation(auto_upgrade)
        self._db = Database(
            reactor, self.threadpool, self._conns, self._preparation, self.clock, retry_for
        )
        self._bodies = BodyCache(self.cache_dir)
        self._leases = Leases(
            self._db, self._bodies, self.clock, self.node_id, lease_time, scan_interval
        )
        self._writer = CommitThread(
            reactor, self._conns, self._preparation, self._bodies, self.node_id, self._notify
        )
        self._listener: Listener | None = None
        self._scanner: task.LoopingCall | None = None
        self._running = False
        self._subscribers: list[Callable[[str], object]] = []

    @property
    def channel(self) -> str:
        """The schema's ``NOTIFY`` channel; "" until the first connection was prepared."""
        return self._preparation.channel

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the commit and listener threads and the periodic scan (leases, orphans)."""
        if self._running:
            return
        self._running = True
        if self._own_pool:
            self.threadpool.start()
        self._db.stopping = False
        self._writer.start()
        self._listener = Listener(
            self.reactor,
            self.dsn,
            self._conns.connect_timeout,
            self._preparation,
            self.node_id,
            listening=self._rescan,
            heard=self._remote_commits,
        )
        self._listener.start()
        self._scanner = task.LoopingCall(self.scan)
        self._scanner.clock = self.clock
        self._scanner.start(self.scan_interval, now=False)

    @defer.inlineCallbacks
    def stop(self) -> Generator[defer.Deferred[Any], Any, None]:
        """Finish pending commits, give back our leases (others may take over at once), close."""
        if not self._running:
            return
        if self._scanner is not None and self._scanner.running:
            self._scanner.stop()
        yield self._writer.stop()
        self._running = False
        self._db.stopping = True
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        try:
            yield self._db.in_thread(self._leases.release_all_now)
        except Exception as e:
            log.warn(
                "pgstore: could not release leases at stop ({error}); they will expire", error=e
            )
        self._leases.forget_all()
        yield self._db.in_thread(self._conns.close)
        if self._own_pool:
            self.threadpool.stop()
        if self._own_cache:
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    # -- IMessageSink ----------------------------------------------------------------------

    def open(self, envelope: Envelope) -> MessageWriter:
        if not envelope.received_at:
            envelope = attrs.evolve(envelope, received_at=self.clock.seconds())
        queue_id = self.new_id()
        return MessageWriter(
            queue_id, envelope, self._bodies.receiving(queue_id), self._writer.submit
        )

    # -- new mail: ours, other nodes', orphans ---------------------------------------------

    def subscribe(self, callback: Callable[[str], object]) -> None:
        self._subscribers.append(callback)

    def _notify(self, queue_id: str) -> None:
        for callback in list(self._subscribers):
            try:
                callback(queue_id)
            except Exception:
                log.failure("pgstore: subscriber failed for {queue_id}", queue_id=queue_id)

    def _remote_commits(self, ids: list[str]) -> None:
        """Other nodes committed ``ids``: after ``remote_delay``, wake our subscribers for those no
        node has leased yet (one query for the lot, not a failed claim per message per node)."""
        if not self._running:
            return

        def wake(found: list[str]) -> None:
            for qid in found:
                self._notify(qid)

        def failed(f: Failure) -> None:
            log.warn(
                "pgstore: cannot look at new mail from other nodes ({error}); the scan will",
                error=f.value,
            )

        later: defer.Deferred[None] = task.deferLater(self.clock, self.remote_delay, lambda: None)
        later.addCallback(lambda _: self._leases.unclaimed(ids)).addCallback(wake).addErrback(
            failed
        )

    def _rescan(self) -> None:
        """The listener (re)connected: catch up on anything missed meanwhile."""
        if self._running:
            self.scan()

    def scan(self) -> defer.Deferred[list[str]]:
        """Renew this node's leases; wake subscribers for messages no live node is working on
        (see ``leases``). Deferred list of those."""

        def found(orphans: list[str]) -> list[str]:
            for qid in orphans:
                self._notify(qid)
            return orphans

        def failed(f: Failure) -> list[str]:
            log.warn("pgstore: scan failed: {error}", error=f.value)
            return []

        return self._leases.scan().addCallbacks(found, failed)

    # -- ILeasingStore ---------------------------------------------------------------------

    def claim(self, queue_id: str) -> defer.Deferred[bool]:
        """Lease ``queue_id`` for this node if it is due, not held, and no live node holds it."""
        return self._leases.claim(queue_id)

    def release(self, queue_id: str) -> defer.Deferred[None]:
        """Give up the lease on ``queue_id`` (its outcome is saved); the local body copy goes."""

        def failed(f: Failure) -> None:
            log.warn(
                "pgstore: cannot release {queue_id} ({error}); the lease will expire",
                queue_id=queue_id,
                error=f.value,
            )

        return self._leases.release(queue_id).addErrback(failed)

    def make_due(self, queue_id: str | None = None) -> defer.Deferred[list[str]]:
        """Make ``queue_id`` (or every message not held) due now, for every node: ``flush``.

        A node only claims due messages, so an operator's "attempt it now" must move the due time
        in the database; the ``NOTIFY`` wakes the other nodes too. Deferred list of those ids.
        """
        if queue_id is not None and not is_queue_id(queue_id):
            return defer.succeed([])
        now = self.clock.seconds()
        return self._db.call(
            lambda conn: queries.make_due(
                conn, queue_id, now, self._preparation.channel, self.node_id
            )
        )

    def leased(self) -> set[str]:
        """The ids this node holds a lease on now (a copy)."""
        return self._leases.held()

    # -- IQueueStore -----------------------------------------------------------------------

    def list_ids(self) -> defer.Deferred[list[str]]:
        return self._db.call(
            lambda conn: [
                r[0]
                for r in conn.execute(
                    "SELECT queue_id FROM mailrelay_message ORDER BY queue_id"
                ).fetchall()
            ]
        )

    def load_schedule(self) -> defer.Deferred[list[tuple[str, float, bool]]]:
        """Every message's ``(queue_id, next_attempt, held)`` in one query (queue manager start)."""
        return self._db.call(
            lambda conn: [
                (r[0], float(r[1]), bool(r[2]))
                for r in conn.execute(
                    "SELECT queue_id, next_attempt, held FROM mailrelay_message ORDER BY queue_id"
                ).fetchall()
            ]
        )

    def load(self, queue_id: str) -> defer.Deferred[QueuedMessage]:
        claimed = self._leases.take_claimed(queue_id)
        if claimed is not None:
            return defer.succeed(claimed)
        if not is_queue_id(queue_id):
            return defer.fail(KeyError(queue_id))
        return self._db.call(self._load, queue_id)

    def _load(self, conn: psycopg.Connection, queue_id: str) -> QueuedMessage:
        row = conn.execute(
            "SELECT state, body_size FROM mailrelay_message WHERE queue_id = %s", (queue_id,)
        ).fetchone()
        if row is None:
            raise KeyError(queue_id)
        self._bodies.fetch(conn, queue_id, row[1])
        return queries.decode(row[0])

    def load_many(self, ids: list[str]) -> defer.Deferred[list[QueuedMessage]]:
        """The messages of ``ids`` that still exist, in one query (listings), bodies copied here."""

        def read(conn: psycopg.Connection, ids: list[str]) -> list[QueuedMessage]:
            rows = conn.execute(
                "SELECT queue_id, state, body_size FROM mailrelay_message"
                " WHERE queue_id = ANY(%s) ORDER BY queue_id",
                (ids,),
            ).fetchall()
            out = []
            for qid, state, size in rows:
                try:
                    self._bodies.fetch(conn, qid, size)
                except KeyError:
                    continue  # removed while we read
                out.append(queries.decode(state))
            return out

        return self._db.call(read, list(ids))

    def open_body(self, queue_id: str) -> IO[bytes]:
        """The local copy of the body (made by commit, claim or load); ``KeyError`` without one."""
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        return self._bodies.open(queue_id)

    def body_size(self, queue_id: str) -> int:
        return self._bodies.size(queue_id)

    def save(self, message: QueuedMessage) -> defer.Deferred[None]:
        return self._db.call_retrying(f"save of {message.queue_id}", queries.save, message)

    def remove(self, queue_id: str) -> defer.Deferred[None]:
        if not is_queue_id(queue_id):
            return defer.fail(KeyError(queue_id))
        self._leases.take_claimed(queue_id)
        d = self._db.call_retrying(f"removal of {queue_id}", queries.remove, queue_id)

        def removed(result: None) -> None:
            self._leases.removed(queue_id)
            self._bodies.discard(queue_id)
            return result

        return d.addCallback(removed)
