"""Spare files: the file of a removed message, kept in ``tmp/`` and rewritten for a new one.

Creating and freeing an inode costs more CPU than the rest of a commit (ext4 scans past recently
freed inodes), so the remover thread renames a removed message's file to ``tmp/spare.<n>`` (a
bounded pool) instead of unlinking it, and the writer thread writes the next message that needs
a file into it. A spare is rewritten only once a sync of ``queue/`` has made its removal durable:
a crash can then never show the old message's name with a new message's bytes (a crash before
the new message's commit leaves it in ``tmp/``, removed at start). A file someone is reading
(``OpenFiles``) is unlinked instead, and one with another link is never overwritten.

Shared between threads, each behind its own lock: ``RemovalCount`` (the remover counts, the
directory syncer and the remover record what a sync covered, the writer reads it), ``SpareFiles``
(the remover adds, the writer takes), ``OpenFiles`` (readers in any thread; the remover asks).
"""

from __future__ import annotations

import os
import threading
from collections import deque

import attrs

from mailrelay.queue.spool.format import SPARE
from mailrelay.queue.spool.segments import unlink

SPARES = 256  # spare files kept at most
SPARES_OPEN = 64  # of those, how many the remover opens ahead for the writer


class RemovalCount:
    """How many removals the remover has done, and how many of them a sync of ``queue/`` covers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = 0
        self._synced = 0

    def add(self, n: int) -> None:
        with self._lock:
            self._done += n

    def done(self) -> int:
        """Taken before a sync of ``queue/``: the removals that sync will cover."""
        with self._lock:
            return self._done

    def covered(self, done: int) -> None:
        """A sync of ``queue/`` that began after ``done()`` answered ``done`` has ended."""
        with self._lock:
            self._synced = max(self._synced, done)

    def synced(self) -> int:
        with self._lock:
            return self._synced

    def pending(self) -> bool:
        with self._lock:
            return self._synced < self._done


class OpenFiles:
    """Message files open for reading (``queue/<id>``, by id): such a file is never made a spare."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # also held by SpareFiles.take_from_queue around its rename
        self._open: dict[str, int] = {}

    def open(self, path: str, queue_id: str) -> int:
        with self.lock:
            fd = os.open(path, os.O_RDONLY)
            self._open[queue_id] = self._open.get(queue_id, 0) + 1
        return fd

    def closed(self, queue_id: str) -> None:
        with self.lock:
            n = self._open.pop(queue_id, 1) - 1
            if n > 0:
                self._open[queue_id] = n

    def is_open(self, queue_id: str) -> bool:
        """Call with ``lock`` held."""
        return queue_id in self._open

    def count(self) -> int:
        with self.lock:
            return len(self._open)


@attrs.define
class Spare:
    """A spare file, to be rewritten once a sync of ``queue/`` has covered ``removals`` removals
    (its own among them); with a descriptor for writing when one is open."""

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


class SpareFiles:
    """The pool of spare files: the remover adds, the writer takes."""

    def __init__(self, tmp_dir: str, open_files: OpenFiles, removals: RemovalCount) -> None:
        self.tmp_dir = tmp_dir
        self._open_files = open_files
        self._removals = removals
        self._lock = threading.Lock()
        self._spares: deque[Spare] = deque()
        self._opened = 0  # spares in the pool with a descriptor open
        self._counter = 0

    def take_from_queue(self, path: str, queue_id: str) -> bool:
        """Take the message file ``path`` out of ``queue/``: renamed to a spare while the pool has
        room and nobody reads it, else unlinked. Whether it was there. The remover's."""
        with self._open_files.lock:  # no reader opens it meanwhile
            with self._lock:
                full = len(self._spares) >= SPARES
                self._counter += 1
                spare = os.path.join(self.tmp_dir, f"{SPARE}{self._counter}")
            if full or self._open_files.is_open(queue_id):
                return unlink(path)  # an open reader keeps reading the old bytes
            try:
                os.rename(path, spare)
            except FileNotFoundError:
                return False
        # Its removal is counted after this batch: a sync of queue/ that saw that count covers it.
        kept = Spare(spare, self._removals.done() + 1)
        with self._lock:
            open_ahead = self._opened < SPARES_OPEN
        if open_ahead:
            # Opened here, so the writer, on whom the 250s wait, does not (each system call of a
            # thread costs it a wait for the GIL while the reactor thread is busy).
            try:
                kept.open()
            except OSError:
                unlink(spare)
                return True
        with self._lock:
            self._opened += kept.fd is not None
            self._spares.append(kept)
        return True

    def take(self) -> Spare | None:
        """A spare whose removal is durable, open for writing; None if there is none (the
        writer's)."""
        synced = self._removals.synced()
        while True:
            with self._lock:
                if not self._spares or self._spares[0].removals > synced:
                    return None
                spare = self._spares.popleft()
                self._opened -= spare.fd is not None
            if spare.fd is not None:
                return spare
            try:
                spare.open()
            except OSError:
                unlink(spare.path)
                continue
            return spare

    def close(self) -> None:
        """Close the spares' descriptors (at stop; the files stay, removed at the next start)."""
        with self._lock:
            spares, self._spares, self._opened = list(self._spares), deque(), 0
        for spare in spares:
            if spare.fd is not None:
                os.close(spare.fd)
