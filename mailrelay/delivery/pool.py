"""The connection cache: idle sessions to a next hop, kept for the next message (Postfix's scache).

A session comes back after a transaction; it is kept while it has delivered fewer than
``max_messages`` messages, is younger than ``max_age`` seconds and has not been idle for
``idle_time`` seconds; otherwise it leaves with QUIT. A session the peer closes while idle simply
drops out. Time from the injected clock.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from mailrelay.smtp.client import SMTPClientProtocol


@attrs.define(eq=False)
class Session:
    """An established, set-up (TLS, AUTH) connection and what we know of it."""

    client: SMTPClientProtocol
    remote: str
    created: float
    tls: str = ""  # "TLSv1.3 cipher" when encrypted
    idle_timer: IDelayedCall | None = None
    watched: bool = False  # the pool notices when the peer closes it


class ConnectionPool:
    def __init__(
        self,
        clock: IReactorTime,
        max_messages: int = 100,
        max_age: float = 300.0,
        idle_time: float = 2.0,
    ) -> None:
        self.clock = clock
        self.max_messages, self.max_age, self.idle_time = max_messages, max_age, idle_time
        self._idle: dict[Hashable, list[Session]] = {}
        self.closed = False

    def take(self, key: Hashable) -> Session | None:
        """An idle session for ``key`` (most recently used first), or ``None``."""
        sessions = self._idle.get(key)
        while sessions:
            s = sessions.pop()
            if not sessions:
                del self._idle[key]
            self._cancel(s)
            if s.client.usable and not self._expired(s):
                return s
            s.client.quit()
        return None

    def put(self, key: Hashable, session: Session) -> None:
        """Keep a session after its transaction, or QUIT it when it is spent or we are closing."""
        if (
            self.closed
            or not session.client.usable
            or self._expired(session)
            or self.idle_time <= 0
        ):
            session.client.quit()
            return
        self._idle.setdefault(key, []).append(session)
        session.idle_timer = self.clock.callLater(self.idle_time, self._idle_expired, key, session)
        if not session.watched:
            session.watched = True
            session.client.when_closed().addCallback(self._gone, key, session)

    def close(self) -> defer.Deferred[Any]:
        """QUIT every idle session; fires when they are all closed. Nothing is pooled afterwards."""
        self.closed = True
        sessions = [s for v in self._idle.values() for s in v]
        self._idle.clear()
        for s in sessions:
            self._cancel(s)
        return defer.DeferredList([s.client.quit() for s in sessions])

    def _expired(self, s: Session) -> bool:
        return (
            s.client.transactions >= self.max_messages
            or self.clock.seconds() - s.created >= self.max_age
        )

    def _idle_expired(self, key: Hashable, s: Session) -> None:
        s.idle_timer = None
        self._remove(key, s)
        s.client.quit()

    def _gone(self, result: object, key: Hashable, s: Session) -> object:
        self._cancel(s)
        self._remove(key, s)
        return result

    def _remove(self, key: Hashable, s: Session) -> None:
        sessions = self._idle.get(key)
        if sessions and s in sessions:
            sessions.remove(s)
            if not sessions:
                del self._idle[key]

    def _cancel(self, s: Session) -> None:
        if s.idle_timer is not None and s.idle_timer.active():
            s.idle_timer.cancel()
        s.idle_timer = None
