"""What the spool remembers of recent commits, so a new message's first load and first delivery
read no file (the reactor thread's alone).

The queue manager loads a message as soon as its commit is answered, and delivers it at once: its
state and small body, just written, are kept here, bounded (a paused queue does not hold its
messages in memory), and dropped on save and remove, so what is here never differs from the disk.
"""

from __future__ import annotations

from collections import OrderedDict

from mailrelay.envelope import QueuedMessage

MESSAGES = 1024  # just-committed messages kept for their first load
BODY_BYTES = 16 * 1024 * 1024  # and their small bodies (up to 1/64 of this each), for delivery


class RecentCommits:
    def __init__(self) -> None:
        self._messages: OrderedDict[str, QueuedMessage] = OrderedDict()
        self._bodies: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._never_saved: set[str] = set()  # committed in this life, never saved: no .env

    def remember(self, message: QueuedMessage | None, body: bytes | None) -> None:
        """A commit of ``message`` (and its ``body``, if small and at hand) was answered."""
        if message is None:
            return
        queue_id = message.queue_id
        self._never_saved.add(queue_id)
        self._messages[queue_id] = message
        if len(self._messages) > MESSAGES:
            self._messages.popitem(last=False)
        if body is not None and len(body) <= BODY_BYTES // 64:
            self._bodies[queue_id] = body
            self._bytes += len(body)
            while self._bytes > BODY_BYTES or len(self._bodies) > MESSAGES:
                _, old = self._bodies.popitem(last=False)
                self._bytes -= len(old)

    def take_message(self, queue_id: str) -> QueuedMessage | None:
        """Its state for its first load (later loads read the disk)."""
        return self._messages.pop(queue_id, None)

    def body(self, queue_id: str) -> bytes | None:
        return self._bodies.get(queue_id)

    def never_saved(self, queue_id: str) -> bool:
        """Committed in this life and never saved (its file surely exists; no saved state)."""
        return queue_id in self._never_saved

    def forget(self, queue_id: str) -> None:
        """Drop what is kept of ``queue_id`` (its state is about to change on disk)."""
        self._messages.pop(queue_id, None)
        self._never_saved.discard(queue_id)
        body = self._bodies.pop(queue_id, None)
        if body is not None:
            self._bytes -= len(body)
