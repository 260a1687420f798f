"""The commit pipeline: the spool's threads, what each owns, and what crosses between them.

The guarantee: a job's Deferred fires (and so the 250 goes out) only once what it wrote is
durable: its file fsynced and, when it added a name to ``queue/`` (a file renamed there, or a
new segment), ``queue/`` fsynced after that. ``Writer.run_batch`` fsyncs the files before
``publish`` renames them; a job that added a name (``renames``) is answered only by
``DirSyncer.run``, after its fsync of ``queue/``; a pack's append is durable when
``Appender.append`` returns (``RWF_DSYNC``) or once the writer has fsynced it.

Thread model. No state is shared between threads but through a queue or behind a lock:

- The reactor thread submits jobs (``Pipeline.submit``: the ``jobs`` queue; ``Pipeline.remove``:
  the ``removals`` queue) and receives results, a batch at a time, through ``callFromThread``
  (``answer``). It alone owns the facade's memory of recent commits.
- The writer thread (``Writer``) takes every job waiting in ``jobs`` as one batch: small commits
  go into packs, appended to the current segment in one durable write; larger ones get a file.
  It owns the current segment (``segments.Appender``), its temporary-file counter and the
  ``fsyncs.FsyncPool`` (whose threads only fsync the descriptors handed to them, through
  futures). A batch whose publish renamed into ``queue/`` goes to ``renamed`` (a queue) with its
  other results; any other batch is answered by the writer itself.
- The directory-sync thread (``DirSyncer``) takes every batch waiting in ``renamed``, fsyncs
  ``queue/`` once for them all (group commit, pipelined with the writer's next batch), runs the
  jobs' ``durable`` step and answers them.
- The remover thread (``Remover``) takes every ``jobs.Remove`` waiting in ``removals``, so no
  commit waits behind an unlink. It owns the segments' erasures (``segments.Eraser``) and makes
  them and its unlinks durable when idle, or ``REMOVAL_IDLE`` after its first unsynced batch (a
  removal lost in a crash means a message delivered twice, never one lost). It asks the writer,
  through ``jobs``, to close a segment it emptied (``jobs.CloseSegment``).
- The read pool (the facade's ``ThreadPool``) reads states and schedules (``reading.Reader``).

Shared behind locks: ``segments.SegmentIndex`` (where each small message lies), each
``segments.Segment``'s counts, ``spares.RemovalCount``, ``spares.SpareFiles`` (the remover adds
the file of a removed message, the writer rewrites it once its removal is durable),
``spares.OpenFiles`` (files being read), and the two ``IdSet``s of the facade (messages being
received, messages answered as removed but not yet unlinked). The descriptor of ``queue/`` is
opened before the threads start and closed after they end. A job belongs to one thread at a time:
it moves only through the queues (see ``jobs``).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.queue.spool.format import STATE
from mailrelay.queue.spool.fsyncs import FsyncPool
from mailrelay.queue.spool.jobs import CloseSegment, Remove, Stop, WriterJob, packs
from mailrelay.queue.spool.reading import Reader
from mailrelay.queue.spool.segments import Appender, Eraser, Record, Segment, SegmentIndex, unlink
from mailrelay.queue.spool.spares import RemovalCount, SpareFiles

log = Logger()

REMOVAL_IDLE = 0.1  # seconds without removals before the remover syncs queue/ itself

Result = tuple[WriterJob, Any]  # a job and its result (a Failure if it failed)
Handed = tuple[list[Result], list[WriterJob], WriterJob | None]  # results, renamed, the stop
T = TypeVar("T")


class IdSet:
    """A set of names shared between threads, behind a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: set[str] = set()

    def add(self, name: str) -> None:
        with self._lock:
            self._names.add(name)

    def discard(self, name: str) -> None:
        with self._lock:
            self._names.discard(name)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._names

    def copy(self) -> set[str]:
        with self._lock:
            return set(self._names)


def _take_all(q: queue.SimpleQueue[T], first: T) -> list[T]:
    """``first`` and whatever else waits in ``q``: one batch."""
    batch = [first]
    while True:
        try:
            batch.append(q.get_nowait())
        except queue.Empty:
            return batch


class Writer:
    """The writer thread's own state, and its loop."""

    def __init__(self, p: Pipeline, spares: SpareFiles | None, dsync: bool) -> None:
        self.p = p
        self.spares = spares
        self.appender = Appender(p.queue_dir, dsync)
        self._tmp_counter = 0

    def new_file(self, path: str) -> tuple[str, int, int]:
        """A file to write a new message into: a spare when one is ready (written where it lies,
        and renamed into ``queue/`` from there), else ``path`` made new; its path, a descriptor
        for writing, and the size it had."""
        spare = self.spares.take() if self.spares is not None else None
        if spare is not None and spare.fd is not None:
            return spare.path, spare.fd, spare.size
        return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), 0

    def write_tmp(self, queue_id: str, data: bytes) -> tuple[str, int]:
        """Write ``data`` to a new file in ``tmp/``; its path and descriptor (to be fsynced)."""
        self._tmp_counter += 1
        path = os.path.join(self.p.tmp_dir, f"{queue_id}{STATE}.{self._tmp_counter}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            unlink(path)
            raise
        return path, fd

    def append(self, data: bytes, name: str) -> tuple[Segment, int, bool, int | None]:
        return self.appender.append(data, name)

    def close_segment(self, segment: Segment | None = None, if_empty: bool = False) -> None:
        self.appender.close(segment, if_empty=if_empty)

    def run_batch(
        self, batch: list[WriterJob], close: bool = True
    ) -> tuple[list[Result], list[WriterJob]]:
        """Stage, fsync and publish ``batch``: the results known now, and the jobs whose renames
        wait for a sync of ``queue/``. ``close=False`` leaves the fsynced files open (closed by
        whoever answers the job, a system call less here)."""
        results: list[Result] = []
        staged: list[WriterJob] = []
        for job in batch:
            try:
                job.stage(self.p)
                staged.append(job)
            except BaseException as e:
                job.close_files()
                results.append((job, job.failed(self.p, e)))
        pairs = [(job, fd) for job in staged for fd in job.fds]
        errors: dict[WriterJob, OSError] = {}
        outcomes = self.p.fsyncs.sync([fd for _, fd in pairs]) if pairs else []
        for (job, _), error in zip(pairs, outcomes, strict=True):
            if error is not None:
                errors.setdefault(job, error)
        if close:
            for job in staged:
                job.close_files()
        renamed: list[WriterJob] = []
        for job in staged:
            try:
                if job in errors:
                    raise errors[job]
                job.publish(self.p)
            except BaseException as e:
                results.append((job, job.failed(self.p, e)))
                continue
            if job.renames:
                renamed.append(job)
            else:
                results.append((job, job.result))
        return results, renamed

    def run(self) -> None:
        """The writer thread: each batch written, fsynced and renamed, then answered, or handed to
        the directory syncer when a rename waits for a sync of ``queue/``."""
        limit = self.p.segment_body_max
        stopping: WriterJob | None = None
        while stopping is None:
            batch = _take_all(self.p.jobs, self.p.jobs.get())
            stopping = next((j for j in batch if j.stops), None)
            jobs = [j for j in batch if not j.stops]
            small = [c for j in jobs if (c := j.small_commit(limit)) is not None]
            if small:  # appended together to the current segment
                packed = set(small)
                jobs = [j for j in jobs if j not in packed] + list(packs(small))
            results, renamed = self.run_batch(jobs, close=False)
            if renamed or stopping is not None:
                self.p.renamed.put((results, renamed, stopping))
                continue
            # Durable already (packs into a segment whose name is synced): answered from here,
            # without a turn through the directory syncer (a thread hop, 0.3 ms at the median
            # under load). Nothing orders these after an earlier batch still waiting for its
            # sync: each result belongs to another job, and the stop still goes last.
            self.p.answer(results, [job for job, _ in results])


class DirSyncer:
    """The directory-sync thread: one fsync of ``queue/`` for every batch renamed meanwhile."""

    def __init__(self, p: Pipeline) -> None:
        self.p = p

    def sync_renamed(self, renamed: list[WriterJob]) -> list[Result]:
        """One fsync of ``queue/`` makes every rename of ``renamed`` durable; their results."""
        if not renamed:
            return []
        removals = self.p.removals_done.done()
        try:
            self.p.sync_queue_dir()
        except OSError as e:
            return [(job, job.failed(self.p, e)) for job in renamed]
        self.p.removals_done.covered(removals)  # the sync covered those unlinks too
        for job in renamed:
            job.durable(self.p)
        return [(job, job.result) for job in renamed]

    def run(self) -> None:
        stopping: WriterJob | None = None
        while stopping is None:
            handed = _take_all(self.p.renamed, self.p.renamed.get())
            results = [r for h in handed for r in h[0]]
            results += self.sync_renamed([j for h in handed for j in h[1]])
            stopping = next((h[2] for h in handed if h[2] is not None), None)
            # the writer left the files of every job handed over open
            self.p.answer(results, [j for h in handed for j in [j for j, _ in h[0]] + h[1]])
        self.p.reactor.callFromThread(stopping.deferred.callback, None)


class Remover:
    """The remover thread's own state (the segments' erasures), and its loop."""

    def __init__(self, p: Pipeline, spares: SpareFiles | None) -> None:
        self.p = p
        self.spares = spares  # None: unlink removed files (offline: no writer to reuse them)
        self.eraser = Eraser(p.fsync)
        self._unsynced_since: float | None = None  # the first batch since the last sync

    def remove(self, job: Remove) -> None:
        """Take ``job.queue_id`` out of the queue; KeyError if it is not there."""
        record = job.record or self.p.index.pop(job.queue_id)
        if record is not None:
            self.eraser.erase(record)
            return
        # The message first: a crash in between leaves a state without message, cleaned at start.
        path = self.p.reader.path(job.queue_id)
        if self.spares is not None:
            found = self.spares.take_from_queue(path, job.queue_id)
        else:
            found = unlink(path)
        if job.saved:
            unlink(self.p.reader.path(job.queue_id, STATE))
        if not found:
            raise KeyError(job.queue_id)

    def remove_all(self, batch: Iterable[Remove]) -> list[tuple[Remove, Any]]:
        results: list[tuple[Remove, Any]] = []
        for job in batch:
            try:
                self.remove(job)
                results.append((job, None))
            except BaseException as e:
                results.append((job, Failure(e)))
        self.p.removals_done.add(len(results))
        return results

    def sync(self) -> None:
        """Make the erasures and unlinks done so far durable."""
        self.eraser.sync()
        if self.p.removals_done.pending():
            done = self.p.removals_done.done()
            try:
                self.p.sync_queue_dir()
                self.p.removals_done.covered(done)
            except OSError as e:
                log.error("spool: cannot sync the queue directory after removals: {error}", error=e)
        self._unsynced_since = None

    def run(self) -> None:
        """The remover thread: unlinks delivered messages, so no commit ever waits behind them."""
        q = self.p.removals
        stopping: Stop | None = None
        while stopping is None:
            try:
                first = q.get(timeout=REMOVAL_IDLE)
            except queue.Empty:
                self.sync()  # idle a moment: make the erasures and unlinks durable
                for segment in self.eraser.touched():
                    if segment.is_empty():  # nothing queued in it: let it go
                        self.p.jobs.put(CloseSegment(segment))
                first = q.get()
            batch = _take_all(q, first)
            stopping = next((j for j in batch if isinstance(j, Stop)), None)
            results = self.remove_all(j for j in batch if isinstance(j, Remove))
            # Under steady load too, at most REMOVAL_IDLE later (most segments' records are all
            # gone by then, and a segment that goes needs no sync of its erasures).
            now = self.p.timer()
            if self._unsynced_since is None:
                self._unsynced_since = now
            elif now - self._unsynced_since >= REMOVAL_IDLE:
                self.sync()
            for job, _ in results:
                if job.answered:
                    self.p.removing.discard(job.queue_id)
            # Answered removals need no call back to the reactor unless they failed.
            results = [(j, r) for j, r in results if not j.answered or isinstance(r, Failure)]
            if results:
                self.p.reactor.callFromThread(_answer_all, results)
        self.sync()
        self.p.reactor.callFromThread(stopping.deferred.callback, None)


def _answer_all(results: list[tuple[Any, Any]]) -> None:
    """On the reactor thread: each job's result to its Deferred."""
    for job, result in results:
        job.answer(result)


class Pipeline:
    """The writer, directory-sync and remover threads and their queues (see the module docstring).

    Offline (never started: the CLI on a stopped instance), ``run_now`` does a job in the calling
    thread with the same objects, no thread running.
    """

    def __init__(
        self,
        reactor: Any,
        tmp_dir: str,
        queue_dir: str,
        reader: Reader,
        removing: IdSet,
        *,
        fsync: Callable[[int], None],
        fsync_threads: int,
        timer: Callable[[], float],
        dsync: bool,
        segment_body_max: int,
    ) -> None:
        self.reactor = reactor
        self.tmp_dir, self.queue_dir = tmp_dir, queue_dir
        self.reader = reader
        self.index: SegmentIndex = reader.index
        self.removing = removing
        self.fsync = fsync
        self.timer = timer
        self.segment_body_max = segment_body_max
        self.fsyncs = FsyncPool(fsync, fsync_threads, timer)
        self.removals_done = RemovalCount()
        spares = SpareFiles(tmp_dir, reader.open_files, self.removals_done)
        self.spares = spares
        self.jobs: queue.SimpleQueue[WriterJob] = queue.SimpleQueue()
        self.renamed: queue.SimpleQueue[Handed] = queue.SimpleQueue()
        self.removals: queue.SimpleQueue[Remove | Stop] = queue.SimpleQueue()
        self.writer = Writer(self, spares, dsync)
        self._remover = Remover(self, spares)
        self._dir_fd: int | None = None
        self._threads: list[threading.Thread] = []

    @property
    def running(self) -> bool:
        return bool(self._threads)

    def start(self) -> None:
        self.fsyncs.start()
        self._dir_fd = os.open(self.queue_dir, os.O_RDONLY | os.O_DIRECTORY)
        for name, target in (
            ("writer", self.writer.run),  # first: close_segment knows it as _threads[0]
            ("dirsync", DirSyncer(self).run),
            ("remover", self._remover.run),
        ):
            thread = threading.Thread(target=target, name=f"mailrelay-spool-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self) -> defer.Deferred[None]:
        """Fires once every job submitted before is done and the threads have ended."""
        stop_removals = Stop()
        self.removals.put(stop_removals)
        d = defer.gatherResults([self.submit(Stop()), stop_removals.deferred])

        def stopped(_: object) -> None:
            threads, self._threads = self._threads, []
            for thread in threads:
                thread.join()
            self.fsyncs.stop()
            self.writer.close_segment()
            self._remover.eraser.sync()  # erasures of moved records done after the remover ended
            self.spares.close()
            self._close_dir()

        return d.addCallback(stopped)

    def submit(self, job: WriterJob) -> defer.Deferred[Any]:
        self.jobs.put(job)
        return job.deferred

    def remove(self, job: Remove) -> None:
        self.removals.put(job)

    # -- for the jobs' steps (any pipeline thread) ------------------------------------------

    def close_segment(self, segment: Segment) -> None:
        """Have the writer append no more to ``segment``: at once in the writer thread (or
        offline), else through ``jobs``."""
        if not self._threads or threading.current_thread() is self._threads[0]:  # the writer
            self.writer.close_segment(segment)
        else:
            self.jobs.put(CloseSegment(segment, failed=True))

    def erase_moved(self, queue_id: str, record: Record) -> None:
        """Erase the record of a message that moved out of its segment, now that its own file is
        durable; left undone if the spool stops first (the next start erases it)."""
        job = Remove(queue_id, saved=False, answered=True, record=record)
        if self._threads:
            self.removals.put(job)
        else:
            self._remover.remove(job)

    def sync_queue_dir(self) -> None:
        """fsync ``queue/`` through a descriptor kept open (one open per spool, not per batch)."""
        if self._dir_fd is None:  # offline
            self._dir_fd = os.open(self.queue_dir, os.O_RDONLY | os.O_DIRECTORY)
        self.fsync(self._dir_fd)

    def _close_dir(self) -> None:
        fd, self._dir_fd = self._dir_fd, None
        if fd is not None:
            os.close(fd)

    def answer(self, results: list[Result], jobs: list[WriterJob]) -> None:
        """Hand ``results`` to the reactor thread, then close the files left open for ``jobs``."""
        if results:
            self.reactor.callFromThread(_answer_all, results)
        for job in jobs:
            job.close_files()

    # -- offline ------------------------------------------------------------------------------

    def run_now(self, job: WriterJob | Remove) -> Any:
        """Do one job in the calling thread; only when no thread runs (a stopped instance)."""
        if self._threads:
            raise RuntimeError("the spool's threads are running; submit jobs instead")
        remover = Remover(self, None)
        try:
            if isinstance(job, Remove):
                ((_, result),) = remover.remove_all([job])
            else:
                results, renamed = self.writer.run_batch([job])
                results += DirSyncer(self).sync_renamed(renamed)
                ((_, result),) = results
            remover.sync()
            self._remover.eraser.sync()
        finally:
            self._close_dir()
        if isinstance(result, Failure):
            result.raiseException()
        return result
