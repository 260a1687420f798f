"""fsync of a batch's files, in parallel only while fsyncs are slow (the writer thread's tool).

On a disk that takes milliseconds to flush, concurrent fsyncs share one journal commit, so the
files of a batch are handed to ``threads`` threads. While an fsync takes less than ``SLOW`` on
average the writer fsyncs them itself, one after another: a hand-off per file would cost more, in
thread switches and waits for the GIL, than the overlap saves. Now and then (one batch in
``PROBE_EVERY``) the writer does a batch itself, timed, to see whether fsyncs are still slow.
The pool's threads own nothing: a descriptor goes in, an error (or None) comes back through the
executor's futures.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

SLOW = 0.002  # seconds: fsyncs slower than this on average are worth the threads
PROBE_EVERY = 64  # while the threads are used, one batch in this many is fsynced by the caller


class FsyncPool:
    """fsyncs lists of descriptors; used by one thread at a time (the writer's)."""

    def __init__(
        self, fsync: Callable[[int], None], threads: int, timer: Callable[[], float]
    ) -> None:
        self.fsync = fsync
        self.threads = threads
        self.timer = timer
        self._average = 0.0  # seconds per fsync done by the caller itself (moving average)
        self._parallel = 0  # batches handed to the threads
        self._executor: ThreadPoolExecutor | None = None

    def start(self) -> None:
        if self.threads > 0 and self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self.threads, thread_name_prefix="mailrelay-spool-fsync"
            )

    def stop(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown()

    def sync(self, fds: list[int]) -> list[OSError | None]:
        """fsync each of ``fds``; the error of each (None where it worked)."""
        if self._executor is not None and self._in_parallel(len(fds)):
            return list(self._executor.map(self._sync_one, fds))
        outcomes = []
        for fd in fds:
            started = self.timer()
            outcomes.append(self._sync_one(fd))
            self._average += (self.timer() - started - self._average) / 4
        return outcomes

    def _sync_one(self, fd: int) -> OSError | None:
        try:
            self.fsync(fd)
            return None
        except OSError as e:
            return e

    def _in_parallel(self, files: int) -> bool:
        if files < 2 or self._average < SLOW:
            return False
        self._parallel += 1
        return self._parallel % PROBE_EVERY != 0
