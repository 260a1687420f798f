"""The ESMTP client's states, timeouts, failures and reply bookkeeping (no I/O here)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence

import attrs
from twisted.internet import defer

from mailrelay.envelope import Reply


@attrs.frozen
class ClientTimeouts:
    """Seconds to wait for each reply (RFC 5321 4.5.3.2 defaults)."""

    greeting: float = 300.0
    command: float = 300.0  # EHLO, MAIL, RCPT, RSET, STARTTLS, AUTH
    data_init: float = 120.0
    data_block: float = 180.0  # no progress writing the body for this long
    final: float = 600.0
    quit: float = 10.0


class ClientState(enum.Enum):
    CONNECTING = "connecting"
    GREETING = "greeting"  # waiting for the 220
    EHLO = "ehlo"
    READY = "ready"  # between transactions
    BUSY = "busy"  # a transaction, STARTTLS, AUTH or RSET in progress
    QUITTING = "quitting"
    CLOSED = "closed"


_S = ClientState
TRANSITIONS: dict[ClientState, frozenset[ClientState]] = {
    _S.CONNECTING: frozenset({_S.GREETING, _S.CLOSED}),
    _S.GREETING: frozenset({_S.EHLO, _S.QUITTING, _S.CLOSED}),
    _S.EHLO: frozenset({_S.READY, _S.QUITTING, _S.CLOSED}),
    _S.READY: frozenset({_S.BUSY, _S.QUITTING, _S.CLOSED}),
    _S.BUSY: frozenset({_S.READY, _S.QUITTING, _S.CLOSED}),
    _S.QUITTING: frozenset({_S.CLOSED}),
    _S.CLOSED: frozenset(),
}
"""The client's life: every state change goes through ``_to``, which refuses any other."""


class ClientFailure(Exception):
    """A stage of the session failed.

    ``reply`` is the server's reply when it gave one, else ``None`` (timeout, lost connection,
    garbage); ``reason`` is a human sentence for logs and synthesized replies. ``replies`` holds
    the per-recipient replies known when a transaction broke off (``None`` where unknown).
    ``final``: a success among them is a delivery (LMTP's replies after the dot), not only an
    accepted RCPT.
    """

    def __init__(
        self,
        stage: str,
        reason: str,
        reply: Reply | None = None,
        replies: Sequence[Reply | None] = (),
        *,
        final: bool = False,
    ) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason, self.reply = stage, reason, reply
        self.replies = list(replies)
        self.final = final

    @property
    def network(self) -> bool:
        """No reply: the connection broke, timed out or the peer spoke garbage."""
        return self.reply is None


def rejected(stage: str, reply: Reply) -> ClientFailure:
    return ClientFailure(stage, f"{stage} rejected: {reply}", reply)


Result = Reply | ClientFailure

# The positive replies of a transaction's steps (RFC 5321 4.3.2, RFC 3030): 250, and to RCPT also
# 251 (will forward) or 252 (cannot verify, will try). A 220 or 221 there is a peer out of step.
_SUCCESS = {"rcpt": (250, 251, 252)}
_OK = (250,)  # every other step


def in_step(code: int, stage: str, go_ahead: bool = False) -> bool:
    """Whether ``code`` is the success this step can have: 250; 251 or 252 to RCPT; 354 where we
    asked to go ahead. Any other (354 to RCPT, 250 to DATA, 221 to MAIL, 220 to the final dot...)
    means the peer and we no longer agree where the session is."""
    return code == 354 if go_ahead else code in _SUCCESS.get(stage, _OK)


class Batch:
    """Pipelined replies awaited together: one Deferred for the lot (cheaper than one each)."""

    __slots__ = ("deferred", "results", "expected")

    def __init__(self, expected: int) -> None:
        self.deferred: defer.Deferred[list[Result]] = defer.Deferred()
        self.results: list[Result] = []
        self.expected = expected

    def add(self, result: Result) -> None:
        self.results.append(result)
        if len(self.results) == self.expected:
            self.deferred.callback(self.results)


@attrs.define
class Waiting:
    deferred: defer.Deferred[Result] | Batch
    stage: str
    timeout: float
    on_reply: Callable[[Reply], None] | None = None

    def fire(self, result: Result) -> None:
        if isinstance(self.deferred, Batch):
            self.deferred.add(result)
        else:
            self.deferred.callback(result)
