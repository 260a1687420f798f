"""Reading committed messages: their state, their body, the schedule of them all.

Blocking; called from the read pool, the reactor thread (bodies) and offline tools. What it
shares with the pipeline's threads goes through ``SegmentIndex`` and ``OpenFiles``, each behind
its own lock; a segment is never rewritten, so reading one needs no count.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import Logger

from mailrelay.envelope import QueuedMessage
from mailrelay.queue.spool import _fast
from mailrelay.queue.spool.format import (
    STATE,
    TRAILER,
    decode_state,
    read_envelope,
    read_trailer,
)
from mailrelay.queue.spool.segments import SegmentIndex
from mailrelay.queue.spool.spares import OpenFiles
from mailrelay.queue.store import is_queue_id

log = Logger()

_TAIL = 4096  # bytes read from a message file's end: the envelope and trailer, most of the time


class BodyFile(io.RawIOBase):
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


class Reader:
    """Reads what ``queue/`` holds: message files, saved states and segment records."""

    def __init__(self, queue_dir: str, index: SegmentIndex, open_files: OpenFiles) -> None:
        self._prefix = queue_dir + os.sep
        self.index = index
        self.open_files = open_files

    def path(self, queue_id: str, ext: str = "") -> str:
        return self._prefix + queue_id + ext  # ids are checked names: no os.path.join needed

    def message(self, queue_id: str) -> QueuedMessage:
        """One message's current state; KeyError if there is no such message."""
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        try:
            data = self.state(queue_id)
        except FileNotFoundError:
            raise KeyError(queue_id) from None
        return decode_state(data)

    def state(self, queue_id: str, saved: bool | None = None, tail: int | None = None) -> bytes:
        """The JSON of a message's current state: its ``.env`` if saved (``saved``: whether it is
        known to be), else the one in its record (only its last ``tail`` bytes, if given).
        FileNotFoundError if there is no message."""
        record = self.index.get(queue_id)
        if record is not None:
            try:
                return record.read_envelope()
            except FileNotFoundError:
                pass  # the segment went meanwhile: the message moved to its own file, or is gone
        if saved is not False:
            try:
                with open(self.path(queue_id, STATE), "rb") as f:
                    return f.read()
            except FileNotFoundError:
                if saved:
                    raise
        fd = self.open_files.open(self.path(queue_id), queue_id)
        try:
            if tail is not None:
                _, env_size, data = read_trailer(fd, tail + TRAILER.size)
                end = len(data) - TRAILER.size
                return data[max(0, end - env_size) : end]
            return read_envelope(fd, _TAIL)
        finally:
            os.close(fd)
            self.open_files.closed(queue_id)

    def body(self, queue_id: str) -> IO[bytes]:
        """A message's body, open for reading; KeyError if there is no such message."""
        record = self.index.get(queue_id)
        if record is not None:
            try:
                fd = os.open(record.segment.path, os.O_RDONLY)
            except FileNotFoundError:
                pass  # the segment went meanwhile: moved to its own file, or removed
            else:
                return _as_binary(BodyFile(fd, record.body_size, base=record.offset))
        try:
            fd = self.open_files.open(self.path(queue_id), queue_id)
        except FileNotFoundError:
            raise KeyError(queue_id) from None
        try:
            body_size, _, _ = read_trailer(fd)
        except BaseException:
            os.close(fd)
            self.open_files.closed(queue_id)
            raise
        return _as_binary(BodyFile(fd, body_size, lambda: self.open_files.closed(queue_id)))

    def schedule(self, ids: list[str], saved: set[str]) -> list[tuple[str, float, bool]]:
        """``(queue_id, next_attempt, held)`` of each of ``ids`` still there; ``saved``: the ids
        known to have a saved state."""
        out = []
        for queue_id in ids:
            try:
                data = self.state(queue_id, queue_id in saved, _fast.SCHEDULE_TAIL)
            except FileNotFoundError:
                continue  # delivered meanwhile
            except ValueError:
                log.error("spool: unreadable message queue/{queue_id}", queue_id=queue_id)
                continue
            found = _fast.schedule_from_tail(data)
            if found is None:  # the tail did not hold it: the whole state, decoded
                try:
                    d = json.loads(self.state(queue_id, queue_id in saved))
                except (ValueError, FileNotFoundError):
                    log.error("spool: unreadable envelope of queue/{queue_id}", queue_id=queue_id)
                    continue
                found = (float(d.get("next_attempt", 0.0)), bool(d.get("held", False)))
            out.append((queue_id, *found))
        return out


def _as_binary(f: BodyFile) -> IO[bytes]:
    """A raw body file as the ``IO[bytes]`` stores hand out (typeshed types RawIOBase apart)."""
    return f  # type: ignore[return-value]  # RawIOBase is a binary file; typeshed disagrees
