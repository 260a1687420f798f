"""The filesystem spool: the default ``IQueueStore``, durable before the 250.

Layout under ``path``::

    tmp/<id>.body          a body being received (buffered writes from the reactor thread)
    tmp/<id>.env.<n>       an envelope being written
    queue/<id>.body        a committed body
    queue/<id>.env         its envelope and per-recipient state (JSON); its presence marks the commit

Every commit and save of the ``queue/`` directory happens in one writer thread, which
takes every job waiting for it, fsyncs their files, renames them into place and fsyncs ``queue/``
once for the whole batch (group commit); each job's Deferred fires only after that. Removals come
in a thread of their own (an unlink can take milliseconds on a busy disk; no commit waits behind
one) and need no fsync before they are answered: that thread syncs ``queue/`` when it goes idle (a
removal lost in a crash means a message delivered twice, never one lost). Nothing touches
``fsync`` on the reactor thread. A crash leaves at worst files in ``tmp/`` or a body without its
envelope in ``queue/``: both are removed at start, never delivered.
"""

from __future__ import annotations

import json
import os
import queue as _queue
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

import attrs
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailrelay.envelope import Envelope, QueuedMessage
from mailrelay.interfaces import IMessageWriter, IQueueStore
from mailrelay.queue.store import (
    QueueIdGenerator,
    is_queue_id,
    message_from_dict,
    message_to_dict,
    new_message,
    storage_failure,
)

log = Logger()

_BODY = ".body"
_ENV = ".env"
_BUFFER = 256 * 1024
_READERS = 2
_FRESH = 1024  # just-committed messages kept in memory for their first load
_SYNCERS = 16  # threads that fsync a batch's files together (concurrent fsyncs share a journal commit)
_SCHEDULE_KEYS = re.compile(rb'"next_attempt":(-?[0-9][0-9.eE+-]*),"held":(true|false)')  # threads reading envelopes at start-up


def _encode(message: QueuedMessage) -> bytes:
    return json.dumps(message_to_dict(message), separators=(",", ":")).encode()


class _Job:
    """One change of the queue directory, done in the writer thread in three steps.

    ``stage`` writes the job's files under temporary names and lists in ``fds`` what must be
    synced; the writer fsyncs the files of the whole batch at once (in parallel: the journal merges
    them), closes them, then ``publish`` renames them into place. The writer fsyncs ``queue/``
    once for the batch; then ``result`` goes to the Deferred on the reactor thread.
    """

    changes_queue = True

    def __init__(self) -> None:
        self.deferred: defer.Deferred[Any] = defer.Deferred()
        self.result: Any = None
        self.fds: list[int] = []

    def stage(self, spool: FilesystemSpool) -> None:
        pass

    def synced(self) -> None:
        """The files in ``fds`` are durable (or failed): close them."""
        fds, self.fds = self.fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def publish(self, spool: FilesystemSpool) -> None:
        pass

    def undo(self, spool: FilesystemSpool) -> None:
        """Remove whatever this job left behind after it failed."""


class _Commit(_Job):
    def __init__(self, writer: _SpoolWriter) -> None:
        super().__init__()
        self.writer = writer
        self.env_tmp: str | None = None
        self.message: QueuedMessage | None = None
        self.published: list[str] = []

    def stage(self, spool: FilesystemSpool) -> None:
        w = self.writer
        if w.file is None:
            # A small body was only buffered: its file is created here, off the reactor thread.
            fd = os.open(w.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self.fds.append(fd)
            _write_all(fd, w.pending)
            w.pending = bytearray()
        else:
            w.file.flush()
            self.fds.append(os.dup(w.file.fileno()))
            w.file.close()
            w.file = None
        self.message = new_message(w.queue_id, w.envelope)
        self.env_tmp = spool._write_tmp(w.queue_id, _encode(self.message), self.fds)
        self.result = w.queue_id

    def publish(self, spool: FilesystemSpool) -> None:
        qid = self.writer.queue_id
        body = spool._queued(qid, _BODY)
        os.rename(self.writer.tmp_path, body)
        self.published.append(body)
        env = spool._queued(qid, _ENV)
        assert self.env_tmp is not None
        os.rename(self.env_tmp, env)  # the envelope last: its presence is the commit
        self.published.append(env)

    def undo(self, spool: FilesystemSpool) -> None:
        self.writer._close_quietly()
        for path in [self.writer.tmp_path, self.env_tmp, *reversed(self.published)]:
            if path:
                _unlink(path)


class _Save(_Job):
    def __init__(self, message: QueuedMessage) -> None:
        super().__init__()
        self.message = message
        self.env_tmp: str | None = None

    def stage(self, spool: FilesystemSpool) -> None:
        qid = self.message.queue_id
        if not os.path.exists(spool._queued(qid, _BODY)):
            raise KeyError(qid)  # removed meanwhile: never resurrect an envelope without its body
        self.env_tmp = spool._write_tmp(qid, _encode(self.message), self.fds)

    def publish(self, spool: FilesystemSpool) -> None:
        assert self.env_tmp is not None
        os.rename(self.env_tmp, spool._queued(self.message.queue_id, _ENV))
        self.env_tmp = None

    def undo(self, spool: FilesystemSpool) -> None:
        if self.env_tmp:
            _unlink(self.env_tmp)


class _Remove(_Job):
    def __init__(self, queue_id: str) -> None:
        super().__init__()
        self.queue_id = queue_id

    def publish(self, spool: FilesystemSpool) -> None:
        # The envelope first: a crash in between leaves a body without envelope, cleaned at start.
        found = _unlink(spool._queued(self.queue_id, _ENV))
        _unlink(spool._queued(self.queue_id, _BODY))
        if not found:
            raise KeyError(self.queue_id)


class _Scan(_Job):
    """List the committed ids, removing torn writes; in the writer thread so no commit is half seen."""

    changes_queue = False

    def __init__(self, clean_tmp: bool = False) -> None:
        super().__init__()
        self.clean_tmp = clean_tmp

    def stage(self, spool: FilesystemSpool) -> None:
        if self.clean_tmp:
            for entry in os.scandir(spool.tmp_dir):
                if entry.name not in spool._receiving:
                    log.info("spool: removing incomplete file tmp/{name}", name=entry.name)
                    _unlink(entry.path)
        bodies, envs = set(), set()
        for entry in os.scandir(spool.queue_dir):
            stem, ext = os.path.splitext(entry.name)
            if ext == _BODY:
                bodies.add(stem)
            elif ext == _ENV:
                envs.add(stem)
        for stem in bodies - envs:
            log.warn("spool: removing body without envelope queue/{name}", name=stem + _BODY)
            _unlink(spool._queued(stem, _BODY))
        for stem in envs - bodies:
            log.warn("spool: removing envelope without body queue/{name}", name=stem + _ENV)
            _unlink(spool._queued(stem, _ENV))
        self.result = sorted(bodies & envs)


class _Stop(_Job):
    changes_queue = False


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False


@implementer(IMessageWriter)
class _SpoolWriter:
    """One message being received into ``tmp/``.

    ``write`` gathers the first 256 KiB in memory; only a larger body gets its file in ``tmp/``
    then (buffered, a write syscall per 256 KiB), so the reactor thread never waits for the disk
    to sync, and a small message's file is created by the writer thread at commit (a file
    creation can wait for the journal while other messages are being fsynced). An error is kept
    and reported by ``commit`` as 452 4.3.1 after the partial file is removed.
    """

    def __init__(self, spool: FilesystemSpool, queue_id: str, envelope: Envelope) -> None:
        self.spool = spool
        self.queue_id = queue_id
        self.envelope = envelope
        self.tmp_path = os.path.join(spool.tmp_dir, queue_id + _BODY)
        self.error: OSError | None = None
        self.done = False
        self.size = 0
        self.file: IO[bytes] | None = None
        self.pending = bytearray()  # the body while it is small enough to keep in memory
        spool._receiving.add(queue_id + _BODY)

    def _fail(self, error: OSError) -> None:
        if self.error is None:
            log.error("spool: cannot store message {queue_id}: {error}", queue_id=self.queue_id, error=error)
        self.error = error
        created = self.file is not None
        self._close_quietly()
        self.pending = bytearray()
        if created:
            _unlink(self.tmp_path)

    def _close_quietly(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
            self.file = None

    def write(self, data: bytes) -> None:
        if self.done or self.error is not None:
            return
        self.size += len(data)
        if self.file is None and len(self.pending) + len(data) <= _BUFFER:
            self.pending += data
            return
        try:
            if self.file is None:
                self.file = open(self.tmp_path, "xb", buffering=_BUFFER)  # noqa: SIM115 - lives until commit
                self.file.write(self.pending)
                self.pending = bytearray()
            self.file.write(data)
        except OSError as e:
            self._fail(e)

    def commit(self) -> defer.Deferred[str]:
        if self.done:
            raise RuntimeError(f"message {self.queue_id} already committed or aborted")
        self.done = True
        if self.error is not None:
            self.spool._receiving.discard(self.queue_id + _BODY)
            return defer.fail(storage_failure())
        job = _Commit(self)
        d = self.spool._submit(job)

        def finished(result: Any) -> Any:
            self.spool._receiving.discard(self.queue_id + _BODY)
            return result

        return d.addBoth(finished)

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        self.pending = bytearray()
        if self.file is not None:
            self._close_quietly()
            _unlink(self.tmp_path)  # one quick unlink; no fsync needed to forget a message
        self.spool._receiving.discard(self.queue_id + _BODY)


@implementer(IQueueStore)
class FilesystemSpool:
    """``IQueueStore`` on a local directory; see the module docstring for the layout and guarantees.

    ``threadpool`` runs the reads (``load``); the spool starts its own when none is given. ``fsync``
    and ``randbytes`` are injectable so tests can observe the order of durability and ids.
    """

    def __init__(
        self,
        path: str,
        reactor: Any,
        threadpool: ThreadPool | None = None,
        *,
        fsync: Callable[[int], None] = os.fsync,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.path = os.path.abspath(path)
        self.reactor = reactor
        self.fsync = fsync
        self.tmp_dir = os.path.join(self.path, "tmp")
        self.queue_dir = os.path.join(self.path, "queue")
        self.new_id = QueueIdGenerator(reactor, randbytes)
        self._own_pool = threadpool is None
        self.threadpool = threadpool or ThreadPool(minthreads=0, maxthreads=4, name="mailrelay-spool")
        self._jobs: _queue.SimpleQueue[_Job] = _queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._removals: _queue.SimpleQueue[_Job] = _queue.SimpleQueue()
        self._remover: threading.Thread | None = None
        self._syncers: ThreadPoolExecutor | None = None
        self._subscribers: list[Callable[[str], object]] = []
        self._receiving: set[str] = set()
        # What each recent commit wrote, so the queue manager's first ``load`` of a new message
        # costs no thread hop, file read or JSON decode. Bounded: a paused queue does not hold
        # its messages in memory. Dropped on save/remove, so it never differs from the disk.
        self._fresh: OrderedDict[str, QueuedMessage] = OrderedDict()
        self._tmp_counter = 0
        self._removed_unsynced = False  # unlinks in queue/ not yet covered by an fsync of it
        #: How many batches the writer has made durable (each one ``fsync`` of ``queue/``).
        self.commit_passes = 0
        # Mail is private: a spool we create is for our user only (the control socket lives here too).
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        os.makedirs(self.tmp_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.queue_dir, mode=0o700, exist_ok=True)

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread; it first removes what a crash left half-written."""
        if self._thread is not None:
            return
        if self._own_pool:
            self.threadpool.start()
        self._syncers = ThreadPoolExecutor(max_workers=_SYNCERS, thread_name_prefix="mailrelay-spool-fsync")
        self._submit(_Scan(clean_tmp=True))
        self._thread = threading.Thread(target=self._run, name="mailrelay-spool-writer", daemon=True)
        self._thread.start()
        self._remover = threading.Thread(target=self._run_removals, name="mailrelay-spool-remover", daemon=True)
        self._remover.start()

    def stop(self) -> defer.Deferred[None]:
        """A Deferred that fires once every job submitted before has been done and the thread ended."""
        if self._thread is None:
            return defer.succeed(None)
        remover, self._remover = self._remover, None
        stop_removals: _Job = _Stop()
        if remover is not None:
            self._removals.put(stop_removals)
        else:
            stop_removals.deferred.callback(None)
        d = defer.gatherResults([self._submit(_Stop()), stop_removals.deferred])

        def stopped(_: object) -> None:
            assert self._thread is not None
            self._thread.join()
            self._thread = None
            if remover is not None:
                remover.join()
            if self._syncers is not None:
                self._syncers.shutdown()
                self._syncers = None
            if self._own_pool:
                self.threadpool.stop()

        return d.addCallback(stopped)

    # -- IMessageSink / IQueueStore ---------------------------------------------------------

    def open(self, envelope: Envelope) -> _SpoolWriter:
        if not envelope.received_at:
            envelope = attrs.evolve(envelope, received_at=self.reactor.seconds())
        return _SpoolWriter(self, self.new_id(), envelope)

    def list_ids(self) -> defer.Deferred[list[str]]:
        return self._submit(_Scan())

    def load(self, queue_id: str) -> defer.Deferred[QueuedMessage]:
        fresh = self._fresh.pop(queue_id, None)
        if fresh is not None:
            return defer.succeed(fresh)
        return threads.deferToThreadPool(self.reactor, self.threadpool, self.read_message, queue_id)

    def load_schedule(self) -> defer.Deferred[list[tuple[str, float, bool]]]:
        """Every committed message's ``(queue_id, next_attempt, held)``, read in one pass in a thread.

        What the queue manager needs at start-up, without building 100,000 ``QueuedMessage``
        values or making 100,000 thread hops. The listing goes through the writer (so torn writes
        are gone first); the reading does not hold it up.
        """
        def read(ids: list[str]) -> defer.Deferred[list[tuple[str, float, bool]]]:
            # A few threads at once: from a cold page cache this is bound by the disk's latency.
            n = max(1, min(_READERS, len(ids) // 1000))
            step = -(-len(ids) // n) if ids else 1
            parts = [threads.deferToThreadPool(self.reactor, self.threadpool, self._read_schedule,
                                               ids[i:i + step]) for i in range(0, len(ids), step)]
            d = defer.gatherResults(parts, consumeErrors=True)
            return d.addCallback(lambda chunks: [entry for chunk in chunks for entry in chunk])

        return self.list_ids().addCallback(read)

    def _read_schedule(self, ids: list[str]) -> list[tuple[str, float, bool]]:
        out = []
        for queue_id in ids:
            try:
                with open(self._queued(queue_id, _ENV), "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                continue  # delivered meanwhile
            # The two top-level keys come last (see message_to_dict) and a raw '"' cannot occur
            # inside a JSON string, so this finds them without parsing the whole envelope.
            m = _SCHEDULE_KEYS.search(data, max(0, len(data) - 200))
            if m is not None:
                out.append((queue_id, float(m.group(1)), m.group(2) == b"true"))
                continue
            try:
                d = json.loads(data)
            except ValueError:
                log.error("spool: unreadable envelope queue/{queue_id}.env", queue_id=queue_id)
                continue
            out.append((queue_id, float(d.get("next_attempt", 0.0)), bool(d.get("held", False))))
        return out

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

    def read_message(self, queue_id: str) -> QueuedMessage:
        """Blocking read of one envelope (used by ``load`` in a thread, and by the CLI offline)."""
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        try:
            with open(self._queued(queue_id, _ENV), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise KeyError(queue_id) from None
        return message_from_dict(json.loads(data))

    def open_body(self, queue_id: str) -> IO[bytes]:
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        try:
            return open(self._queued(queue_id, _BODY), "rb")
        except FileNotFoundError:
            raise KeyError(queue_id) from None

    def body_size(self, queue_id: str) -> int:
        return os.stat(self._queued(queue_id, _BODY)).st_size

    def save(self, message: QueuedMessage) -> defer.Deferred[None]:
        self._fresh.pop(message.queue_id, None)
        return self._submit(_Save(message))

    def remove(self, queue_id: str) -> defer.Deferred[None]:
        if not is_queue_id(queue_id):
            return defer.fail(KeyError(queue_id))
        self._fresh.pop(queue_id, None)
        job = _Remove(queue_id)
        if self._remover is None:
            return self._submit(job)
        self._removals.put(job)
        return job.deferred

    def subscribe(self, callback: Callable[[str], object]) -> None:
        self._subscribers.append(callback)

    # -- blocking access for offline tools (the CLI on a stopped instance) -------------------

    def scan_ids(self) -> list[str]:
        """The committed ids, read without changing anything (safe while an instance runs)."""
        ids = {}
        for entry in os.scandir(self.queue_dir):
            stem, ext = os.path.splitext(entry.name)
            if ext in (_BODY, _ENV):
                ids[stem] = ids.get(stem, 0) + 1
        return sorted(stem for stem, n in ids.items() if n == 2)

    def run_now(self, job: _Job) -> Any:
        """Do one job in the calling thread; only when no writer thread runs (a stopped instance)."""
        if self._thread is not None:
            raise RuntimeError("the spool's writer thread is running; submit jobs instead")
        ((_, result),) = self._do_batch([job])
        self._sync_removals()
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def save_now(self, message: QueuedMessage) -> None:
        self._fresh.pop(message.queue_id, None)
        self.run_now(_Save(message))

    def remove_now(self, queue_id: str) -> None:
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        self._fresh.pop(queue_id, None)
        self.run_now(_Remove(queue_id))

    # -- the writer thread ----------------------------------------------------------------

    def _submit(self, job: _Job) -> defer.Deferred[Any]:
        self._jobs.put(job)
        return job.deferred

    def _queued(self, queue_id: str, ext: str) -> str:
        return os.path.join(self.queue_dir, queue_id + ext)

    def _write_tmp(self, queue_id: str, data: bytes, fds: list[int]) -> str:
        """Write ``data`` to a fresh file in ``tmp/``; its descriptor joins ``fds`` (to be synced)."""
        self._tmp_counter += 1
        path = os.path.join(self.tmp_dir, f"{queue_id}{_ENV}.{self._tmp_counter}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
        except BaseException:
            os.close(fd)
            _unlink(path)
            raise
        fds.append(fd)
        return path

    def _sync_files(self, jobs: list[_Job]) -> dict[_Job, BaseException]:
        """fsync every file of ``jobs``, in parallel when there are several; the errors by job."""
        pairs = [(job, fd) for job in jobs for fd in job.fds]

        def sync(fd: int) -> BaseException | None:
            try:
                self.fsync(fd)
                return None
            except OSError as e:
                return e

        if len(pairs) > 1 and self._syncers is not None:
            outcomes = list(self._syncers.map(sync, [fd for _, fd in pairs]))
        else:
            outcomes = [sync(fd) for _, fd in pairs]
        errors: dict[_Job, BaseException] = {}
        for (job, _), error in zip(pairs, outcomes, strict=True):
            if error is not None:
                errors.setdefault(job, error)
        for job in jobs:
            job.synced()
        return errors

    def _sync_queue_dir(self) -> None:
        fd = os.open(self.queue_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.fsync(fd)
        finally:
            os.close(fd)

    def _sync_removals(self) -> None:
        """fsync ``queue/`` for removals no commit pass has covered yet (when the writer is idle)."""
        if not self._removed_unsynced:
            return
        self._removed_unsynced = False
        try:
            self._sync_queue_dir()
        except OSError as e:
            log.error("spool: cannot sync the queue directory after removals: {error}", error=e)

    def _run(self) -> None:
        stopping: _Job | None = None
        while stopping is None:
            batch = [self._jobs.get()]
            while True:
                try:
                    batch.append(self._jobs.get_nowait())
                except _queue.Empty:
                    break
            results = self._do_batch([j for j in batch if not isinstance(j, _Stop)])
            stopping = next((j for j in batch if isinstance(j, _Stop)), None)
            self.reactor.callFromThread(self._deliver_results, results)
        self.reactor.callFromThread(stopping.deferred.callback, None)

    def _run_removals(self) -> None:
        """The remover thread: unlinks delivered messages, so no commit ever waits behind them."""
        stopping: _Job | None = None
        while stopping is None:
            try:
                first = self._removals.get_nowait()
            except _queue.Empty:
                self._sync_removals()
                first = self._removals.get()
            batch = [first]
            while True:
                try:
                    batch.append(self._removals.get_nowait())
                except _queue.Empty:
                    break
            results = self._do_batch([j for j in batch if not isinstance(j, _Stop)])
            stopping = next((j for j in batch if isinstance(j, _Stop)), None)
            self.reactor.callFromThread(self._deliver_results, results)
        self._sync_removals()
        self.reactor.callFromThread(stopping.deferred.callback, None)

    def _do_batch(self, batch: list[_Job]) -> list[tuple[_Job, Any]]:
        results: list[tuple[_Job, Any]] = []
        staged: list[_Job] = []
        for job in batch:
            try:
                job.stage(self)
                staged.append(job)
            except BaseException as e:
                job.synced()
                results.append((job, self._failure(job, e)))
        errors = self._sync_files(staged)
        published: list[_Job] = []
        for job in staged:
            try:
                if job in errors:
                    raise errors[job]
                job.publish(self)
            except BaseException as e:
                results.append((job, self._failure(job, e)))
                continue
            if job.changes_queue and not isinstance(job, _Remove):
                published.append(job)
            elif job.changes_queue:
                self._removed_unsynced = True
                results.append((job, job.result))
            else:
                results.append((job, job.result))
        if published:
            try:
                self._sync_queue_dir()
                self.commit_passes += 1
            except OSError as e:
                for job in published:
                    results.append((job, self._failure(job, e)))
                published = []
        results.extend((job, job.result) for job in published)
        return results

    def _failure(self, job: _Job, error: BaseException) -> Failure:
        try:
            job.undo(self)
        except OSError:
            pass
        if isinstance(error, OSError) and isinstance(job, _Commit | _Save):
            log.error("spool: cannot store: {error}", error=error)
            return Failure(storage_failure())
        return Failure(error)

    def _deliver_results(self, results: list[tuple[_Job, Any]]) -> None:
        for job, result in results:
            if isinstance(result, Failure):
                job.deferred.errback(result)
                continue
            if isinstance(job, _Commit):
                if job.message is not None:
                    self._fresh[result] = job.message
                    if len(self._fresh) > _FRESH:
                        self._fresh.popitem(last=False)
                for callback in list(self._subscribers):
                    try:
                        callback(result)
                    except Exception:
                        log.failure("spool: subscriber failed for {queue_id}", queue_id=result)
            job.deferred.callback(result)
