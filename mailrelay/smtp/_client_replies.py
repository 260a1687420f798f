"""The replies one client connection awaits, matched to its commands in the order they went out.

Each awaited reply has its stage (``"mail"``, ``"rcpt"``...) and its timeout (RFC 5321 4.5.3.2);
one timer runs, for the first. The protocol writes a command, then ``wait``s (or ``wait_many``
for a pipelined batch); each reply it parses goes to ``next()``'s entry. A wait that runs out
calls ``timed_out(stage)``; what the protocol does then (abort) is its own business.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from mailrelay.envelope import Reply
from mailrelay.smtp._client_state import Batch, ClientFailure, Result, Waiting


class ReplyQueue:
    """What is awaited, first first; false when nothing is."""

    def __init__(self, clock: IReactorTime, timed_out: Callable[[str], None]) -> None:
        self.clock = clock
        self.timed_out = timed_out
        self._waiting: deque[Waiting] = deque()
        self._timer: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def stage(self, default: str) -> str:
        """The stage of the reply awaited first, else ``default``."""
        return self._waiting[0].stage if self._waiting else default

    def wait(
        self,
        d: defer.Deferred[Result],
        stage: str,
        timeout: float,
        on_reply: Callable[[Reply], None] | None = None,
    ) -> None:
        self._waiting.append(Waiting(d, stage, timeout, on_reply))
        if len(self._waiting) == 1:
            self._arm()

    def wait_many(self, batch: Batch, specs: Sequence[tuple[str, float]]) -> None:
        """One reply per ``(stage, timeout)``, in order, all into ``batch``."""
        was_empty = not self._waiting
        for stage, timeout in specs:
            self._waiting.append(Waiting(batch, stage, timeout))
        if was_empty:
            self._arm()

    def next(self) -> Waiting:
        """The entry the reply just read answers (there must be one); the next one's timer runs."""
        w = self._waiting.popleft()
        self._arm()
        return w

    def fail_all(self, failure: ClientFailure) -> None:
        """Answer everything awaited with ``failure`` (each under its own stage)."""
        while self._waiting:
            w = self._waiting.popleft()
            w.fire(ClientFailure(w.stage, failure.reason, failure.reply))

    def stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _arm(self) -> None:
        """(Re)start the timer for the reply now awaited; an idle timer may expire harmlessly."""
        if not self._waiting:
            return
        timeout = self._waiting[0].timeout
        if self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        else:
            self._timer = self.clock.callLater(timeout, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self._waiting:  # else nothing was awaited any more when it expired
            self.timed_out(self._waiting[0].stage)
