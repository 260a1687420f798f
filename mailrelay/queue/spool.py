"""The filesystem spool: the default ``IQueueStore``, durable before the 250.

Layout under ``path``::

    tmp/<id>.body          a message being received: its body, the envelope appended at commit
    tmp/<id>.env.<n>       a state update (or a message moving out of a segment) being written
    tmp/free.<n>           the file of a removed message, kept to be rewritten for a new one
    queue/<id>             a committed message: the body, its envelope (JSON), a 16-byte trailer
                           (magic, body size, envelope size); its presence marks the commit
    queue/<id>.env         its state (JSON) once saved after an attempt; supersedes the envelope
                           stored in ``queue/<id>``
    queue/<id>.seg         a segment: the small messages (up to 64 KiB), records in the same
                           format, appended one writer batch (a *pack*) at a time (``spool_format``)

The writer thread takes every job waiting for it. The small messages among them are appended as one
pack to the current segment in one durable write for them all (``RWF_DSYNC``; a write and an fsync
where the kernel lacks the flag), and no file made, renamed or added to ``queue/`` (a file each
cost a create and an fsync each, 0.8 and 0.3 ms per message on ext4 without a journal here, and a
sync of ``queue/`` per batch). A segment takes packs until it is 4 MiB long; only its first packs
wait for a sync of ``queue/``, and the others are answered by the writer itself, never behind a
directory sync of other work. A larger message gets its own file (its envelope travels with the
body): the writer fsyncs the batch's files (in parallel when there are several and fsyncs are slow:
the journal merges them), renames them into place and hands the batch to the directory syncer,
which fsyncs ``queue/`` once for everything handed to it (group commit) while the writer already
syncs the next batch (pipelined). Each job's Deferred fires only once what it wrote is durable.

Removals come in a thread of their own (an unlink can take milliseconds on a busy disk; no commit
waits behind one) and need no fsync before they are answered: the remover syncs ``queue/`` (or a
directory sync of the writer does) at most 0.1 s later, or as soon as it is idle (a removal lost
in a crash means a message delivered twice, never one lost). A message of a segment is removed
by zeroing its record's trailer, synced the same way; a full segment goes with its last record.
A message of a segment that is saved (deferred, held) moves into a file of its own holding the
new state, and its record is killed once that file is durable: a deferred message never keeps a
segment (or its disk space) alive. Should a crash come in between, the file wins at start. A
crash in the middle of an append leaves a torn pack at the end of a segment, never acknowledged:
its CRC fails, and it is cut off at start. The file of a removed message is kept for the next
large one (``tmp/free.<n>``, a bounded pool, each reused only once a sync of ``queue/`` has made
its removal durable): creating and freeing an inode costs more CPU than the rest of the commit
(ext4 scans past recently freed inodes).
Nothing touches ``fsync`` on the reactor thread. A crash leaves at worst files in ``tmp/`` or a
state without its message in ``queue/``: both are removed at start, never delivered. A spool of
the older two-file layout (``queue/<id>.body`` + ``queue/<id>.env``) is converted at start.
"""

from __future__ import annotations

import errno
import io
import json
import os
import queue as _queue
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

import attrs
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailrelay._files import write_all
from mailrelay.envelope import Envelope, QueuedMessage
from mailrelay.interfaces import (
    IBatchLoader,
    IMessageWriter,
    IOfflineQueue,
    IQueueStore,
    IScheduleLoader,
    IStartableStore,
)
from mailrelay.queue.spool_format import (
    CHUNK_HEADER,
    SEGMENT,
    TRAILER,
    Member,
    Segment,
    alive,
    build_pack,
    chunk,
    read_envelope,
    read_segment,
    read_trailer,
    trailer,
)
from mailrelay.queue.store import (
    QueueIdGenerator,
    is_queue_id,
    message_from_dict,
    message_to_dict,
    new_message,
    storage_failure,
)

log = Logger()

_RECEIVING = ".body"  # tmp/<id>.body: a message being received
_ENV = ".env"
_LEGACY_BODY = ".body"  # queue/<id>.body of the two-file layout
_BUFFER = 256 * 1024
_READERS = 2  # threads reading envelopes at start-up
_FRESH = 1024  # just-committed messages kept in memory for their first load
_FRESH_BODY_BYTES = 16 * 1024 * 1024  # and their small bodies, for their first delivery
_SYNCERS = (
    16  # threads that fsync a batch's files together (concurrent fsyncs share a journal commit)
)
_SLOW_FSYNC = 0.002  # seconds: fsyncs slower than this on average are worth those threads
_PROBE_EVERY = 64  # while they are used, one batch in this many is fsynced by the writer, timed
_REMOVAL_IDLE = 0.1  # seconds without removals before the remover syncs queue/ itself
_FREE_FILES = 256  # files of removed messages kept in tmp/ for new ones (no inode freed and made)
_FREE = "free."  # tmp/free.<n>: such a file
_KEPT_OPEN = 64  # of those, how many the remover keeps open for the writer (no open/fstat there)
_SCHEDULE_KEYS = re.compile(rb'"next_attempt":(-?[0-9][0-9.eE+-]*),"held":(true|false)')
_TAIL = 4096  # bytes read from a message file's end: the envelope and trailer, most of the time
_SEGMENT_BODY_MAX = (
    64 * 1024
)  # bodies up to this size go into segments (with the others of their batch)
_SEGMENT_MAX = 4 * 1024 * 1024  # a segment takes no more packs once this long
_PACK_BYTES = 1024 * 1024  # bodies in one pack, at most (unless one body is larger)


_JSON = json.JSONEncoder(
    separators=(",", ":")
)  # one encoder (json.dumps with options builds one per call)


def _encode(message: QueuedMessage) -> bytes:
    return _JSON.encode(message_to_dict(message)).encode()


class _BodyFile(io.RawIOBase):
    """The body part of a message file or segment record: a read-only, seekable file of ``size``
    bytes from ``base`` (``pread``)."""

    def __init__(
        self, fd: int, size: int, on_close: Callable[[], None] | None = None, base: int = 0
    ) -> None:
        super().__init__()
        self._fd, self._size, self._pos, self._base = fd, size, 0, base
        self._on_close = on_close

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        left = self._size - self._pos
        if n is None or n < 0 or n > left:
            n = left
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self._base + self._pos)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, self._size)[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
                if self._on_close is not None:
                    self._on_close()
            finally:
                super().close()


class _Job:
    """One change of the queue directory, done in the writer thread in three steps.

    ``stage`` writes the job's files under temporary names and lists in ``fds`` what must be
    synced; the writer fsyncs the files of the whole batch (in parallel while fsyncs are slow: the
    journal merges them), then ``publish`` renames them into place. The directory syncer fsyncs
    ``queue/`` once for the batches handed to it; then ``result`` goes to the Deferred on the
    reactor thread, and ``synced`` closes the files.
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
        self.message: QueuedMessage | None = None
        self.body: bytes | None = None  # a small body, kept for the first delivery
        self.path = writer.tmp_path  # the staged file: tmp/<id>.body, or a kept tmp/free.<n>
        self.published: str | None = None

    def stage(self, spool: FilesystemSpool) -> None:
        w = self.writer
        self.message = new_message(w.queue_id, w.envelope)
        tail = trailer(w.size, _encode(self.message))
        if w.file is None:
            # A small body was only buffered: its file is created here, off the reactor thread,
            # and written with its envelope in one go.
            self.body = bytes(w.pending)
            w.pending = bytearray()
            data = self.body + tail
            self.path, fd, old_size = spool._file_for(w.tmp_path)
            self.fds.append(fd)
            write_all(fd, data)
            if old_size > len(data):
                os.ftruncate(fd, len(data))
        else:
            w.file.write(tail)
            w.file.flush()
            self.fds.append(os.dup(w.file.fileno()))
            w.file.close()
            w.file = None
        self.result = w.queue_id

    def publish(self, spool: FilesystemSpool) -> None:
        path = spool._queued(self.writer.queue_id)
        os.rename(self.path, path)
        self.published = path

    def undo(self, spool: FilesystemSpool) -> None:
        self.writer._close_quietly()
        _unlink(self.path)
        if self.published:
            _unlink(self.published)


class _Pack(_Job):
    """The small messages of one writer batch, appended as one pack to the current segment
    (``spool_format``): one write and one fsync for all of them, no file made or renamed (only
    the packs of a segment whose name no sync of ``queue/`` has covered yet wait for one).
    Each commit's Deferred fires with its own id once the pack is durable."""

    def __init__(self, commits: list[_Commit]) -> None:
        super().__init__()
        self.commits = commits
        self.segment: Segment | None = None
        self.entries: list[tuple[str, int, int, int]] = []
        self.counted = False
        self.changes_queue = False

    def stage(self, spool: FilesystemSpool) -> None:
        records = []
        for commit in self.commits:
            w = commit.writer
            commit.message = new_message(w.queue_id, w.envelope)
            commit.body = bytes(w.pending)
            w.pending = bytearray()
            commit.result = w.queue_id
            records.append((w.queue_id, commit.body, _encode(commit.message)))
        data, entries = build_pack(records)
        self.segment, start, self.changes_queue, fd = spool._append(
            chunk(data, entries), self.commits[0].writer.queue_id
        )
        if fd is not None:
            self.fds.append(fd)
        base = start + CHUNK_HEADER.size
        self.entries = [(q, base + o, b, e) for q, o, b, e in entries]

    def publish(self, spool: FilesystemSpool) -> None:
        segment = self.segment
        assert segment is not None
        with segment.lock:
            segment.live += len(self.entries)
        self.counted = True
        for queue_id, offset, body_size, env_size in self.entries:
            spool._members[queue_id] = Member(segment, offset, body_size, env_size)

    def undo(self, spool: FilesystemSpool) -> None:
        for queue_id, *_ in self.entries:
            spool._members.pop(queue_id, None)
        if self.segment is not None:
            spool._void(self.segment, self.entries, self.counted)


class _Save(_Job):
    """A message's new state: ``queue/<id>.env``; a message of a segment moves out of it instead,
    into its own message file holding the new state (its record is killed once that is durable),
    so a segment never waits for a deferred message."""

    def __init__(self, message: QueuedMessage) -> None:
        super().__init__()
        self.message = message
        self.env_tmp: str | None = None
        self.member: Member | None = None

    def stage(self, spool: FilesystemSpool) -> None:
        qid = self.message.queue_id
        self.member = spool._member(qid)
        if self.member is not None:
            body = spool._read_member(self.member, body=True)
            data = body + trailer(len(body), _encode(self.message))
            self.env_tmp = spool._write_tmp(qid, data, self.fds)
            return
        if not os.path.exists(spool._queued(qid)):
            raise KeyError(qid)  # removed meanwhile: never resurrect a state without its message
        self.env_tmp = spool._write_tmp(qid, _encode(self.message), self.fds)

    def publish(self, spool: FilesystemSpool) -> None:
        assert self.env_tmp is not None
        qid = self.message.queue_id
        if self.member is not None:
            if spool._members.get(qid) is not self.member:
                raise KeyError(qid)  # removed meanwhile: never resurrect it
            os.rename(self.env_tmp, spool._queued(qid))
            spool._members.pop(qid, None)  # read from its own file from now on
        else:
            os.rename(self.env_tmp, spool._queued(qid, _ENV))
        self.env_tmp = None

    def undo(self, spool: FilesystemSpool) -> None:
        if self.env_tmp:
            _unlink(self.env_tmp)


class _Remove(_Job):
    def __init__(
        self,
        queue_id: str,
        has_state: bool = True,
        answered: bool = False,
        member: Member | None = None,
    ) -> None:
        super().__init__()
        self.queue_id = queue_id
        self.has_state = has_state  # False: committed in this life and never saved (no .env)
        self.answered = answered  # its Deferred fired at once: only a failure is reported later
        self.member = (
            member  # a record of a segment whose message moved to its own file: kill only it
        )

    def publish(self, spool: FilesystemSpool) -> None:
        member = self.member
        if member is None and (member := spool._member(self.queue_id)) is not None:
            spool._members.pop(self.queue_id, None)
        if member is not None:
            spool._kill(member)
            return
        # The message first: a crash in between leaves a state without message, cleaned at start.
        found = spool._recycle(self.queue_id)
        if self.has_state:
            _unlink(spool._queued(self.queue_id, _ENV))
        if not found:
            raise KeyError(self.queue_id)


class _Scan(_Job):
    """List the committed ids, removing torn writes; in the writer thread so no commit is half seen.

    ``states`` holds the listed ids that have a saved state (``queue/<id>.env``); ``convert``
    turns messages of the two-file layout into message files.
    """

    changes_queue = False

    def __init__(self, clean_tmp: bool = False, convert: bool = False) -> None:
        super().__init__()
        self.clean_tmp = clean_tmp
        self.convert = convert
        self.states: set[str] = set()

    def stage(self, spool: FilesystemSpool) -> None:
        if self.clean_tmp:
            for entry in os.scandir(spool.tmp_dir):
                if entry.name.startswith(_FREE):
                    _unlink(entry.path)  # kept for reuse by an earlier run: nothing to report
                elif entry.name not in spool._receiving:
                    log.info("spool: removing incomplete file tmp/{name}", name=entry.name)
                    _unlink(entry.path)
        # Taken before the listing: the remover forgets an id only after its file is gone.
        removing = set(spool._removing)
        messages, states, legacy, segments = set(), set(), set(), []
        for entry in os.scandir(spool.queue_dir):
            stem, ext = os.path.splitext(entry.name)
            if not is_queue_id(stem):
                continue
            if not ext:
                messages.add(stem)
            elif ext == _ENV:
                states.add(stem)
            elif ext == _LEGACY_BODY:
                legacy.add(stem)
            elif ext == SEGMENT:
                segments.append(entry.name)
        if self.clean_tmp:  # at start: what the segments hold, repaired (see _read_segments)
            with spool._index_lock:
                spool._members = spool._read_segments(segments, messages, repair=True)
                spool._segments_indexed = True
        else:
            spool._ensure_segments()
        for stem in sorted(legacy):
            if stem not in messages and stem in states and self.convert:
                spool._convert_legacy(stem)
                messages.add(stem)
            if stem in messages:
                _unlink(spool._queued(stem, _LEGACY_BODY))  # converted (before a crash, maybe)
            elif stem not in states:
                log.warn(
                    "spool: removing body without envelope queue/{name}", name=stem + _LEGACY_BODY
                )
                _unlink(spool._queued(stem, _LEGACY_BODY))
            else:
                messages.add(stem)  # not converted yet (a listing while the writer runs elsewhere)
        for stem in states - messages:
            log.warn("spool: removing envelope without message queue/{name}", name=stem + _ENV)
            _unlink(spool._queued(stem, _ENV))
        messages.update(spool._members)
        messages -= removing  # answered as removed, not unlinked yet
        self.states = states & messages
        self.result = sorted(messages)


class _Stop(_Job):
    changes_queue = False


class _Seal(_Job):
    """Take no more packs into ``segment`` if it is still the current one (and, unless ``failed``,
    holds no message any more): it goes once empty, so an idle spool leaves no file in
    ``queue/``. Sent to the writer, whose segment it is, by the remover when idle."""

    changes_queue = False

    def __init__(self, segment: Segment, failed: bool = False) -> None:
        super().__init__()
        self.segment = segment
        self.failed = failed

    def stage(self, spool: FilesystemSpool) -> None:
        if spool._segment is self.segment and (self.failed or self.segment.live <= 0):
            spool._seal()


@attrs.define
class _Kept:
    """A file of a removed message in ``tmp/``, to be rewritten once a sync of ``queue/`` has seen
    ``removals`` removals (its own among them); with a descriptor for writing when one is open."""

    path: str
    removals: int
    fd: int | None = None
    size: int = 0

    def open(self) -> None:
        """Open it for writing and learn its size; OSError if it cannot be, or has another link
        (it cannot have one: a safeguard, so no other name's bytes are ever overwritten)."""
        fd = os.open(self.path, os.O_WRONLY)
        st = os.fstat(fd)
        if st.st_nlink != 1:
            os.close(fd)
            raise OSError(f"{self.path} has {st.st_nlink} links")
        self.fd, self.size = fd, st.st_size


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False


def _packs(commits: list[_Commit]) -> list[_Pack]:
    """The small messages of a writer batch in packs of up to ``_PACK_BYTES`` (each pack is built
    in memory, twice over: a thousand sessions' messages of 64 KiB make no 128 MiB pack)."""
    packs: list[_Pack] = []
    group: list[_Commit] = []
    size = 0
    for commit in commits:
        if group and size + commit.writer.size > _PACK_BYTES:
            packs.append(_Pack(group))
            group, size = [], 0
        group.append(commit)
        size += commit.writer.size
    packs.append(_Pack(group))
    return packs


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
        self.tmp_path = spool.tmp_dir + os.sep + queue_id + _RECEIVING
        self.error: OSError | None = None
        self.done = False
        self.size = 0
        self.file: IO[bytes] | None = None
        self.pending = bytearray()  # the body while it is small enough to keep in memory
        spool._receiving.add(queue_id + _RECEIVING)

    def _fail(self, error: OSError) -> None:
        if self.error is None:
            log.error(
                "spool: cannot store message {queue_id}: {error}",
                queue_id=self.queue_id,
                error=error,
            )
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
            self.spool._receiving.discard(self.queue_id + _RECEIVING)
            return defer.fail(storage_failure())
        return self.spool._submit(_Commit(self))

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        self.pending = bytearray()
        if self.file is not None:
            self._close_quietly()
            _unlink(self.tmp_path)  # one quick unlink; no fsync needed to forget a message
        self.spool._receiving.discard(self.queue_id + _RECEIVING)


@implementer(IQueueStore, IStartableStore, IScheduleLoader, IBatchLoader, IOfflineQueue)
class FilesystemSpool:
    """``IQueueStore`` on a local directory; see the module docstring for the layout and guarantees.

    ``threadpool`` runs the reads (``load``); the spool starts its own when none is given. ``fsync``
    and ``randbytes`` are injectable so tests can observe the order of durability and ids.
    ``fsync_threads`` (``[spool] fsync_threads``) fsync a batch's files in parallel when fsyncs
    are slow (a disk that takes milliseconds to flush; a journal then covers them with one
    commit); while an fsync takes less than ``_SLOW_FSYNC`` on average, the writer fsyncs them
    itself, one after another, as with 0 threads: a hand-off per file would cost more, in thread
    switches and waits for the GIL, than the overlap saves. ``timer`` times those fsyncs.
    Bodies up to ``segment_body_max`` bytes go into segments; 0 gives every message a file.
    """

    def __init__(
        self,
        path: str,
        reactor: Any,
        threadpool: ThreadPool | None = None,
        *,
        fsync: Callable[[int], None] = os.fsync,
        randbytes: Callable[[int], bytes] = os.urandom,
        fsync_threads: int = _SYNCERS,
        timer: Callable[[], float] = time.perf_counter,
        segment_body_max: int = _SEGMENT_BODY_MAX,
    ) -> None:
        self.path = os.path.abspath(path)
        self.segment_body_max = segment_body_max
        self.fsync_threads = fsync_threads
        self.timer = timer
        self._fsync_average = 0.0  # seconds per fsync done by the writer itself (moving average)
        self._parallel_batches = 0
        self.reactor = reactor
        self.fsync = fsync
        #: Packs are appended with ``RWF_DSYNC`` (the write is durable when it returns: one system
        #: call, not a write, a ``dup`` and an ``fsync``, each a wait for the GIL after it). Only
        #: with the system's fsync (an injected one is for tests that hold or fail it); off for
        #: good once the kernel refuses the flag.
        self.sync_writes = fsync is os.fsync and hasattr(os, "RWF_DSYNC")
        self.tmp_dir = os.path.join(self.path, "tmp")
        self.queue_dir = os.path.join(self.path, "queue")
        self._queue_prefix = self.queue_dir + os.sep
        self.new_id = QueueIdGenerator(reactor, randbytes)
        self._own_pool = threadpool is None
        self.threadpool = threadpool or ThreadPool(
            minthreads=0, maxthreads=4, name="mailrelay-spool"
        )
        self._jobs: _queue.SimpleQueue[_Job] = _queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Batches renamed into place, waiting for the directory syncer: (results, published, stop).
        self._published: _queue.SimpleQueue[
            tuple[list[tuple[_Job, Any]], list[_Job], _Job | None]
        ] = _queue.SimpleQueue()
        self._dir_syncer: threading.Thread | None = None
        self._removals: _queue.SimpleQueue[_Job] = _queue.SimpleQueue()
        self._remover: threading.Thread | None = None
        self._syncers: ThreadPoolExecutor | None = None
        self._subscribers: list[Callable[[str], object]] = []
        self._receiving: set[str] = set()
        # What each recent commit wrote, so the queue manager's first ``load`` of a new message
        # costs no thread hop, file read or JSON decode, and its first delivery reads no file.
        # Bounded: a paused queue does not hold its messages in memory. Dropped on save/remove,
        # so it never differs from the disk.
        self._fresh: OrderedDict[str, QueuedMessage] = OrderedDict()
        self._fresh_bodies: OrderedDict[str, bytes] = OrderedDict()
        self._fresh_bytes = 0
        self._stateless: set[str] = set()  # committed in this life, never saved: no queue/<id>.env
        self._removing: set[str] = set()  # answered as removed, not unlinked yet (remover discards)
        self._tmp_counter = 0
        # Removals (counted by the remover) and how many of them a sync of queue/ has covered.
        self._removals_done = 0
        self._removals_synced = 0
        # Files of removed messages for new ones (see _Kept). Appended by the remover, taken by
        # the writer (deque operations are atomic).
        self._free: deque[_Kept] = deque()
        self._free_counter = 0
        # Descriptors held in _free: opened by the remover, taken by the writer (a counter each,
        # so neither thread ever writes the other's).
        self._kept_opened = 0
        self._kept_taken = 0
        self._readers: dict[str, int] = {}  # name in queue/ -> descriptors open on that file
        # Where each message of a segment lies (read at start; the writer adds, the remover drops).
        self._members: dict[str, Member] = {}
        self._segments_indexed = False
        self._index_lock = threading.Lock()
        self._dirty_segments: set[Segment] = set()  # records killed, not synced yet (the remover's)
        self._unsynced_since: float | None = None  # the remover's first batch since its last sync
        # The segment packs are appended to (the writer's): its descriptor, where it ends.
        self._segment: Segment | None = None
        self._segment_fd: int | None = None
        self._segment_end = 0
        self._readers_lock = threading.Lock()
        self._dir_fd: int | None = None
        #: How many batches the writer has made durable (an fsync of ``queue/`` or of a segment).
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
        if self.fsync_threads > 0:
            self._syncers = ThreadPoolExecutor(
                max_workers=self.fsync_threads, thread_name_prefix="mailrelay-spool-fsync"
            )
        self._submit(_Scan(clean_tmp=True, convert=True))
        if self._dir_fd is None:
            self._dir_fd = os.open(self.queue_dir, os.O_RDONLY | os.O_DIRECTORY)
        self._thread = threading.Thread(
            target=self._run, name="mailrelay-spool-writer", daemon=True
        )
        self._thread.start()
        self._dir_syncer = threading.Thread(
            target=self._run_dir_syncs, name="mailrelay-spool-dirsync", daemon=True
        )
        self._dir_syncer.start()
        self._remover = threading.Thread(
            target=self._run_removals, name="mailrelay-spool-remover", daemon=True
        )
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
            if self._dir_syncer is not None:
                self._dir_syncer.join()
                self._dir_syncer = None
            if remover is not None:
                remover.join()
            if self._syncers is not None:
                self._syncers.shutdown()
                self._syncers = None
            self._seal()
            self._sync_segments()  # kills done by the writer while stopping (the remover had gone)
            self._close_kept()
            self._close_dir()
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
        if queue_id in self._removing:
            return defer.fail(KeyError(queue_id))
        return threads.deferToThreadPool(self.reactor, self.threadpool, self.read_message, queue_id)

    def load_schedule(self) -> defer.Deferred[list[tuple[str, float, bool]]]:
        """Every committed message's ``(queue_id, next_attempt, held)``, read in one pass in a thread.

        What the queue manager needs at start-up, without building 100,000 ``QueuedMessage``
        values or making 100,000 thread hops. The listing goes through the writer (so torn writes
        are gone first); the reading does not hold it up.
        """
        scan = _Scan()

        def read(ids: list[str]) -> defer.Deferred[list[tuple[str, float, bool]]]:
            # A few threads at once: from a cold page cache this is bound by the disk's latency.
            n = max(1, min(_READERS, len(ids) // 1000))
            step = -(-len(ids) // n) if ids else 1
            parts = [
                threads.deferToThreadPool(
                    self.reactor,
                    self.threadpool,
                    self._read_schedule,
                    ids[i : i + step],
                    scan.states,
                )
                for i in range(0, len(ids), step)
            ]
            d = defer.gatherResults(parts, consumeErrors=True)
            return d.addCallback(lambda chunks: [entry for chunk in chunks for entry in chunk])

        return self._submit(scan).addCallback(read)

    def _read_schedule(
        self, ids: list[str], states: set[str] | frozenset[str] = frozenset()
    ) -> list[tuple[str, float, bool]]:
        out = []
        for queue_id in ids:
            try:
                data = self._read_state(queue_id, queue_id in states, 256)
            except FileNotFoundError:
                continue  # delivered meanwhile
            except ValueError:
                log.error("spool: unreadable message queue/{queue_id}", queue_id=queue_id)
                continue
            # The two top-level keys come last (see message_to_dict) and a raw '"' cannot occur
            # inside a JSON string, so this finds them without parsing the whole envelope.
            m = _SCHEDULE_KEYS.search(data, max(0, len(data) - 200))
            if m is not None:
                out.append((queue_id, float(m.group(1)), m.group(2) == b"true"))
                continue
            try:
                d = json.loads(self._read_state(queue_id, queue_id in states))
            except (ValueError, FileNotFoundError):
                log.error("spool: unreadable envelope of queue/{queue_id}", queue_id=queue_id)
                continue
            out.append((queue_id, float(d.get("next_attempt", 0.0)), bool(d.get("held", False))))
        return out

    def _read_state(
        self, queue_id: str, saved: bool | None = None, tail: int | None = None
    ) -> bytes:
        """The JSON of a message's current state: its ``.env`` if saved, else the one in the message
        file (only its last ``tail`` bytes, if given). FileNotFoundError if there is no message."""
        member = self._member(queue_id)
        if member is not None:
            try:
                return self._read_member(member)
            except FileNotFoundError:
                pass  # the segment went meanwhile: the message moved to its own file, or was removed
        if saved is not False:
            try:
                with open(self._queued(queue_id, _ENV), "rb") as f:
                    return f.read()
            except FileNotFoundError:
                if saved:
                    raise
        fd = self._open_message(queue_id)
        try:
            if tail is not None:
                _, env_size, data = read_trailer(fd, tail + TRAILER.size)
                return data[max(0, len(data) - TRAILER.size - env_size) : len(data) - TRAILER.size]
            return read_envelope(fd, _TAIL)
        finally:
            os.close(fd)
            self._reader_closed(queue_id)

    def _open_message(self, queue_id: str) -> int:
        """Open ``queue/<id>`` for reading, counted until ``_reader_closed``: a file someone reads
        is never kept for a new message (``_recycle`` unlinks it instead)."""
        with self._readers_lock:
            fd = os.open(self._queued(queue_id), os.O_RDONLY)
            self._readers[queue_id] = self._readers.get(queue_id, 0) + 1
        return fd

    def _reader_closed(self, queue_id: str) -> None:
        with self._readers_lock:
            n = self._readers.pop(queue_id, 1) - 1
            if n > 0:
                self._readers[queue_id] = n

    # -- packs ----------------------------------------------------------------------------

    def _member(self, queue_id: str) -> Member | None:
        """Where ``queue_id`` lies in a segment, if it does (the segments are read on first need)."""
        member = self._members.get(queue_id)
        if member is None and not self._segments_indexed:
            self._ensure_segments()
            member = self._members.get(queue_id)
        return member

    def _ensure_segments(self) -> None:
        """Read the segments once, without changing them (the CLI on a stopped instance; a running
        spool reads them at start, in its first scan)."""
        with self._index_lock:
            if self._segments_indexed:
                return
            names = os.listdir(self.queue_dir)
            self._members = self._read_segments(
                [n for n in names if n.endswith(SEGMENT)],
                {n for n in names if is_queue_id(n)},
                repair=False,
            )
            self._segments_indexed = True

    def _read_segments(
        self, names: list[str], messages: set[str], *, repair: bool
    ) -> dict[str, Member]:
        """The live records of the segments ``names``. A record whose message also has its own
        file (``messages``) moved out before a crash: the file is current. ``repair`` kills such
        records, cuts a torn append off the end and removes segments with nothing left."""
        members: dict[str, Member] = {}
        for name in sorted(names):
            path = self._queued(name)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                continue
            entries, end = read_segment(data)
            if end < len(data):
                log.info(
                    "spool: queue/{name} ends in a torn append ({n} bytes, never acknowledged)",
                    name=name,
                    n=len(data) - end,
                )
            segment = Segment(path)
            stale = []
            for entry in entries:
                if not alive(data, entry):
                    continue
                queue_id, offset, body_size, env_size = entry
                member = Member(segment, offset, body_size, env_size)
                if queue_id in messages:
                    stale.append(member)
                    continue
                segment.live += 1
                members[queue_id] = member
            if not repair:
                continue
            if segment.live == 0:
                _unlink(path)
            elif stale or end < len(data):
                fd = os.open(path, os.O_RDWR)
                try:
                    for member in stale:
                        member.kill(fd)
                    os.ftruncate(fd, end)
                    self.fsync(fd)
                finally:
                    os.close(fd)
        return members

    def _read_member(self, member: Member, body: bool = False) -> bytes:
        """A segment record's envelope (or body); FileNotFoundError if the segment is gone."""
        segment = member.segment
        fd = os.open(segment.path, os.O_RDONLY)  # a segment is never rewritten: no reader count
        try:
            return member.read_body(fd) if body else member.read_envelope(fd)
        finally:
            os.close(fd)

    def _kill(self, member: Member) -> None:
        """Kill a record in its segment (made durable by ``_sync_segments``); a full segment with no
        record left goes."""
        segment = member.segment
        if member.dead:
            return
        if segment.fd is None:
            segment.fd = os.open(segment.path, os.O_RDWR)
        member.kill(segment.fd)
        member.dead = True
        if not segment.gone(killed=1):
            self._dirty_segments.add(segment)
            return
        self._dirty_segments.discard(segment)
        fd, segment.fd = segment.fd, None
        os.close(fd)
        _unlink(segment.path)  # full and nothing left: no sync of the kills, the segment goes whole

    def _append(self, data: bytes, name: str) -> tuple[Segment, int, bool, int | None]:
        """Append a pack to the current segment (a new one, named after ``name``, when there is
        none or it is full); the segment, where the pack starts, whether the pack must wait for a
        sync of ``queue/`` (the segment's name is not durable yet), and a descriptor of the
        segment to sync (the caller closes it), or None if the write was durable. Writer thread only."""
        if (
            self._segment is not None
            and self._segment_end
            and self._segment_end + len(data) > _SEGMENT_MAX
        ):
            self._seal()
        if self._segment is None:
            path = self._queued(name + SEGMENT)
            self._segment_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._segment = Segment(path, full=False, named=False)
            self._segment_end = 0
        assert self._segment_fd is not None
        start = self._segment_end
        try:
            synced = self._write_pack(self._segment_fd, data, start)
        except OSError:  # a full disk: nothing more goes after what may be half written
            try:
                os.ftruncate(self._segment_fd, start)
            except OSError:
                pass
            self._seal()
            raise
        self._segment_end += len(data)
        return (
            self._segment,
            start,
            not self._segment.named,
            None if synced else os.dup(self._segment_fd),
        )

    def _write_pack(self, fd: int, data: bytes, start: int) -> bool:
        """Write ``data`` at ``start``; whether it is durable already (``sync_writes``)."""
        view = memoryview(data)
        if self.sync_writes:
            try:
                while view:
                    view = view[
                        os.pwritev(fd, [view], start + len(data) - len(view), os.RWF_DSYNC) :
                    ]
                return True
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP) or len(view) != len(data):
                    raise
                self.sync_writes = False  # an old kernel or a filesystem without it: fsync
                log.info("spool: no RWF_DSYNC here ({error}); packs are fsynced", error=e)
        while view:
            view = view[os.pwrite(fd, view, start + len(data) - len(view)) :]
        return False

    def _seal(self) -> None:
        """Take no more packs into the current segment (full, failed, or the spool stops)."""
        segment, fd = self._segment, self._segment_fd
        self._segment, self._segment_fd, self._segment_end = None, None, 0
        if fd is not None:
            os.close(fd)
        if segment is not None and segment.gone(full=True):
            _unlink(segment.path)

    def _void(
        self, segment: Segment, entries: list[tuple[str, int, int, int]], counted: bool
    ) -> None:
        """A pack that failed (never acknowledged): kill its records, so a write that reaches the
        disk later never brings them back, and append no more to that segment."""
        fd = None
        try:
            fd = os.open(segment.path, os.O_RDWR)
            for _, offset, body_size, env_size in entries:
                Member(segment, offset, body_size, env_size).kill(fd)
            self.fsync(fd)
        except OSError as e:
            log.error(
                "spool: cannot void a failed pack in {path}: {error}", path=segment.path, error=e
            )
        finally:
            if fd is not None:
                os.close(fd)
        if counted and segment.gone(killed=len(entries)):
            _unlink(segment.path)
        if threading.current_thread() is self._thread:
            _Seal(segment, failed=True).stage(self)  # the writer's own: at once
        else:
            self._jobs.put(_Seal(segment, failed=True))

    def _sync_segments(self) -> None:
        """fsync (and close) the segments with records killed since the last call: the remover
        calls it when idle, or ``_REMOVAL_IDLE`` after its first batch since the last sync."""
        dirty, self._dirty_segments = self._dirty_segments, set()
        for segment in dirty:
            fd, segment.fd = segment.fd, None
            if fd is None:
                continue
            try:
                self.fsync(fd)
            except OSError as e:
                log.error(
                    "spool: cannot sync removals from {path}: {error}", path=segment.path, error=e
                )
            finally:
                os.close(fd)

    def _retire(self, queue_id: str, member: Member) -> None:
        """Kill the record of a message that moved out of its segment, now that its own file is durable."""
        if self._thread is None:  # run_now (a stopped instance): no remover
            self._kill(member)
            self._sync_segments()
        else:  # left undone if the spool stops first: the next start kills it (see _read_segments)
            self._removals.put(_Remove(queue_id, has_state=False, answered=True, member=member))

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
        """Blocking read of one message's state (used by ``load`` in a thread, and by the CLI offline)."""
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        try:
            data = self._read_state(queue_id)
        except FileNotFoundError:
            raise KeyError(queue_id) from None
        return message_from_dict(json.loads(data))

    def open_body(self, queue_id: str) -> IO[bytes]:
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        body = self._fresh_bodies.get(queue_id)
        if body is not None:
            return io.BytesIO(body)
        if queue_id in self._removing:
            raise KeyError(queue_id)
        member = self._member(queue_id)
        if member is not None:
            try:
                fd = os.open(member.segment.path, os.O_RDONLY)
            except FileNotFoundError:
                pass  # the segment went meanwhile: moved to its own file, or removed
            else:
                return _BodyFile(fd, member.body_size, base=member.offset)  # type: ignore[return-value]
        try:
            fd = self._open_message(queue_id)
        except FileNotFoundError:
            return self._open_legacy_body(queue_id)
        try:
            body_size, _, _ = read_trailer(fd)
        except BaseException:
            os.close(fd)
            self._reader_closed(queue_id)
            raise
        return _BodyFile(fd, body_size, lambda: self._reader_closed(queue_id))  # type: ignore[return-value]

    def _open_legacy_body(self, queue_id: str) -> IO[bytes]:
        """A message of the two-file layout not converted yet (the CLI on a stopped instance)."""
        try:
            return open(self._queued(queue_id, _LEGACY_BODY), "rb")
        except FileNotFoundError:
            raise KeyError(queue_id) from None

    def body_size(self, queue_id: str) -> int:
        with self.open_body(queue_id) as f:
            return f.seek(0, 2)

    def save(self, message: QueuedMessage) -> defer.Deferred[None]:
        if message.queue_id in self._removing:
            return defer.fail(KeyError(message.queue_id))
        self._forget(message.queue_id)
        return self._submit(_Save(message))

    def remove(self, queue_id: str) -> defer.Deferred[None]:
        """Remove a message; a message committed in this life and never saved (a delivery done at
        its first attempt) is answered at once: its file surely exists, the remover unlinks it in
        a moment and, meanwhile, ``load``, ``save`` and ``open_body`` treat it as gone. No thread
        hop back per delivered message; other removals answer once done (KeyError if unknown)."""
        if not is_queue_id(queue_id) or queue_id in self._removing:
            return defer.fail(KeyError(queue_id))
        fresh = queue_id in self._stateless
        self._forget(queue_id)
        if self._remover is None:
            return self._submit(_Remove(queue_id, has_state=not fresh))
        job = _Remove(queue_id, has_state=not fresh, answered=fresh)
        if fresh:
            self._removing.add(queue_id)
            self._removals.put(job)
            return defer.succeed(None)
        self._removals.put(job)
        return job.deferred

    def subscribe(self, callback: Callable[[str], object]) -> None:
        self._subscribers.append(callback)

    def _forget(self, queue_id: str) -> None:
        """Drop what memory holds of ``queue_id`` (its state is about to change on disk)."""
        self._fresh.pop(queue_id, None)
        self._stateless.discard(queue_id)
        body = self._fresh_bodies.pop(queue_id, None)
        if body is not None:
            self._fresh_bytes -= len(body)

    # -- blocking access for offline tools (the CLI on a stopped instance) -------------------

    def scan_ids(self) -> list[str]:
        """The committed ids, read without changing anything (safe while an instance runs)."""
        messages, legacy, segments = set(), {}, []
        for entry in os.scandir(self.queue_dir):
            stem, ext = os.path.splitext(entry.name)
            if not ext and is_queue_id(stem):
                messages.add(stem)
            elif ext in (_LEGACY_BODY, _ENV):
                legacy[stem] = legacy.get(stem, 0) + 1
            elif ext == SEGMENT:
                segments.append(entry.name)
        messages.update(stem for stem, n in legacy.items() if n == 2)  # the two-file layout
        messages.update(self._read_segments(segments, messages, repair=False))
        return sorted(messages)

    def run_now(self, job: _Job) -> Any:
        """Do one job in the calling thread; only when no writer thread runs (a stopped instance)."""
        if self._thread is not None:
            raise RuntimeError("the spool's writer thread is running; submit jobs instead")
        results, published = self._publish_batch([job])
        results += self._sync_published(published)
        self._removals_done += isinstance(job, _Remove)
        self._sync_segments()
        self._sync_removals()
        self._close_dir()
        ((_, result),) = results
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def save_now(self, message: QueuedMessage) -> None:
        self._forget(message.queue_id)
        self._convert_if_legacy(message.queue_id)
        self.run_now(_Save(message))

    def remove_now(self, queue_id: str) -> None:
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        self._forget(queue_id)
        self._convert_if_legacy(queue_id)
        self.run_now(_Remove(queue_id))

    def _convert_if_legacy(self, queue_id: str) -> None:
        if not os.path.exists(self._queued(queue_id)) and os.path.exists(
            self._queued(queue_id, _LEGACY_BODY)
        ):
            self.run_now(_Scan(convert=True))  # a spool of the two-file layout: converted first

    # -- the writer thread ----------------------------------------------------------------

    def _submit(self, job: _Job) -> defer.Deferred[Any]:
        self._jobs.put(job)
        return job.deferred

    def _queued(self, queue_id: str, ext: str = "") -> str:
        return self._queue_prefix + queue_id + ext  # ids are checked names: no os.path.join needed

    def _write_tmp(self, queue_id: str, data: bytes, fds: list[int]) -> str:
        """Write ``data`` to a fresh file in ``tmp/``; its descriptor joins ``fds`` (to be synced)."""
        self._tmp_counter += 1
        path = os.path.join(self.tmp_dir, f"{queue_id}{_ENV}.{self._tmp_counter}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            write_all(fd, data)
        except BaseException:
            os.close(fd)
            _unlink(path)
            raise
        fds.append(fd)
        return path

    def _recycle(self, queue_id: str) -> bool:
        """Take ``queue/<id>`` out of the queue, keeping its file for a new message while the pool
        has room (else unlink it); whether it was there."""
        path = self._queued(queue_id)
        with self._readers_lock:  # no reader opens it meanwhile
            if len(self._free) >= _FREE_FILES or queue_id in self._readers:
                return _unlink(path)  # an open reader keeps reading the old bytes
            self._free_counter += 1
            free = f"{self.tmp_dir}{os.sep}{_FREE}{self._free_counter}"
            try:
                os.rename(path, free)
            except FileNotFoundError:
                return False
        # Its removal is counted after this batch: a sync of queue/ that saw that count covers it.
        kept = _Kept(free, self._removals_done + 1)
        if self._kept_opened - self._kept_taken < _KEPT_OPEN:
            # Opened here, so the writer, on whom the 250s wait, does not (each system call of a
            # thread costs it a wait for the GIL while the reactor thread is busy).
            try:
                kept.open()
            except OSError:
                _unlink(free)
                return True
            self._kept_opened += 1
        self._free.append(kept)
        return True

    def _file_for(self, path: str) -> tuple[str, int, int]:
        """A file to write a new message into: a kept one when one is ready (written where it
        lies, and renamed into ``queue/`` from there: no rename on the way), else ``path`` made
        new; its path, a descriptor for writing, and the size it had.

        A kept file is written only once its removal from ``queue/`` is durable: a crash can then
        never show the old message's name with a new message's bytes (a crash before the new
        message's commit leaves it in ``tmp/``, removed at start). A file with another link (it
        cannot have one; a safeguard) is never overwritten."""
        while self._free and self._free[0].removals <= self._removals_synced:
            kept = self._free.popleft()
            if kept.fd is not None:
                self._kept_taken += 1
            else:
                try:
                    kept.open()
                except OSError:
                    _unlink(kept.path)
                    continue
            assert kept.fd is not None
            return kept.path, kept.fd, kept.size
        return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), 0

    def _close_kept(self) -> None:
        """Close the descriptors of kept files (at stop; the files stay, removed at the next start)."""
        while self._free:
            kept = self._free.popleft()
            if kept.fd is not None:
                os.close(kept.fd)
        self._kept_opened = self._kept_taken = 0

    def _convert_legacy(self, queue_id: str) -> None:
        """A message of the two-file layout becomes one message file (its ``.env`` stays as its
        saved state); durable before the old body goes, so a crash midway loses nothing."""
        with open(self._queued(queue_id, _ENV), "rb") as f:
            envelope = f.read()
        tmp = os.path.join(self.tmp_dir, queue_id + _RECEIVING)
        with open(self._queued(queue_id, _LEGACY_BODY), "rb") as src, open(tmp, "wb") as dst:
            size = 0
            while chunk := src.read(_BUFFER):
                dst.write(chunk)
                size += len(chunk)
            dst.write(trailer(size, envelope))
            dst.flush()
            self.fsync(dst.fileno())
        os.rename(tmp, self._queued(queue_id))
        self._sync_queue_dir()
        log.info("spool: converted queue/{queue_id} to the one-file layout", queue_id=queue_id)

    def _sync_files(self, jobs: list[_Job], close: bool = True) -> dict[_Job, BaseException]:
        """fsync every file of ``jobs``, in parallel when there are several and fsyncs are slow;
        the errors by job. ``close=False`` leaves the descriptors to the caller."""
        pairs = [(job, fd) for job in jobs for fd in job.fds]

        def sync(fd: int) -> BaseException | None:
            try:
                self.fsync(fd)
                return None
            except OSError as e:
                return e

        if self._in_parallel(len(pairs)):
            outcomes = list(self._syncers.map(sync, [fd for _, fd in pairs]))  # type: ignore[union-attr]
        else:
            outcomes = []
            for _, fd in pairs:
                started = self.timer()
                outcomes.append(sync(fd))
                self._fsync_average += (self.timer() - started - self._fsync_average) / 4
        errors: dict[_Job, BaseException] = {}
        for (job, _), error in zip(pairs, outcomes, strict=True):
            if error is not None:
                errors.setdefault(job, error)
        if close:
            for job in jobs:
                job.synced()
        return errors

    def _in_parallel(self, files: int) -> bool:
        """Whether the syncer threads fsync these files: only several, and only while fsyncs are
        slow; now and then the writer does a batch itself, to see whether they still are."""
        if files < 2 or self._syncers is None or self._fsync_average < _SLOW_FSYNC:
            return False
        self._parallel_batches += 1
        return self._parallel_batches % _PROBE_EVERY != 0

    def _sync_queue_dir(self) -> None:
        """fsync ``queue/`` through a descriptor kept open (one open per spool, not per batch)."""
        if self._dir_fd is None:
            self._dir_fd = os.open(self.queue_dir, os.O_RDONLY | os.O_DIRECTORY)
        self.fsync(self._dir_fd)

    def _close_dir(self) -> None:
        fd, self._dir_fd = self._dir_fd, None
        if fd is not None:
            os.close(fd)

    def _sync_removals(self) -> None:
        """fsync ``queue/`` for removals no sync of it has covered yet (when the remover is idle)."""
        done = self._removals_done
        if self._removals_synced >= done:
            return
        try:
            self._sync_queue_dir()
            self._removals_synced = max(self._removals_synced, done)
        except OSError as e:
            log.error("spool: cannot sync the queue directory after removals: {error}", error=e)

    def _run(self) -> None:
        """The writer thread: writes, syncs and renames each batch, then answers it, or hands it to
        the directory syncer when a rename waits for a sync of ``queue/`` (the writer goes on with
        the next batch meanwhile)."""
        stopping: _Job | None = None
        while stopping is None:
            batch = [self._jobs.get()]
            while True:
                try:
                    batch.append(self._jobs.get_nowait())
                except _queue.Empty:
                    break
            stopping = next((j for j in batch if isinstance(j, _Stop)), None)
            jobs = [j for j in batch if not isinstance(j, _Stop)]
            small = (
                [
                    j
                    for j in jobs
                    if isinstance(j, _Commit)
                    and j.writer.file is None
                    and j.writer.size <= self.segment_body_max
                ]
                if self.segment_body_max
                else []
            )
            if small:  # appended together to the current segment
                packed = set(small)
                jobs = [j for j in jobs if j not in packed] + _packs(small)
            # The directory syncer closes the files: a system call less here per message.
            results, published = self._publish_batch(jobs, close=False)
            if published or stopping is not None:
                self._published.put((results, published, stopping))
                continue
            # Durable already (packs into a segment whose name is synced): answered from here,
            # without a turn through the directory syncer (a thread hop, 0.3 ms at the median
            # under load). Nothing orders these after an earlier batch still waiting for its
            # sync: each result belongs to another job, and the stop still goes last.
            self._answer(results, [job for job, _ in results])

    def _run_dir_syncs(self) -> None:
        """The directory syncer: one fsync of ``queue/`` for every batch renamed meanwhile."""
        stopping: _Job | None = None
        while stopping is None:
            handed = [self._published.get()]
            while True:
                try:
                    handed.append(self._published.get_nowait())
                except _queue.Empty:
                    break
            results = [r for h in handed for r in h[0]]
            results += self._sync_published([j for h in handed for j in h[1]])
            stopping = next((h[2] for h in handed if h[2] is not None), None)
            # the writer left the files of every job handed over open
            self._answer(results, [j for h in handed for j in [j for j, _ in h[0]] + h[1]])
        self.reactor.callFromThread(stopping.deferred.callback, None)

    def _answer(self, results: list[tuple[_Job, Any]], jobs: list[_Job]) -> None:
        """Hand ``results`` to the reactor thread, then close the files the writer left open for ``jobs``."""
        if results:
            self.reactor.callFromThread(self._deliver_results, results)
        for job in jobs:
            job.synced()

    def _run_removals(self) -> None:
        """The remover thread: unlinks delivered messages, so no commit ever waits behind them."""
        stopping: _Job | None = None
        while stopping is None:
            try:
                first = self._removals.get(timeout=_REMOVAL_IDLE)
            except _queue.Empty:
                self._sync_segments()  # idle a moment: make the kills and unlinks durable
                self._sync_removals()
                self._unsynced_since = None
                segment = self._segment
                if segment is not None and segment.live <= 0 and self._thread is not None:
                    self._jobs.put(_Seal(segment))  # nothing queued in it: let it go
                first = self._removals.get()
            batch = [first]
            while True:
                try:
                    batch.append(self._removals.get_nowait())
                except _queue.Empty:
                    break
            stopping = next((j for j in batch if isinstance(j, _Stop)), None)
            results, _ = self._publish_batch([j for j in batch if not isinstance(j, _Stop)])
            self._removals_done += len(results)
            # Under steady load too, at most _REMOVAL_IDLE later (most segments' records are all
            # gone by then, and a segment that goes needs no sync of its kills).
            now = self.timer()
            if self._unsynced_since is None:
                self._unsynced_since = now
            elif now - self._unsynced_since >= _REMOVAL_IDLE:
                self._sync_segments()
                self._sync_removals()
                self._unsynced_since = None
            for job, _result in results:
                if isinstance(job, _Remove) and job.answered:
                    self._removing.discard(job.queue_id)  # a set: atomic under the GIL
            # Answered removals need no call back to the reactor unless they failed.
            results = [
                (j, r)
                for j, r in results
                if not (isinstance(j, _Remove) and j.answered and not isinstance(r, Failure))
            ]
            if results:
                self.reactor.callFromThread(self._deliver_results, results)
        self._sync_segments()
        self._sync_removals()
        self.reactor.callFromThread(stopping.deferred.callback, None)

    def _publish_batch(
        self, batch: list[_Job], close: bool = True
    ) -> tuple[list[tuple[_Job, Any]], list[_Job]]:
        """Stage, sync and publish ``batch``: the results known now, and the jobs whose renames
        wait for a sync of ``queue/``. ``close=False`` leaves the synced files open (the caller
        closes them with ``synced``)."""
        results: list[tuple[_Job, Any]] = []
        staged: list[_Job] = []
        for job in batch:
            try:
                job.stage(self)
                staged.append(job)
            except BaseException as e:
                job.synced()
                results.append((job, self._failure(job, e)))
        errors = self._sync_files(staged, close) if staged else {}
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
            else:
                results.append((job, job.result))
                if isinstance(job, _Pack):
                    self.commit_passes += 1  # durable now: no sync of queue/ needed
        return results, published

    def _sync_published(self, published: list[_Job]) -> list[tuple[_Job, Any]]:
        """One fsync of ``queue/`` makes every rename of ``published`` durable; their results."""
        if not published:
            return []
        removed = self._removals_done
        try:
            self._sync_queue_dir()
        except OSError as e:
            return [(job, self._failure(job, e)) for job in published]
        self.commit_passes += 1
        self._removals_synced = max(self._removals_synced, removed)  # covered those unlinks too
        for job in published:
            if isinstance(job, _Save) and job.member is not None:
                self._retire(job.message.queue_id, job.member)
            elif isinstance(job, _Pack) and job.segment is not None:
                job.segment.named = True  # later packs need no sync of queue/
        return [(job, job.result) for job in published]

    def _failure(self, job: _Job, error: BaseException) -> Failure:
        try:
            job.undo(self)
        except OSError:
            pass
        if isinstance(error, OSError) and isinstance(job, _Commit | _Save | _Pack):
            log.error("spool: cannot store: {error}", error=error)
            return Failure(storage_failure())
        return Failure(error)

    def _deliver_results(self, results: list[tuple[_Job, Any]]) -> None:
        for job, result in results:
            if isinstance(job, _Pack):  # each message of the pack as if committed alone
                self._deliver_results(
                    [(c, result if isinstance(result, Failure) else c.result) for c in job.commits]
                )
                continue
            if isinstance(job, _Commit):
                self._receiving.discard(job.writer.queue_id + _RECEIVING)
            if isinstance(result, Failure):
                if isinstance(job, _Remove) and job.answered:
                    log.failure(
                        "spool: cannot remove queue/{queue_id}", result, queue_id=job.queue_id
                    )
                    continue
                job.deferred.errback(result)
                continue
            if isinstance(job, _Commit):
                self._remember(job, result)
                for callback in self._subscribers:
                    try:
                        callback(result)
                    except Exception:
                        log.failure("spool: subscriber failed for {queue_id}", queue_id=result)
            job.deferred.callback(result)

    def _remember(self, job: _Commit, queue_id: str) -> None:
        """Keep a new message's state (and small body) for its first load and delivery."""
        self._stateless.add(queue_id)
        if job.message is not None:
            self._fresh[queue_id] = job.message
            if len(self._fresh) > _FRESH:
                self._fresh.popitem(last=False)
        body = job.body
        if body is not None and len(body) <= _FRESH_BODY_BYTES // 64:
            self._fresh_bodies[queue_id] = body
            self._fresh_bytes += len(body)
            while self._fresh_bytes > _FRESH_BODY_BYTES or len(self._fresh_bodies) > _FRESH:
                _, old = self._fresh_bodies.popitem(last=False)
                self._fresh_bytes -= len(old)
