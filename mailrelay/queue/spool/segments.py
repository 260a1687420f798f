"""Segments at run time: where each small message lies, appending packs, erasing records.

Three owners (see the thread model in ``pipeline``): the writer thread appends through the one
``Appender``; the remover thread erases through the one ``Eraser``; anyone reads the
``SegmentIndex`` (its own lock). A ``Segment``'s counts are changed by both the writer (records
added, no more appends) and the remover (records erased), so they live behind the segment's lock.

A segment *takes packs* (is open) while the writer appends to it; it is *closed* once full, once
an append failed, or at stop. It goes (its file is unlinked) once closed with no record left.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable

import attrs
from twisted.logger import Logger

from mailrelay.queue.spool.format import SEGMENT, alive, erase_record, read_segment
from mailrelay.queue.store import is_queue_id

log = Logger()

#: A segment takes no more packs once this long (bytes); read at each append.
SEGMENT_MAX = 4 * 1024 * 1024

Entry = tuple[str, int, int, int]  # (queue id, offset, body size, envelope size), from format


@attrs.define(eq=False)
class Segment:
    """A segment file: how many records it holds, whether it still takes packs, and whether its
    directory entry is durable (a sync of ``queue/`` covered its creation). All behind ``lock``."""

    path: str
    _records: int = 0
    _open: bool = False
    _name_durable: bool = True
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    @classmethod
    def new(cls, path: str) -> Segment:
        """A segment the writer just created: open, its name not durable yet."""
        return cls(path, open=True, name_durable=False)

    def add_records(self, n: int) -> None:
        with self._lock:
            self._records += n

    def drop_records(self, n: int = 0, close: bool = False) -> bool:
        """Count ``n`` records gone (and close the segment, if ``close``); whether it can go now
        (closed and empty). True at most once per caller that closes or empties it."""
        with self._lock:
            was_gone = not self._open and self._records <= 0
            self._records -= n
            self._open = self._open and not close
            return not was_gone and not self._open and self._records <= 0

    def is_empty(self) -> bool:
        with self._lock:
            return self._records <= 0

    def mark_name_durable(self) -> None:
        with self._lock:
            self._name_durable = True

    def name_is_durable(self) -> bool:
        with self._lock:
            return self._name_durable


@attrs.define(eq=False, slots=True)
class Record:
    """Where a message's record lies in a segment. ``erased`` is the ``Eraser``'s (so a record
    is never counted gone twice)."""

    segment: Segment
    offset: int
    body_size: int
    env_size: int
    erased: bool = False

    @property
    def trailer_offset(self) -> int:
        return self.offset + self.body_size + self.env_size

    def read_body(self) -> bytes:
        return self._read(self.offset, self.body_size)

    def read_envelope(self) -> bytes:
        return self._read(self.offset + self.body_size, self.env_size)

    def _read(self, offset: int, size: int) -> bytes:
        """FileNotFoundError if the segment went (a segment is never rewritten: no reader count)."""
        fd = os.open(self.segment.path, os.O_RDONLY)
        try:
            data = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        if len(data) != size:
            raise ValueError(f"{self.segment.path} too short")
        return data


class SegmentIndex:
    """Where each message of a segment lies: filled at start (or on first need, offline), added to
    by the writer, dropped from by the remover and the writer, read by any thread."""

    def __init__(self, load: Callable[[], dict[str, Record]]) -> None:
        self._load = load  # reads the segments without changing them
        self._records: dict[str, Record] | None = None
        self._lock = threading.Lock()

    def _loaded(self) -> dict[str, Record]:
        if self._records is None:  # called with the lock held
            self._records = self._load()
        return self._records

    def replace(self, records: dict[str, Record]) -> None:
        with self._lock:
            self._records = records

    def get(self, queue_id: str) -> Record | None:
        with self._lock:
            return self._loaded().get(queue_id)

    def ids(self) -> set[str]:
        with self._lock:
            return set(self._loaded())

    def add(self, records: dict[str, Record]) -> None:
        with self._lock:
            self._loaded().update(records)

    def pop(self, queue_id: str, record: Record | None = None) -> Record | None:
        """Drop ``queue_id`` (only if it still lies at ``record``, when given); what was dropped."""
        with self._lock:
            records = self._loaded()
            found = records.get(queue_id)
            if found is None or (record is not None and found is not record):
                return None
            return records.pop(queue_id)


def read_segments(
    queue_dir: str,
    names: list[str],
    messages: set[str],
    *,
    repair: bool,
    fsync: Callable[[int], None],
) -> dict[str, Record]:
    """The records left in the segments ``names`` of ``queue_dir``. A record whose message also
    has its own file (``messages``) moved out before a crash: the file is current. ``repair``
    erases such records, cuts a torn append off the end and removes segments with nothing left."""
    records: dict[str, Record] = {}
    for name in sorted(names):
        path = os.path.join(queue_dir, name)
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
            record = Record(segment, offset, body_size, env_size)
            if queue_id in messages:
                stale.append(record)
                continue
            segment.add_records(1)
            records[queue_id] = record
        if not repair:
            continue
        if segment.is_empty():
            unlink(path)
        elif stale or end < len(data):
            fd = os.open(path, os.O_RDWR)
            try:
                for record in stale:
                    erase_record(fd, record.trailer_offset, path)
                os.ftruncate(fd, end)
                fsync(fd)
            finally:
                os.close(fd)
    return records


def segment_names(names: list[str]) -> tuple[list[str], set[str]]:
    """Of a listing of ``queue/``: the segments, and the messages with a file of their own."""
    return [n for n in names if n.endswith(SEGMENT)], {n for n in names if is_queue_id(n)}


def unlink(path: str) -> bool:
    """Remove ``path``; whether it was there."""
    try:
        os.unlink(path)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False


class Appender:
    """The segment packs are appended to, and appending (the writer thread's alone).

    ``dsync``: append with ``RWF_DSYNC`` where the kernel has it, so the write is durable when it
    returns (one system call, not a write, a ``dup`` and an ``fsync``, each a wait for the GIL
    after it); off for good once the kernel refuses the flag. Without it, the caller fsyncs the
    descriptor ``append`` returns.
    """

    def __init__(self, queue_dir: str, dsync: bool) -> None:
        self.queue_dir = queue_dir
        self.dsync = dsync and hasattr(os, "RWF_DSYNC")
        self._segment: Segment | None = None
        self._fd: int | None = None
        self._end = 0

    def append(self, data: bytes, name: str) -> tuple[Segment, int, bool, int | None]:
        """Append a pack to the current segment (a new one, named after ``name``, when there is
        none or it is full): the segment, where the pack starts, whether the pack must wait for a
        sync of ``queue/`` (the segment's name is not durable yet), and a descriptor of the
        segment to fsync (the caller closes it), or None if the write was durable."""
        if self._segment is not None and self._end and self._end + len(data) > SEGMENT_MAX:
            self.close()
        if self._segment is None or self._fd is None:
            path = os.path.join(self.queue_dir, name + SEGMENT)
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._segment = Segment.new(path)
            self._end = 0
        segment, fd, start = self._segment, self._fd, self._end
        try:
            durable = self._write(fd, data, start)
        except OSError:  # a full disk: nothing more goes after what may be half written
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            self.close()
            raise
        self._end += len(data)
        return segment, start, not segment.name_is_durable(), None if durable else os.dup(fd)

    def _write(self, fd: int, data: bytes, start: int) -> bool:
        """Write ``data`` at ``start``; whether it is durable already (``dsync``)."""
        view = memoryview(data)
        if self.dsync:
            try:
                while view:
                    offset = start + len(data) - len(view)
                    view = view[os.pwritev(fd, [view], offset, os.RWF_DSYNC) :]
                return True
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP) or len(view) != len(data):
                    raise
                self.dsync = False  # an old kernel or a filesystem without it: fsync
                log.info("spool: no RWF_DSYNC here ({error}); packs are fsynced", error=e)
        while view:
            view = view[os.pwrite(fd, view, start + len(data) - len(view)) :]
        return False

    def close(self, segment: Segment | None = None, *, if_empty: bool = False) -> None:
        """Take no more packs into the current segment (only if it is ``segment``, when given,
        and holds no record, if ``if_empty``); it goes now if it holds none."""
        current = self._segment
        if current is None or (segment is not None and segment is not current):
            return
        if if_empty and not current.is_empty():
            return
        fd = self._fd
        self._segment, self._fd, self._end = None, None, 0
        if fd is not None:
            os.close(fd)
        if current.drop_records(close=True):
            unlink(current.path)


def erase_failed_pack(
    segment: Segment, entries: list[Entry], counted: bool, fsync: Callable[[int], None]
) -> None:
    """Erase the records of a pack that failed (never acknowledged), so a write that reaches the
    disk later never brings them back. The caller has the writer close the segment."""
    fd = None
    try:
        fd = os.open(segment.path, os.O_RDWR)
        for _, offset, body_size, env_size in entries:
            erase_record(fd, offset + body_size + env_size, segment.path)
        fsync(fd)
    except OSError as e:
        log.error(
            "spool: cannot erase a failed pack in {path}: {error}", path=segment.path, error=e
        )
    finally:
        if fd is not None:
            os.close(fd)
    if counted and segment.drop_records(len(entries)):
        unlink(segment.path)


class Eraser:
    """Erasing records of segments (the remover thread's alone, or the caller's offline): the
    erasures are made durable by ``sync``; a closed segment with no record left goes whole."""

    def __init__(self, fsync: Callable[[int], None]) -> None:
        self.fsync = fsync
        self._fds: dict[Segment, int] = {}  # segments with erasures not synced yet
        self._touched: set[Segment] = set()  # segments erased from since ``touched`` was asked

    def erase(self, record: Record) -> None:
        if record.erased:
            return
        segment = record.segment
        fd = self._fds.get(segment)
        if fd is None:
            fd = os.open(segment.path, os.O_RDWR)
            self._fds[segment] = fd
        erase_record(fd, record.trailer_offset, segment.path)
        record.erased = True
        self._touched.add(segment)
        if not segment.drop_records(1):
            return
        self._fds.pop(segment, None)
        os.close(fd)
        unlink(segment.path)  # closed and empty: no sync of its erasures, the segment goes whole

    def touched(self) -> set[Segment]:
        """The segments erased from since the last call (to see whether one is empty now)."""
        touched, self._touched = self._touched, set()
        return touched

    def sync(self) -> None:
        """fsync (and close) the segments with records erased since the last call."""
        fds, self._fds = self._fds, {}
        for segment, fd in fds.items():
            try:
                self.fsync(fd)
            except OSError as e:
                log.error(
                    "spool: cannot sync removals from {path}: {error}", path=segment.path, error=e
                )
            finally:
                os.close(fd)
