"""One message being received into the spool (``IPrependingWriter``), on the reactor thread."""

from __future__ import annotations

from collections.abc import Callable
from typing import IO

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.envelope import Envelope
from mailrelay.interfaces import IPrependingWriter
from mailrelay.queue.spool.jobs import Commit
from mailrelay.queue.spool.segments import unlink
from mailrelay.queue.store import storage_failure

log = Logger()

BUFFER = 256 * 1024  # a body up to this size stays in memory until commit


@implementer(IPrependingWriter)
class Receiver:
    """One message being received into ``tmp/``.

    ``write`` gathers the first 256 KiB in memory; only a larger body gets its file in ``tmp/``
    then (buffered, a write syscall per 256 KiB), so the reactor thread never waits for the disk
    to sync, and a small message's file is made by the writer thread at commit (making a file can
    wait for the journal while other messages are being fsynced). An error is kept and reported
    by ``commit`` as 452 4.3.1 after the partial file is removed. ``commit`` hands the body (in
    memory or in its file) over to a ``jobs.Commit``, which ``submit`` passes to the writer
    thread; ``ended`` is called once the message is committed, aborted or failed. What
    ``prepend`` is given goes into the message's state, in the same record.
    """

    def __init__(
        self,
        queue_id: str,
        envelope: Envelope,
        tmp_path: str,
        submit: Callable[[Commit], defer.Deferred[str]],
        ended: Callable[[Receiver], None],
    ) -> None:
        self.queue_id = queue_id
        self.envelope = envelope
        self.tmp_path = tmp_path
        self._submit = submit
        self._ended = ended
        self.error: OSError | None = None
        self.done = False
        self.size = 0
        self._file: IO[bytes] | None = None
        self._pending = bytearray()  # the body while it is small enough to keep in memory
        self.prefix = b""

    def _fail(self, error: OSError) -> None:
        if self.error is None:
            log.error(
                "spool: cannot store message {queue_id}: {error}",
                queue_id=self.queue_id,
                error=error,
            )
        self.error = error
        created = self._file is not None
        self._close_quietly()
        self._pending = bytearray()
        if created:
            unlink(self.tmp_path)

    def _close_quietly(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def write(self, data: bytes) -> None:
        if self.done or self.error is not None:
            return
        self.size += len(data)
        if self._file is None and len(self._pending) + len(data) <= BUFFER:
            self._pending += data
            return
        try:
            if self._file is None:
                self._file = open(self.tmp_path, "xb", buffering=BUFFER)  # noqa: SIM115 - lives until commit
                self._file.write(self._pending)
                self._pending = bytearray()
            self._file.write(data)
        except OSError as e:
            self._fail(e)

    def prepend(self, header: bytes) -> None:
        self.prefix = header

    def commit(self) -> defer.Deferred[str]:
        if self.done:
            raise RuntimeError(f"message {self.queue_id} already committed or aborted")
        self.done = True
        if self.error is not None:
            self._ended(self)
            return defer.fail(storage_failure())
        job = Commit(
            self.queue_id,
            self.envelope,
            self.size,
            self._pending,
            self._file,
            self.tmp_path,
            self.prefix,
        )
        self._pending, self._file = bytearray(), None  # the writer thread's from now on
        return self._submit(job)

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        self._pending = bytearray()
        if self._file is not None:
            self._close_quietly()
            unlink(self.tmp_path)  # one quick unlink; no fsync needed to forget a message
        self._ended(self)
