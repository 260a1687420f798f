"""The changes the commit pipeline makes to the spool, one class each, with the steps it runs.

A writer job goes through the steps of ``pipeline``: ``stage`` writes its files under temporary
names and lists in ``fds`` what must be fsynced (writer thread); the writer fsyncs the batch's
files, then ``publish`` renames them into place (writer thread); a job that added a name to
``queue/`` (``renames``: a rename, or a pack's new segment) is answered only after a sync of
``queue/``, once ``durable`` has run (directory-sync thread). ``undo`` removes what a failed job
left (whichever pipeline thread saw it fail). ``answer`` hands the result to the job's Deferred,
on the reactor thread. A job is touched by one thread at a time: it crosses between them only
through the pipeline's queues.

``Remove`` is plain data: the remover thread does it (``pipeline.Remover.remove``).
"""

from __future__ import annotations

import os
from typing import IO, TYPE_CHECKING, Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay._files import write_all
from mailrelay.envelope import Envelope, QueuedMessage
from mailrelay.queue.spool import recovery
from mailrelay.queue.spool.format import (
    CHUNK_HEADER,
    STATE,
    build_pack,
    chunk,
    encode_state,
    trailer,
)
from mailrelay.queue.spool.segments import Entry, Record, Segment, erase_failed_pack, unlink
from mailrelay.queue.store import new_message, storage_failure

if TYPE_CHECKING:
    from mailrelay.queue.spool.pipeline import IdSet, Pipeline

log = Logger()

#: Bodies in one pack, at most (unless one body is larger); read when a batch is packed.
PACK_BYTES = 1024 * 1024


class WriterJob:
    """A change done by the writer thread; see the module docstring for its steps."""

    renames = False  # it added a name to queue/: answered only after a sync of queue/
    stops = False  # the last job: the thread that takes it ends
    stores = False  # a failure to write it is reported as 452 4.3.1 (storage_failure)

    def __init__(self) -> None:
        self.deferred: defer.Deferred[Any] = defer.Deferred()
        self.result: Any = None
        self.fds: list[int] = []

    def small_commit(self, limit: int) -> Commit | None:
        """Itself if it is a commit of a body of up to ``limit`` bytes (0: none is) held in
        memory: such commits go into packs."""
        return None

    def stage(self, p: Pipeline) -> None:
        pass

    def publish(self, p: Pipeline) -> None:
        pass

    def durable(self, p: Pipeline) -> None:
        """What follows once the sync of ``queue/`` that covered ``publish`` has ended."""

    def undo(self, p: Pipeline) -> None:
        """Remove whatever this job left behind after it failed."""

    def close_files(self) -> None:
        """The files in ``fds`` are durable (or failed): close them."""
        fds, self.fds = self.fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def failed(self, p: Pipeline, error: BaseException) -> Failure:
        """Undo this job; the failure to answer it with."""
        try:
            self.undo(p)
        except OSError:
            pass
        if isinstance(error, OSError) and self.stores:
            log.error("spool: cannot store: {error}", error=error)
            return Failure(storage_failure())
        return Failure(error)

    def answer(self, result: Any) -> None:
        """Fire the Deferred with ``result`` (reactor thread)."""
        if isinstance(result, Failure):
            self.deferred.errback(result)
        else:
            self.deferred.callback(result)


class Stop(WriterJob):
    """Sent last to the writer and to the remover; fires once the thread has done the rest."""

    stops = True


class Commit(WriterJob):
    """A new message (``receiving.Receiver`` hands over what it received): a file of its own, or
    a record in a pack when small (see ``Pack``)."""

    renames = True
    stores = True

    def __init__(
        self,
        queue_id: str,
        envelope: Envelope,
        size: int,
        pending: bytearray,
        file: IO[bytes] | None,
        tmp_path: str,
        prefix: bytes = b"",
    ) -> None:
        super().__init__()
        self.queue_id, self.envelope, self.size = queue_id, envelope, size
        self.prefix = prefix  # delivered in front of the body; kept in the state
        self.pending = pending  # the body, when small enough to stay in memory
        self.file = file  # else the file it streamed to, tmp_path
        self.tmp_path = tmp_path
        self.message: QueuedMessage | None = None
        self.body: bytes | None = None  # a small body, kept for the first delivery
        self.path = tmp_path  # the staged file: tmp/<id>.body, or a spare
        self.published: str | None = None

    def small_commit(self, limit: int) -> Commit | None:
        return self if limit and self.file is None and self.size <= limit else None

    def take_record(self) -> tuple[str, bytes, bytes]:
        """The ``(queue id, body, state)`` of its record (its body leaves ``pending``)."""
        self.message = new_message(self.queue_id, self.envelope, self.prefix)
        self.body, self.pending = bytes(self.pending), bytearray()
        self.result = self.queue_id
        return self.queue_id, self.body, encode_state(self.message)

    def stage(self, p: Pipeline) -> None:
        _, body, state = self.take_record()
        tail = trailer(self.size, state)
        if self.file is None:
            # A small body was only buffered: its file is made here, off the reactor thread,
            # and written with its envelope in one go.
            data = body + tail
            self.path, fd, old_size = p.writer.new_file(self.tmp_path)
            self.fds.append(fd)
            write_all(fd, data)
            if old_size > len(data):
                os.ftruncate(fd, len(data))
        else:
            self.body = None  # streamed to its file: not kept in memory
            self.file.write(tail)
            self.file.flush()
            self.fds.append(os.dup(self.file.fileno()))
            self.file.close()
            self.file = None

    def publish(self, p: Pipeline) -> None:
        path = p.reader.path(self.queue_id)
        os.rename(self.path, path)
        self.published = path

    def undo(self, p: Pipeline) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
            self.file = None
        unlink(self.path)
        if self.published:
            unlink(self.published)


class Pack(WriterJob):
    """The small messages of one writer batch, appended as one pack to the current segment: one
    write and one fsync for all of them, no file made or renamed (only the packs of a segment
    whose name no sync of ``queue/`` has covered yet wait for one). Each commit's Deferred fires
    with its own id once the pack is durable."""

    stores = True

    def __init__(self, commits: list[Commit]) -> None:
        super().__init__()
        self.commits = commits
        self.segment: Segment | None = None
        self.entries: list[Entry] = []
        self.counted = False

    def stage(self, p: Pipeline) -> None:
        data, entries = build_pack([commit.take_record() for commit in self.commits])
        self.segment, start, self.renames, fd = p.writer.append(
            chunk(data, entries), self.commits[0].queue_id
        )
        if fd is not None:
            self.fds.append(fd)
        base = start + CHUNK_HEADER.size
        self.entries = [(q, base + o, b, e) for q, o, b, e in entries]

    def publish(self, p: Pipeline) -> None:
        segment = self.segment
        assert segment is not None
        segment.add_records(len(self.entries))
        self.counted = True
        p.index.add({q: Record(segment, o, b, e) for q, o, b, e in self.entries})

    def durable(self, p: Pipeline) -> None:
        if self.segment is not None:
            self.segment.mark_name_durable()  # later packs need no sync of queue/

    def undo(self, p: Pipeline) -> None:
        for queue_id, *_ in self.entries:
            p.index.pop(queue_id)
        if self.segment is not None:
            erase_failed_pack(self.segment, self.entries, self.counted, p.fsync)
            p.close_segment(self.segment)  # append no more to it

    def answer(self, result: Any) -> None:
        for commit in self.commits:  # each message of the pack as if committed alone
            commit.answer(result if isinstance(result, Failure) else commit.queue_id)


class Save(WriterJob):
    """A message's new state: ``queue/<id>.env``; a message of a segment moves out of it instead,
    into its own message file holding the new state (its old record is erased once that is
    durable), so a segment never waits for a deferred message."""

    renames = True
    stores = True

    def __init__(self, message: QueuedMessage) -> None:
        super().__init__()
        self.message = message
        self.staged: str | None = None
        self.record: Record | None = None

    def stage(self, p: Pipeline) -> None:
        qid = self.message.queue_id
        self.record = p.index.get(qid)
        if self.record is not None:
            body = self.record.read_body()
            data = body + trailer(len(body), encode_state(self.message))
        elif not os.path.exists(p.reader.path(qid)):
            raise KeyError(qid)  # removed meanwhile: never resurrect a state without its message
        else:
            data = encode_state(self.message)
        self.staged, fd = p.writer.write_tmp(qid, data)
        self.fds.append(fd)

    def publish(self, p: Pipeline) -> None:
        assert self.staged is not None
        qid = self.message.queue_id
        if self.record is not None:
            if p.index.get(qid) is not self.record:
                raise KeyError(qid)  # removed meanwhile: never resurrect it
            os.rename(self.staged, p.reader.path(qid))
            p.index.pop(qid, self.record)  # read from its own file from now on
        else:
            os.rename(self.staged, p.reader.path(qid, STATE))
        self.staged = None

    def durable(self, p: Pipeline) -> None:
        if self.record is not None:
            p.erase_moved(self.message.queue_id, self.record)

    def undo(self, p: Pipeline) -> None:
        if self.staged:
            unlink(self.staged)


class Scan(WriterJob):
    """List the committed ids (``recovery.scan``); in the writer thread so no commit is half seen.
    ``saved`` holds the listed ids that have a saved state (``queue/<id>.env``)."""

    def __init__(self, removing: IdSet, receiving: IdSet | None = None) -> None:
        super().__init__()
        self.removing = removing
        self.receiving = receiving  # at start: clean tmp/, but for the messages being received
        self.saved: set[str] = set()

    def stage(self, p: Pipeline) -> None:
        self.result, self.saved = recovery.scan(p, self.removing, self.receiving)


class CloseSegment(WriterJob):
    """Have the writer take no more packs into ``segment`` if it is still the current one (and,
    unless ``failed``, holds no record any more): so an idle spool leaves no file in ``queue/``."""

    def __init__(self, segment: Segment, failed: bool = False) -> None:
        super().__init__()
        self.segment = segment
        self.after_failure = failed

    def stage(self, p: Pipeline) -> None:
        p.writer.close_segment(self.segment, if_empty=not self.after_failure)


@attrs.define(eq=False)
class Remove:
    """Take a message out of the queue (done by the remover thread).

    ``saved``: it may have a saved state (False: committed in this life and never saved);
    ``answered``: its Deferred fired at once, only a failure is reported later; ``record``: the
    old record of a message that moved out of its segment: erase only that.
    """

    queue_id: str
    saved: bool = True
    answered: bool = False
    record: Record | None = None
    deferred: defer.Deferred[None] = attrs.field(factory=defer.Deferred)

    def answer(self, result: Any) -> None:
        """Fire the Deferred, or log a failure of an answered removal (reactor thread)."""
        if not isinstance(result, Failure):
            if not self.answered:
                self.deferred.callback(None)
        elif self.answered:
            log.failure("spool: cannot remove queue/{queue_id}", result, queue_id=self.queue_id)
        else:
            self.deferred.errback(result)


def packs(commits: list[Commit]) -> list[Pack]:
    """The small messages of a writer batch in packs of up to ``PACK_BYTES`` (each pack is built
    in memory, twice over: a thousand sessions' messages of 64 KiB make no 128 MiB pack)."""
    out: list[Pack] = []
    group: list[Commit] = []
    size = 0
    for commit in commits:
        if group and size + commit.size > PACK_BYTES:
            out.append(Pack(group))
            group, size = [], 0
        group.append(commit)
        size += commit.size
    out.append(Pack(group))
    return out
