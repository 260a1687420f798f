"""How the store reaches the database from the reactor: pool threads, pooled connections, and
what a database out of reach means to the store's callers.

``Database.call(fn, *args)`` runs ``fn(conn, *args)`` in a thread of the thread pool, in one
transaction on a connection taken from ``Connections`` (a thread-safe ``LifoQueue``) and given
back after; the reactor thread gets the result through the Deferred. A database that cannot be
reached (``psycopg.OperationalError``) is ``database_failure()``, the store's ``TemporaryFailure``
(451 4.3.0): callers outside this package (the queue manager) wait and retry on it without
knowing psycopg.
"""

from __future__ import annotations

import queue
import select
from collections.abc import Callable
from typing import Any

import psycopg
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mailrelay.envelope import Reply
from mailrelay.errors import TemporaryFailure
from mailrelay.queue.postgres.schema import Preparation

log = Logger()


def database_failure() -> TemporaryFailure:
    """What a call fails with when the database cannot take it now."""
    return TemporaryFailure(Reply(451, "4.3.0", "Queue database unavailable, try again later"))


def unreachable(failure: Failure) -> Failure:
    """``database_failure()`` (caused by the driver's error) for an ``OperationalError``, else
    the failure as it is."""
    if failure.check(psycopg.OperationalError):
        raise database_failure() from failure.value
    return failure


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


class Connections:
    """A few idle connections kept for the thread pool's workers (one per call, returned after).

    A connection that failed (server gone) is dropped, so the next call reconnects; one that the
    server ended while it sat idle is found so (``usable``) and replaced before it is used. Only
    the queue is shared between threads; a connection belongs to one thread from checkout to put.
    """

    def __init__(self, dsn: str, connect_timeout: int) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self._idle: queue.LifoQueue[psycopg.Connection] = queue.LifoQueue()

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.dsn, connect_timeout=self.connect_timeout)

    def checkout(self) -> psycopg.Connection:
        """An idle connection that is still usable, else a new one."""
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return self.connect()
            if usable(conn):
                return conn
            conn.close()

    def run(self, fn: Callable[[psycopg.Connection], Any]) -> Any:
        """``fn(conn)`` in one transaction on a pooled connection, in the calling thread."""
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
            except queue.Empty:
                return


class Database:
    """Database calls from the reactor thread, run in ``threadpool`` on ``connections``.

    ``stopping`` is read and set on the reactor thread only (by the store's ``stop``).
    """

    def __init__(
        self,
        reactor: Any,
        threadpool: ThreadPool,
        connections: Connections,
        preparation: Preparation,
        clock: Any,
        retry_for: float,
    ) -> None:
        self.reactor = reactor
        self.threadpool = threadpool
        self.connections = connections
        self.preparation = preparation
        self.clock = clock
        self.retry_for = retry_for
        self.stopping = False

    def in_thread(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """``fn(*args)`` in a pool thread."""
        return threads.deferToThreadPool(self.reactor, self.threadpool, fn, *args)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(conn, *args)`` in a transaction on a pooled connection, in the calling thread."""

        def go(conn: psycopg.Connection) -> Any:
            self.preparation.ensure(conn)
            return fn(conn, *args)

        return self.connections.run(go)

    def call(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """``run(fn, *args)`` in a pool thread; out of reach, ``database_failure()``."""
        return self.in_thread(self.run, fn, *args).addErrback(unreachable)

    def call_retrying(self, what: str, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """``call``, tried again each second while the database is out of reach, for
        ``retry_for`` seconds (not once the store stops).

        For the outcomes of deliveries already made: losing them would send the mail again.
        """
        deadline = self.clock.seconds() + self.retry_for
        result: defer.Deferred[Any] = defer.Deferred()

        def attempt() -> None:
            self.call(fn, *args).addCallbacks(result.callback, failed)

        def failed(f: Failure) -> None:
            if f.check(TemporaryFailure) and self.clock.seconds() < deadline and not self.stopping:
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
