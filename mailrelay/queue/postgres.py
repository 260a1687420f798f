"""The shared queue store on PostgreSQL: several relays, one queue, a dead node's mail taken over.

Every database call runs in a thread (psycopg 3 is blocking), never on the reactor thread:

- commits go to one writer thread that takes every message waiting and stores them in ONE
  transaction (group commit): row, body chunks (``COPY``), ``NOTIFY``; each commit's Deferred fires
  after ``COMMIT`` returned, so a 250 is only ever given for mail the database holds. Database
  down: 451 4.3.0, nothing accepted unsaved.
- the body streams into a local file while it arrives and is copied into ``mailrelay_body`` in
  256 KiB chunks by the writer; deliveries read a local copy (``open_body`` must not block), fetched
  chunk by chunk when this node claims a message it did not receive itself.
- work is leased (``ILeasingStore``): ``claim`` takes a due message with ``SELECT ... FOR UPDATE SKIP
  LOCKED`` and a lease expiry; leases held are renewed while the node lives, and released after each
  attempt. A node that dies stops renewing; once its leases expire the periodic scan of the other
  nodes finds the message and their queue managers claim it. The per-recipient state saved after an
  attempt is what the next node reads, so a recipient recorded delivered is never sent again.
- a listener thread ``LISTEN``s on the schema's channel: other nodes' commits reach ``subscribe``
  callbacks at once (after ``remote_delay``, so the receiving node, when not busy, takes its own mail).
"""

from __future__ import annotations

import json
import os
import queue as _queue
import select
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from typing import IO, Any

import attrs
import psycopg
from psycopg import sql
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailrelay.envelope import Envelope, QueuedMessage, Reply
from mailrelay.errors import TemporaryFailure
from mailrelay.interfaces import (
    IBatchLoader,
    ILeasingStore,
    IMessageWriter,
    IOfflineSharedQueue,
    IQueueStore,
    IScheduleLoader,
    IStartableStore,
)
from mailrelay.queue import pg_schema
from mailrelay.queue.store import (
    QueueIdGenerator,
    is_queue_id,
    message_from_dict,
    message_to_dict,
    new_message,
    storage_failure,
)

log = Logger()

CHUNK = 256 * 1024
_BATCH = 200  # commits per transaction at most
_BODY = ".body"
_TMP = "tmp-"


def database_failure() -> TemporaryFailure:
    """What a commit fails with when the database cannot take the message now."""
    return TemporaryFailure(Reply(451, "4.3.0", "Queue database unavailable, try again later"))


def _unreachable(failure: Failure) -> Failure:
    """``database_failure()`` (caused by the driver's error) for an ``OperationalError``, else as it is."""
    if failure.check(psycopg.OperationalError):
        raise database_failure() from failure.value
    return failure


def _encode(message: QueuedMessage) -> str:
    return json.dumps(message_to_dict(message), separators=(",", ":"))


def _decode(state: str) -> QueuedMessage:
    return message_from_dict(json.loads(state))


def usable(conn: psycopg.Connection) -> bool:
    """Whether a connection that sat idle can be used: the server may have ended it meanwhile
    (restart, ``pg_terminate_backend``, an idle timeout), which shows only as bytes waiting on its
    socket (the FATAL message, then the close), looked for without waiting: no round trip, so a
    database that came back costs no failed statement.

    Any byte waiting counts as the end: these connections never LISTEN, so the server has nothing
    else to say to an idle one but a rare ParameterStatus, and replacing the connection then costs
    one connect. (Reading the FATAL message and then asking the status raced the close: the status
    could still be OK.)
    """
    if conn.closed or conn.broken:
        return False
    try:
        poller = select.poll()
        poller.register(conn.pgconn.socket, select.POLLIN)
        waiting = poller.poll(0)
    except (psycopg.OperationalError, OSError, ValueError):
        return False
    return not waiting and conn.pgconn.status == psycopg.pq.ConnStatus.OK


class _Connections:
    """A few idle connections kept for the thread pool's workers (one per call, returned after).

    A connection that failed (server gone) is dropped, so the next call reconnects; one that the
    server ended while it sat idle is found so (``usable``) and replaced before it is used.
    """

    def __init__(self, dsn: str, connect_timeout: int) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self._idle: _queue.LifoQueue[psycopg.Connection] = _queue.LifoQueue()

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.dsn, connect_timeout=self.connect_timeout)

    def checkout(self) -> psycopg.Connection:
        """An idle connection that is still usable, else a new one."""
        while True:
            try:
                conn = self._idle.get_nowait()
            except _queue.Empty:
                return self.connect()
            if usable(conn):
                return conn
            conn.close()

    def run(self, fn: Callable[[psycopg.Connection], Any]) -> Any:
        conn = self.checkout()
        try:
            result = fn(conn)
            conn.commit()
        except BaseException:
            if conn.broken or conn.closed:
                conn.close()
            else:
                try:
                    conn.rollback()
                except psycopg.Error:
                    conn.close()
                    raise
                self._idle.put(conn)
            raise
        self._idle.put(conn)
        return result

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except _queue.Empty:
                return


class _Commit:
    def __init__(self, writer: _PgWriter) -> None:
        self.writer = writer
        self.deferred: defer.Deferred[str] = defer.Deferred()


_STOP = object()


@implementer(IMessageWriter)
class _PgWriter:
    """One message being received: the body goes to a local file until the commit copies it."""

    def __init__(self, store: PostgresStore, queue_id: str, envelope: Envelope) -> None:
        self.store = store
        self.queue_id = queue_id
        self.envelope = envelope
        self.path = os.path.join(store.cache_dir, _TMP + queue_id)
        self.size = 0
        self.done = False
        self.error: OSError | None = None
        self.file: IO[bytes] | None = None
        try:
            self.file = open(self.path, "xb", buffering=CHUNK)  # noqa: SIM115 - lives until commit
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
        _unlink(self.path)

    def write(self, data: bytes) -> None:
        if self.done or self.error is not None:
            return
        try:
            assert self.file is not None
            self.file.write(data)
            self.size += len(data)
        except OSError as e:
            self._fail(e)

    def commit(self) -> defer.Deferred[str]:
        if self.done:
            raise RuntimeError(f"message {self.queue_id} already committed or aborted")
        self.done = True
        if self.error is None:
            try:
                assert self.file is not None
                self.file.close()  # flushes the buffer; the writer thread reads the file
                self.file = None
            except OSError as e:
                self._fail(e)
        if self.error is not None:
            return defer.fail(storage_failure())
        return self.store._submit(_Commit(self))

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self._discard()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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
        self._conns = _Connections(dsn, connect_timeout)
        self._prepared = False
        self._prepare_lock = threading.Lock()
        self.channel = ""
        self._jobs: _queue.SimpleQueue[Any] = _queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._listener: threading.Thread | None = None
        self._stopping = threading.Event()
        self._scanner: task.LoopingCall | None = None
        self._scanning = False
        self._subscribers: list[Callable[[str], object]] = []
        self._leased: set[str] = set()
        self._claimed: dict[str, QueuedMessage] = {}
        #: Transactions the writer has committed (one per group of messages).
        self.commit_passes = 0

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer and listener threads and the periodic scan (leases, orphans)."""
        if self._writer is not None:
            return
        if self._own_pool:
            self.threadpool.start()
        self._stopping.clear()
        self._writer = threading.Thread(
            target=self._run_writer, name="mailrelay-pg-writer", daemon=True
        )
        self._writer.start()
        self._listener = threading.Thread(
            target=self._run_listener, name="mailrelay-pg-listen", daemon=True
        )
        self._listener.start()
        self._scanner = task.LoopingCall(self.scan)
        self._scanner.clock = self.clock
        self._scanner.start(self.scan_interval, now=False)

    @defer.inlineCallbacks
    def stop(self):  # type: ignore[no-untyped-def]
        """Finish pending commits, give back our leases (others may take over at once), close."""
        if self._writer is None:
            return
        if self._scanner is not None and self._scanner.running:
            self._scanner.stop()
        done: defer.Deferred[None] = defer.Deferred()
        self._jobs.put((_STOP, done))
        yield done
        self._writer.join()
        self._writer = None
        self._stopping.set()
        try:
            yield self._in_thread(self._release_all_sync, self.node_id)
        except Exception as e:
            log.warn(
                "pgstore: could not release leases at stop ({error}); they will expire", error=e
            )
        self._leased.clear()
        self._claimed.clear()
        yield self._in_thread(self._conns.close)
        if self._own_pool:
            self.threadpool.stop()
        if self._own_cache:
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    # -- preparation (any thread) --------------------------------------------------------------

    def _prepare(self, conn: psycopg.Connection) -> None:
        """Once per process: schema created/migrated (or checked), our notification channel named."""
        if self._prepared:
            return
        with self._prepare_lock:
            if self._prepared:
                return
            if self.auto_upgrade:
                was_autocommit = conn.autocommit
                conn.commit()
                conn.autocommit = True
                try:
                    before, after = pg_schema.upgrade_connection(conn)
                finally:
                    conn.autocommit = was_autocommit
                if before != after:
                    log.info(
                        "pgstore: schema upgraded from version {before} to {after}",
                        before=before,
                        after=after,
                    )
            else:
                pg_schema.check(conn)
            row = conn.execute("SELECT current_schema()").fetchone()
            conn.commit()
            # One channel per schema: two queues in one database never wake each other.
            self.channel = f"mailrelay_queue_{row[0] if row else 'public'}"[:63]
            self._prepared = True

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(conn, *args)`` in a transaction on a pooled connection (in the calling thread)."""

        def go(conn: psycopg.Connection) -> Any:
            self._prepare(conn)
            return fn(conn, *args)

        return self._conns.run(go)

    def _in_thread(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(self.reactor, self.threadpool, fn, *args)

    def _db(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """``fn(conn, *args)`` in a pooled transaction; a database that cannot be reached is
        ``TemporaryFailure`` (451 4.3.0), as for a commit: callers outside this module (the
        queue manager) wait and retry on it without knowing psycopg."""
        return self._in_thread(self._run, fn, *args).addErrback(_unreachable)

    def _db_retrying(self, what: str, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """``_db``, tried again while the database is unreachable, for ``retry_for`` seconds.

        Used for outcomes of deliveries already made: losing them would send the mail again.
        """
        deadline = self.clock.seconds() + self.retry_for
        result: defer.Deferred[Any] = defer.Deferred()

        def attempt() -> None:
            self._db(fn, *args).addCallbacks(result.callback, failed)

        def failed(f: Failure) -> None:
            if (
                f.check(TemporaryFailure)
                and self.clock.seconds() < deadline
                and not self._stopping.is_set()
            ):
                log.warn(
                    "pgstore: {what} failed ({error}); retrying",
                    what=what,
                    error=f.value.__cause__ or f.value,
                )
                self.clock.callLater(1.0, attempt)
                return
            result.errback(f)

        attempt()
        return result

    # -- IMessageSink ----------------------------------------------------------------------

    def open(self, envelope: Envelope) -> _PgWriter:
        if not envelope.received_at:
            envelope = attrs.evolve(envelope, received_at=self.clock.seconds())
        return _PgWriter(self, self.new_id(), envelope)

    def _submit(self, job: _Commit) -> defer.Deferred[str]:
        if self._writer is None:
            job.writer._discard()
            return defer.fail(database_failure())
        self._jobs.put((job, None))
        return job.deferred

    # -- the writer thread (group commit) --------------------------------------------------

    def _run_writer(self) -> None:
        conn: psycopg.Connection | None = None
        stop: defer.Deferred[None] | None = None
        while stop is None:
            batch: list[_Commit] = []
            item = self._jobs.get()
            while True:
                job, done = item
                if job is _STOP:
                    stop = done
                else:
                    batch.append(job)
                if len(batch) >= _BATCH:
                    break
                try:
                    item = self._jobs.get_nowait()
                except _queue.Empty:
                    break
            if batch:
                conn, results = self._commit_batch(conn, batch)
                self.reactor.callFromThread(self._committed, results)
        if conn is not None:
            conn.close()
        self.reactor.callFromThread(stop.callback, None)

    def _commit_batch(
        self, conn: psycopg.Connection | None, batch: list[_Commit]
    ) -> tuple[psycopg.Connection | None, list[tuple[_Commit, Any]]]:
        try:
            if conn is not None and not usable(conn):  # ended while the writer had nothing to do
                conn.close()
                conn = None
            if conn is None:
                conn = self._conns.connect()
            self._prepare(conn)
            self._store_batch(conn, batch)
            self.commit_passes += 1
            return conn, [(job, self._cache_committed(job)) for job in batch]
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
                results = []
                for job in batch:
                    conn, (one,) = self._commit_batch(conn, [job])
                    results.append(one)
                return conn, results
            log.error(
                "pgstore: cannot store {count} message(s): {error}", count=len(batch), error=e
            )
            for job in batch:
                job.writer._discard()
            return conn, [(job, Failure(database_failure())) for job in batch]

    def _store_batch(self, conn: psycopg.Connection, batch: list[_Commit]) -> None:
        rows = []
        for job in batch:
            w = job.writer
            rows.append((w.queue_id, _encode(new_message(w.queue_id, w.envelope)), w.size))
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO mailrelay_message (queue_id, state, body_size) VALUES (%s, %s, %s)",
                rows,
            )
            with cur.copy("COPY mailrelay_body (queue_id, seq, data) FROM STDIN") as copy:
                for job in batch:
                    with open(job.writer.path, "rb") as f:
                        seq = 0
                        while chunk := f.read(CHUNK):
                            copy.write_row((job.writer.queue_id, seq, chunk))
                            seq += 1
            cur.executemany(
                "SELECT pg_notify(%s, %s)",
                [(self.channel, f"{self.node_id} {job.writer.queue_id}") for job in batch],
            )
        conn.commit()

    def _cache_committed(self, job: _Commit) -> str:
        """The committed body stays here as the local copy this node delivers from."""
        w = job.writer
        try:
            os.rename(w.path, self._body_path(w.queue_id))
        except OSError:
            _unlink(w.path)  # fetched again when needed
        return w.queue_id

    def _committed(self, results: list[tuple[_Commit, Any]]) -> None:
        for job, result in results:
            if isinstance(result, Failure):
                job.deferred.errback(result)
                continue
            self._notify(result)
            job.deferred.callback(result)

    def _notify(self, queue_id: str) -> None:
        for callback in list(self._subscribers):
            try:
                callback(queue_id)
            except Exception:
                log.failure("pgstore: subscriber failed for {queue_id}", queue_id=queue_id)

    # -- the listener thread ---------------------------------------------------------------

    def _run_listener(self) -> None:
        listening = False  # a connection that was listening is replaced at once, without a warning
        while not self._stopping.is_set():
            try:
                with psycopg.connect(
                    self.dsn, autocommit=True, connect_timeout=self._conns.connect_timeout
                ) as conn:
                    self._prepare(conn)
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    listening = True
                    self.reactor.callFromThread(
                        self._rescan
                    )  # catch up on anything missed meanwhile
                    while not self._stopping.is_set():
                        ids = []
                        for n in conn.notifies(timeout=0.5, stop_after=500):
                            node, _, qid = n.payload.partition(" ")
                            if node != self.node_id and is_queue_id(qid):
                                ids.append(qid)
                        if ids:
                            self.reactor.callFromThread(self._remote_commits, ids)
            except Exception as e:
                if self._stopping.is_set():
                    continue
                if listening:
                    listening = False
                    log.info(
                        "pgstore: notification listener lost its connection ({error}); reconnecting",
                        error=e,
                    )
                    continue
                log.warn(
                    "pgstore: notification listener cannot reach the database ({error}); retrying",
                    error=e,
                )
                self._stopping.wait(1.0)

    def _remote_commits(self, ids: list[str]) -> None:
        """Other nodes committed ``ids``: after ``remote_delay``, wake our subscribers for those no
        node has leased yet (one query for the lot, not a failed claim per message per node)."""

        def unclaimed() -> defer.Deferred[list[str]]:
            return self._db(
                lambda conn: [
                    r[0]
                    for r in conn.execute(
                        "SELECT queue_id FROM mailrelay_message WHERE queue_id = ANY(%s)"
                        " AND lease_owner IS NULL AND NOT held ORDER BY queue_id",
                        (ids,),
                    ).fetchall()
                ]
            )

        def wake(found: list[str]) -> None:
            for qid in found:
                self._notify(qid)

        def failed(f: Failure) -> None:
            log.warn(
                "pgstore: cannot look at new mail from other nodes ({error}); the scan will",
                error=f.value,
            )

        if self._writer is not None:
            task.deferLater(self.clock, self.remote_delay, unclaimed).addCallback(wake).addErrback(
                failed
            )

    # -- the periodic scan: renew our leases, find orphans ---------------------------------

    def _rescan(self) -> None:
        if self._writer is not None:
            self.scan()

    def scan(self) -> defer.Deferred[list[str]]:
        """Renew this node's leases; wake subscribers for messages no live node is working on.

        Orphans are messages whose lease expired (a dead node's), and unleased ones overdue by more
        than a scan interval (their node died after releasing them, or is too busy to take them).
        """
        if self._scanning:
            return defer.succeed([])
        self._scanning = True
        now = self.clock.seconds()
        d = self._db(self._scan_sync, now, set(self._leased))

        def found(orphans: list[str]) -> list[str]:
            for qid in orphans:
                self._notify(qid)
            return orphans

        def failed(f: Failure) -> list[str]:
            log.warn("pgstore: scan failed: {error}", error=f.value)
            return []

        def done(result: list[str]) -> list[str]:
            self._scanning = False
            return result

        return d.addCallbacks(found, failed).addBoth(done)

    def _scan_sync(self, conn: psycopg.Connection, now: float, leased: set[str]) -> list[str]:
        conn.execute(
            "UPDATE mailrelay_message SET lease_until = %s WHERE lease_owner = %s",
            (now + self.lease_time, self.node_id),
        )
        rows = conn.execute(
            "SELECT queue_id FROM mailrelay_message WHERE NOT held AND"
            " ((lease_until IS NOT NULL AND lease_until < %(now)s)"
            "  OR (lease_owner IS NULL AND next_attempt < %(overdue)s))"
            " ORDER BY next_attempt LIMIT 1000",
            {"now": now, "overdue": now - self.scan_interval},
        ).fetchall()
        self._sweep_cache(now, leased)
        return [r[0] for r in rows]

    def _sweep_cache(self, now: float, leased: set[str]) -> None:
        """Local copies of bodies nobody here needs any more (listed by the CLI, delivered elsewhere)."""
        for entry in os.scandir(self.cache_dir):
            if entry.name.startswith(_TMP) or entry.name[: -len(_BODY)] in leased:
                continue
            try:
                if entry.stat().st_mtime < now - max(600.0, self.lease_time):
                    _unlink(entry.path)
            except OSError:
                pass

    # -- ILeasingStore ---------------------------------------------------------------------

    def claim(self, queue_id: str) -> defer.Deferred[bool]:
        """Lease ``queue_id`` for this node if it is due, not held, and no live node holds it."""
        if not is_queue_id(queue_id):
            return defer.succeed(False)
        now = self.clock.seconds()
        d = self._db(self._claim_sync, queue_id, now)

        def claimed(message: QueuedMessage | None) -> bool:
            if message is None:
                return False
            self._leased.add(queue_id)
            self._claimed[queue_id] = message
            return True

        def gone(f: Failure) -> bool:
            f.trap(KeyError)  # its body vanished under us (deleted): nothing to attempt
            return False

        return d.addCallbacks(claimed, gone)

    def _claim_sync(
        self, conn: psycopg.Connection, queue_id: str, now: float
    ) -> QueuedMessage | None:
        row = conn.execute(
            "UPDATE mailrelay_message SET lease_owner = %(me)s, lease_until = %(until)s"
            " WHERE queue_id = (SELECT queue_id FROM mailrelay_message WHERE queue_id = %(id)s"
            "   AND NOT held AND next_attempt <= %(due)s"
            "   AND (lease_owner IS NULL OR lease_owner = %(me)s OR lease_until < %(now)s)"
            "   FOR UPDATE SKIP LOCKED)"
            " RETURNING state, body_size",
            {
                "me": self.node_id,
                "until": now + self.lease_time,
                "id": queue_id,
                "due": now + 1.0,
                "now": now,
            },
        ).fetchone()
        if row is None:
            return None
        self._fetch_body(conn, queue_id, row[1])  # under the row lock: nobody removes it meanwhile
        return _decode(row[0])

    def release(self, queue_id: str) -> defer.Deferred[None]:
        """Give up the lease on ``queue_id`` (its outcome is saved); the local body copy goes."""
        self._claimed.pop(queue_id, None)
        _unlink(self._body_path(queue_id))
        if queue_id not in self._leased:
            return defer.succeed(None)  # removed (delivered): no row, no lease left
        self._leased.discard(queue_id)
        d = self._db(self._release_sync, queue_id)

        def failed(f: Failure) -> None:
            log.warn(
                "pgstore: cannot release {queue_id} ({error}); the lease will expire",
                queue_id=queue_id,
                error=f.value,
            )

        return d.addErrback(failed)

    def _release_sync(self, conn: psycopg.Connection, queue_id: str) -> None:
        conn.execute(
            "UPDATE mailrelay_message SET lease_owner = NULL, lease_until = NULL"
            " WHERE queue_id = %s AND lease_owner = %s",
            (queue_id, self.node_id),
        )

    def _release_all_sync(self, node_id: str) -> None:
        self._run(
            lambda conn: conn.execute(
                "UPDATE mailrelay_message SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = %s",
                (node_id,),
            )
        )

    def make_due(self, queue_id: str | None = None) -> defer.Deferred[list[str]]:
        """Make ``queue_id`` (or every message not held) due now, for every node: ``flush``.

        A node only claims due messages, so an operator's "attempt it now" must move the due time
        in the database; the ``NOTIFY`` wakes the other nodes too. Deferred list of the ids made due.
        """
        if queue_id is not None and not is_queue_id(queue_id):
            return defer.succeed([])
        now = self.clock.seconds()
        return self._db(
            lambda conn: _PostgresSync.make_due(conn, queue_id, now, self.channel, self.node_id)
        )

    def leased(self) -> set[str]:
        """The ids this node holds a lease on now (a copy)."""
        return set(self._leased)

    # -- IQueueStore -----------------------------------------------------------------------

    def subscribe(self, callback: Callable[[str], object]) -> None:
        self._subscribers.append(callback)

    def list_ids(self) -> defer.Deferred[list[str]]:
        return self._db(
            lambda conn: [
                r[0]
                for r in conn.execute(
                    "SELECT queue_id FROM mailrelay_message ORDER BY queue_id"
                ).fetchall()
            ]
        )

    def load_schedule(self) -> defer.Deferred[list[tuple[str, float, bool]]]:
        """Every message's ``(queue_id, next_attempt, held)`` in one query (queue manager start-up)."""
        return self._db(
            lambda conn: [
                (r[0], float(r[1]), bool(r[2]))
                for r in conn.execute(
                    "SELECT queue_id, next_attempt, held FROM mailrelay_message ORDER BY queue_id"
                ).fetchall()
            ]
        )

    def load(self, queue_id: str) -> defer.Deferred[QueuedMessage]:
        claimed = self._claimed.pop(queue_id, None)
        if claimed is not None:
            return defer.succeed(claimed)
        if not is_queue_id(queue_id):
            return defer.fail(KeyError(queue_id))
        return self._db(self._load_sync, queue_id)

    def _load_sync(self, conn: psycopg.Connection, queue_id: str) -> QueuedMessage:
        row = conn.execute(
            "SELECT state, body_size FROM mailrelay_message WHERE queue_id = %s", (queue_id,)
        ).fetchone()
        if row is None:
            raise KeyError(queue_id)
        self._fetch_body(conn, queue_id, row[1])
        return _decode(row[0])

    def load_many(self, ids: list[str]) -> defer.Deferred[list[QueuedMessage]]:
        """The messages of ``ids`` that still exist, in one query (listings), bodies copied here."""

        def read(conn: psycopg.Connection) -> list[QueuedMessage]:
            rows = conn.execute(
                "SELECT queue_id, state, body_size FROM mailrelay_message"
                " WHERE queue_id = ANY(%s) ORDER BY queue_id",
                (list(ids),),
            ).fetchall()
            out = []
            for qid, state, size in rows:
                try:
                    self._fetch_body(conn, qid, size)
                except KeyError:
                    continue  # removed while we read
                out.append(_decode(state))
            return out

        return self._db(read)

    def _fetch_body(self, conn: psycopg.Connection, queue_id: str, size: int) -> None:
        """Copy the body here in chunks (to a temp name, then renamed) unless a copy exists.

        A copy shorter or longer than the committed ``size`` (the message was removed while we
        read) is thrown away: never a half body to deliver.
        """
        path = self._body_path(queue_id)
        if os.path.exists(path):
            return
        tmp = f"{path}.{threading.get_ident()}.part"
        try:
            got = 0
            with open(tmp, "wb") as f, conn.cursor(binary=True) as cur:
                for (data,) in cur.stream(
                    "SELECT data FROM mailrelay_body WHERE queue_id = %s ORDER BY seq", (queue_id,)
                ):
                    f.write(data)
                    got += len(data)
            if got != size:
                raise KeyError(queue_id)
            os.rename(tmp, path)
        finally:
            _unlink(tmp)

    def open_body(self, queue_id: str) -> IO[bytes]:
        """The local copy of the body (made by commit, claim or load); ``KeyError`` without one."""
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        try:
            return open(self._body_path(queue_id), "rb")
        except FileNotFoundError:
            raise KeyError(queue_id) from None

    def body_size(self, queue_id: str) -> int:
        return os.stat(self._body_path(queue_id)).st_size

    def save(self, message: QueuedMessage) -> defer.Deferred[None]:
        return self._db_retrying(f"save of {message.queue_id}", self._save_sync, message)

    def _save_sync(self, conn: psycopg.Connection, message: QueuedMessage) -> None:
        _PostgresSync.save(conn, message)

    def remove(self, queue_id: str) -> defer.Deferred[None]:
        if not is_queue_id(queue_id):
            return defer.fail(KeyError(queue_id))
        self._claimed.pop(queue_id, None)
        d = self._db_retrying(f"removal of {queue_id}", self._remove_sync, queue_id)

        def removed(result: None) -> None:
            self._leased.discard(queue_id)
            _unlink(self._body_path(queue_id))
            return result

        return d.addCallback(removed)

    def _remove_sync(self, conn: psycopg.Connection, queue_id: str) -> None:
        _PostgresSync.remove(conn, queue_id)

    def _body_path(self, queue_id: str) -> str:
        return os.path.join(self.cache_dir, queue_id + _BODY)


@implementer(IOfflineSharedQueue)
class PostgresQueueReader:
    """Blocking access to the shared queue for short-lived tools (``mailrelay queue`` with no
    instance answering on this machine): the same rows every node sees."""

    def __init__(self, dsn: str, connect_timeout: int = 5) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True, connect_timeout=connect_timeout)
        pg_schema.check(self.conn)

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
        return _decode(row[0])

    def body_size(self, queue_id: str) -> int:
        row = self.conn.execute(
            "SELECT body_size FROM mailrelay_message WHERE queue_id = %s", (queue_id,)
        ).fetchone()
        if row is None:
            raise KeyError(queue_id)
        return int(row[0])

    def open_body(self, queue_id: str, limit: int = 2 * CHUNK) -> IO[bytes]:
        """The start of the body (enough for its headers), as a file."""
        import io

        rows = self.conn.execute(
            "SELECT data FROM mailrelay_body WHERE queue_id = %s AND seq < %s ORDER BY seq",
            (queue_id, -(-limit // CHUNK)),
        ).fetchall()
        return io.BytesIO(b"".join(bytes(r[0]) for r in rows))

    def save_now(self, message: QueuedMessage) -> None:
        with self.conn.transaction():
            _PostgresSync.save(self.conn, message)

    def remove_now(self, queue_id: str) -> None:
        with self.conn.transaction():
            _PostgresSync.remove(self.conn, queue_id)

    def make_due(self, queue_id: str | None, now: float) -> list[str]:
        """``flush`` with no node answering here: due now, and every running node told."""
        row = self.conn.execute("SELECT current_schema()").fetchone()
        channel = f"mailrelay_queue_{row[0] if row else 'public'}"[:63]
        with self.conn.transaction():
            return _PostgresSync.make_due(self.conn, queue_id, now, channel, "cli")


class _PostgresSync:
    """The statements shared by the store (in its threads) and the reader."""

    @staticmethod
    def save(conn: psycopg.Connection, message: QueuedMessage) -> None:
        cur = conn.execute(
            "UPDATE mailrelay_message SET state = %s, next_attempt = %s, held = %s"
            " WHERE queue_id = %s",
            (_encode(message), message.next_attempt, message.held, message.queue_id),
        )
        if cur.rowcount == 0:
            raise KeyError(message.queue_id)

    @staticmethod
    def make_due(
        conn: psycopg.Connection, queue_id: str | None, now: float, channel: str, node_id: str
    ) -> list[str]:
        """Due now (column and saved state alike, so ``show`` agrees); ``NOTIFY`` each id as if new
        mail, so every other node's listener wakes its manager (its own node is skipped)."""
        where = " AND queue_id = %(id)s" if queue_id else ""
        rows = conn.execute(
            "UPDATE mailrelay_message SET next_attempt = LEAST(next_attempt, %(now)s), state = jsonb_set("
            " state::jsonb, '{next_attempt}', to_jsonb(LEAST(next_attempt, %(now)s)))::text"
            f" WHERE NOT held{where} RETURNING queue_id",
            {"now": now, "id": queue_id},
        ).fetchall()
        ids = sorted(r[0] for r in rows)
        if ids:
            conn.cursor().executemany(
                "SELECT pg_notify(%s, %s)", [(channel, f"{node_id} {qid}") for qid in ids]
            )
        return ids

    @staticmethod
    def remove(conn: psycopg.Connection, queue_id: str) -> None:
        cur = conn.execute("DELETE FROM mailrelay_message WHERE queue_id = %s", (queue_id,))
        if cur.rowcount == 0:
            raise KeyError(queue_id)
