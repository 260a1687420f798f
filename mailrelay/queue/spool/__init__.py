"""The filesystem spool: the default ``IQueueStore``, durable before the 250.

A commit's Deferred fires only once the message is on stable storage: its file (or the pack
holding it) fsynced and, when a name was added to ``queue/``, ``queue/`` fsynced after. Small
messages finishing together go into one pack, appended to a segment in one durable write; larger
ones get a file each, and one fsync of ``queue/`` covers every file renamed meanwhile (group
commit). A removal is answered before its unlink is durable (a removal lost in a crash means a
message delivered twice, never one lost). A crash leaves nothing that is ever delivered but what
was acknowledged (``recovery``). Nothing touches ``fsync`` on the reactor thread.

The package, one job per module:

- ``format``: the files' layout and bytes (records, packs, segments); no threads.
- ``pipeline``: the writer, directory-sync and remover threads; the one thread model.
- ``jobs``: the changes the pipeline makes (commit, pack, save, scan, remove).
- ``segments``: segments at run time (index, appending, erasing records).
- ``spares``: reusing the files of removed messages; counts shared with it.
- ``recovery``: the listing of ``queue/`` and the repair at start.
- ``reading``: states, bodies and schedules read back; ``_fast``: the schedule's speed trick.
- ``receiving``: one message being received (``IPrependingWriter``).
- ``recent``: recent commits kept in memory for their first load and delivery.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from typing import IO, Any

import attrs
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailrelay.envelope import Envelope, QueuedMessage
from mailrelay.interfaces import (
    IBatchLoader,
    IOfflineQueue,
    IQueueStore,
    IScheduleLoader,
    IStartableStore,
)
from mailrelay.queue.spool.format import RECEIVING
from mailrelay.queue.spool.jobs import Commit, Remove, Save, Scan, WriterJob
from mailrelay.queue.spool.pipeline import IdSet, Pipeline
from mailrelay.queue.spool.reading import Reader
from mailrelay.queue.spool.receiving import Receiver
from mailrelay.queue.spool.recent import RecentCommits
from mailrelay.queue.spool.recovery import list_queue
from mailrelay.queue.spool.segments import Record, SegmentIndex, read_segments, segment_names
from mailrelay.queue.spool.spares import OpenFiles
from mailrelay.queue.store import QueueIdGenerator, is_queue_id

__all__ = ["FilesystemSpool"]

log = Logger()

SEGMENT_BODY_MAX = 64 * 1024  # bodies up to this size go into segments (with their batch's)
_READERS = 2  # threads reading the schedule at start-up
_FSYNC_THREADS = 16


@implementer(IQueueStore, IStartableStore, IScheduleLoader, IBatchLoader, IOfflineQueue)
class FilesystemSpool:
    """``IQueueStore`` on a local directory; see the package docstring.

    ``threadpool`` runs the reads (``load``); the spool starts its own when none is given.
    ``fsync``, ``randbytes`` and ``timer`` are injectable so tests can observe and hold
    durability, ids and fsync timing. ``dsync``: append packs with ``RWF_DSYNC`` where the
    kernel has it (durable when the write returns); False writes them and ``fsync``s them.
    ``fsync_threads`` (``[spool] fsync_threads``) fsync a batch's files in parallel while fsyncs
    are slow (``fsyncs``). Bodies up to ``segment_body_max`` bytes go into segments; 0 gives
    every message a file.
    """

    def __init__(
        self,
        path: str,
        reactor: Any,
        threadpool: ThreadPool | None = None,
        *,
        fsync: Callable[[int], None] = os.fsync,
        randbytes: Callable[[int], bytes] = os.urandom,
        fsync_threads: int = _FSYNC_THREADS,
        timer: Callable[[], float] = time.perf_counter,
        segment_body_max: int = SEGMENT_BODY_MAX,
        dsync: bool = True,
    ) -> None:
        self.path = os.path.abspath(path)
        self.reactor = reactor
        self.fsync = fsync
        self.tmp_dir = os.path.join(self.path, "tmp")
        self.queue_dir = os.path.join(self.path, "queue")
        self.new_id = QueueIdGenerator(reactor, randbytes)
        self._own_pool = threadpool is None
        self.threadpool = threadpool or ThreadPool(
            minthreads=0, maxthreads=4, name="mailrelay-spool"
        )
        self._index = SegmentIndex(self._read_segments)
        self._reader = Reader(self.queue_dir, self._index, OpenFiles())
        self._receiving = IdSet()  # names in tmp/ of messages being received (start-up keeps them)
        self._removing = IdSet()  # answered as removed, not unlinked yet (the remover discards)
        self._pipeline = Pipeline(
            reactor,
            self.tmp_dir,
            self.queue_dir,
            self._reader,
            self._removing,
            fsync=fsync,
            fsync_threads=fsync_threads,
            timer=timer,
            dsync=dsync,
            segment_body_max=segment_body_max,
        )
        self._subscribers: list[Callable[[str], object]] = []
        self._recent = RecentCommits()  # the reactor thread's
        # Mail is private: a spool we create is for our user only (the control socket lives here).
        for d in (self.path, self.tmp_dir, self.queue_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)

    def _read_segments(self) -> dict[str, Record]:
        """The segments' records, read without changing them (offline, or on first need)."""
        segments, messages = segment_names(os.listdir(self.queue_dir))
        return read_segments(self.queue_dir, segments, messages, repair=False, fsync=self.fsync)

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the threads; the first job removes what a crash left half-written."""
        if self._pipeline.running:
            return
        if self._own_pool:
            self.threadpool.start()
        self._pipeline.submit(Scan(self._removing, receiving=self._receiving))
        self._pipeline.start()

    def stop(self) -> defer.Deferred[None]:
        """Fires once every job submitted before is done and the threads have ended."""
        if not self._pipeline.running:
            return defer.succeed(None)

        def stopped(_: object) -> None:
            if self._own_pool:
                self.threadpool.stop()

        return self._pipeline.stop().addCallback(stopped)

    # -- IMessageSink / IQueueStore -------------------------------------------------------

    def open(self, envelope: Envelope) -> Receiver:
        if not envelope.received_at:
            envelope = attrs.evolve(envelope, received_at=self.reactor.seconds())
        queue_id = self.new_id()
        self._receiving.add(queue_id + RECEIVING)
        tmp_path = os.path.join(self.tmp_dir, queue_id + RECEIVING)
        return Receiver(queue_id, envelope, tmp_path, self._commit, self._received)

    def _commit(self, job: Commit) -> defer.Deferred[str]:
        return self._pipeline.submit(job).addBoth(self._committed, job)

    def _received(self, receiver: Receiver) -> None:
        self._receiving.discard(receiver.queue_id + RECEIVING)

    def _committed(self, result: Any, job: Commit) -> Any:
        """A commit's answer, before its caller hears it: remember it, tell the subscribers."""
        self._receiving.discard(job.queue_id + RECEIVING)
        if isinstance(result, str):
            self._recent.remember(job.message, job.body)
            for callback in self._subscribers:
                try:
                    callback(result)
                except Exception:
                    log.failure("spool: subscriber failed for {queue_id}", queue_id=result)
        return result

    def subscribe(self, callback: Callable[[str], object]) -> None:
        self._subscribers.append(callback)

    def list_ids(self) -> defer.Deferred[list[str]]:
        return self._pipeline.submit(Scan(self._removing))

    def load(self, queue_id: str) -> defer.Deferred[QueuedMessage]:
        recent = self._recent.take_message(queue_id)
        if recent is not None:
            return defer.succeed(recent)
        if queue_id in self._removing:
            return defer.fail(KeyError(queue_id))
        return threads.deferToThreadPool(self.reactor, self.threadpool, self.read_message, queue_id)

    def load_many(self, ids: list[str]) -> defer.Deferred[list[QueuedMessage]]:
        """The messages of ``ids`` that still exist, read in one thread hop (for listings)."""

        def read() -> list[QueuedMessage]:
            out = []
            for queue_id in ids:
                try:
                    out.append(self.read_message(queue_id))
                except (KeyError, ValueError):
                    continue
            return out

        return threads.deferToThreadPool(self.reactor, self.threadpool, read)

    def load_schedule(self) -> defer.Deferred[list[tuple[str, float, bool]]]:
        """Every committed message's ``(queue_id, next_attempt, held)``, read in a few threads.

        What the queue manager needs at start-up, without building 100,000 ``QueuedMessage``
        values or making 100,000 thread hops. The listing goes through the writer (so torn writes
        are gone first); the reading does not hold it up.
        """
        scan = Scan(self._removing)

        def read(ids: list[str]) -> defer.Deferred[list[tuple[str, float, bool]]]:
            # A few threads at once: from a cold page cache this is bound by the disk's latency.
            n = max(1, min(_READERS, len(ids) // 1000))
            step = -(-len(ids) // n) if ids else 1
            parts = [
                threads.deferToThreadPool(
                    self.reactor,
                    self.threadpool,
                    self._reader.schedule,
                    ids[i : i + step],
                    scan.saved,
                )
                for i in range(0, len(ids), step)
            ]
            d = defer.gatherResults(parts, consumeErrors=True)
            return d.addCallback(lambda chunks: [entry for chunk in chunks for entry in chunk])

        return self._pipeline.submit(scan).addCallback(read)

    def read_message(self, queue_id: str) -> QueuedMessage:
        """Blocking read of one message's state (``load`` in a thread, and the CLI offline)."""
        return self._reader.message(queue_id)

    def open_body(self, queue_id: str) -> IO[bytes]:
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        body = self._recent.body(queue_id)
        if body is not None:
            return io.BytesIO(body)
        if queue_id in self._removing:
            raise KeyError(queue_id)
        return self._reader.body(queue_id)

    def body_size(self, queue_id: str) -> int:
        with self.open_body(queue_id) as f:
            return f.seek(0, 2)

    def save(self, message: QueuedMessage) -> defer.Deferred[None]:
        if message.queue_id in self._removing:
            return defer.fail(KeyError(message.queue_id))
        self._recent.forget(message.queue_id)
        return self._pipeline.submit(Save(message))

    def remove(self, queue_id: str) -> defer.Deferred[None]:
        """Remove a message; a message committed in this life and never saved (a delivery done at
        its first attempt) is answered at once: its file surely exists, the remover unlinks it in
        a moment and, meanwhile, ``load``, ``save`` and ``open_body`` treat it as gone. No thread
        hop back per delivered message; other removals answer once done (KeyError if unknown)."""
        if not is_queue_id(queue_id) or queue_id in self._removing:
            return defer.fail(KeyError(queue_id))
        never_saved = self._recent.never_saved(queue_id)
        self._recent.forget(queue_id)
        answered = never_saved and self._pipeline.running
        job = Remove(queue_id, saved=not never_saved, answered=answered)
        if answered:
            self._removing.add(queue_id)
        self._pipeline.remove(job)
        return defer.succeed(None) if answered else job.deferred

    # -- blocking access for offline tools (the CLI on a stopped instance) -------------------

    def scan_ids(self) -> list[str]:
        """The committed ids, read without changing anything (safe while an instance runs)."""
        messages, _, segments = list_queue(self.queue_dir)
        found = read_segments(self.queue_dir, segments, messages, repair=False, fsync=self.fsync)
        return sorted(messages | set(found))

    def run_now(self, job: WriterJob | Remove) -> Any:
        """Do one job in the calling thread; only when no thread runs (a stopped instance)."""
        return self._pipeline.run_now(job)

    def save_now(self, message: QueuedMessage) -> None:
        self._recent.forget(message.queue_id)
        self.run_now(Save(message))

    def remove_now(self, queue_id: str) -> None:
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        self._recent.forget(queue_id)
        self.run_now(Remove(queue_id))
