"""Helpers shared by every ``IQueueStore``: queue ids and the on-disk form of a queued message.

Kept apart from any one backend so the filesystem spool, the memory store of ``mailrelay.testing``
and a database store write the same JSON and mint ids the same way.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import attrs

from mailrelay.address import split
from mailrelay.envelope import Envelope, QueuedMessage, RecipientStatus, Reply
from mailrelay.errors import TemporaryFailure

#: 2: the envelope records ``trusted`` (a version 1 message reads as not recorded, None).
FORMAT_VERSION = 2

#: Crockford's base32: sortable as text, no I/L/O/U to misread when an operator copies an id.
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TIME_CHARS = 10  # 50 bits of milliseconds: good until the year 37648
_RANDOM_CHARS = 8  # 40 random bits: ids minted in the same millisecond stay distinct
_RANDOM_POOL = 640  # random bytes fetched at once (128 ids)
QUEUE_ID = re.compile(rf"^[{_ALPHABET}]{{{_TIME_CHARS + _RANDOM_CHARS}}}$")


def storage_full_reply() -> Reply:
    return Reply(452, "4.3.1", "Insufficient system storage")


def storage_failure() -> TemporaryFailure:
    """What a commit fails with when the message cannot be made durable (disk full, unwritable)."""
    return TemporaryFailure(storage_full_reply())


_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]  # two digits per lookup: 10 bits
_SHIFTS = range(5 * (_TIME_CHARS + _RANDOM_CHARS) - 10, -1, -10)  # 80, 70, ..., 0


def _base32(value: int) -> str:
    """``value`` as ``_TIME_CHARS + _RANDOM_CHARS`` digits, most significant first."""
    pairs = _PAIRS
    return "".join([pairs[(value >> shift) & 1023] for shift in _SHIFTS])


class QueueIdGenerator:
    """Mints queue ids that sort by time (from the injected clock) and differ by injected
    randomness.

    Ids are 18 characters of base32: 10 for the milliseconds since the epoch, 8 random. Sorting ids
    as text sorts the queue by arrival, which ``queue list`` and start-up recovery rely on.
    With ``shard`` (0-31, a worker process's number) the 11th character is that number instead of
    random, so the workers of one instance, each with its own spool, never mint the same id.
    """

    def __init__(
        self, clock: Any, randbytes: Callable[[int], bytes] = os.urandom, shard: int | None = None
    ) -> None:
        if shard is not None and not 0 <= shard < len(_ALPHABET):
            raise ValueError(f"shard must be 0-{len(_ALPHABET) - 1}, not {shard}")
        self.clock = clock
        self.randbytes = randbytes
        self.shard = shard
        self._pool = b""  # random bytes fetched ahead: a system call per 128 ids, not per id
        self._used = 0

    def __call__(self) -> str:
        millis = int(self.clock.seconds() * 1000) & ((1 << 50) - 1)
        if self._used + 5 > len(self._pool):
            self._pool, self._used = self.randbytes(_RANDOM_POOL), 0
        rand = int.from_bytes(self._pool[self._used : self._used + 5], "big")
        self._used += 5
        if self.shard is not None:
            rand = (self.shard << 35) | (rand & ((1 << 35) - 1))
        return _base32((millis << (5 * _RANDOM_CHARS)) | rand)


def is_queue_id(text: str) -> bool:
    """Whether ``text`` looks like an id we minted (so a path built from it stays in the spool)."""
    return bool(QUEUE_ID.match(text))


def without_duplicates(envelope: Envelope) -> Envelope:
    """``envelope`` with each recipient once, as Postfix's cleanup does: the same exact local part
    and the same domain (in canonical form, so ``LOCAL.TEST`` is ``local.test``) is one mailbox,
    which the next hop would otherwise get several times. The first keeps its DSN parameters."""
    recipients = envelope.recipients
    if len(recipients) < 2:
        return envelope
    seen: set[tuple[str, str]] = set()
    unique = []
    for r in recipients:
        key = split(r.address)
        if key not in seen:
            seen.add(key)
            unique.append(r)
    if len(unique) == len(recipients):
        return envelope
    return attrs.evolve(envelope, recipients=tuple(unique))


def new_message(queue_id: str, envelope: Envelope, prefix: bytes = b"") -> QueuedMessage:
    """The state of a message just committed: every recipient pending (each once), due at once;
    ``prefix`` what the writer was given to deliver in front of the text (``IPrependingWriter``).

    Every store (spool, PostgreSQL, the memory store) makes its queued messages here, whoever
    queues them (the SMTP server, bounces, an embedder), so duplicates collapse in one place.
    """
    envelope = without_duplicates(envelope)
    return QueuedMessage(
        queue_id=queue_id,
        envelope=envelope,
        statuses=tuple(RecipientStatus(r) for r in envelope.recipients),
        prefix=prefix,
    )


def message_to_dict(message: QueuedMessage) -> dict[str, Any]:
    # Keep "next_attempt" and "held" last and in this order: the spool's start-up scan finds them
    # at the end of the file without parsing the whole envelope.
    d: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "queue_id": message.queue_id,
        "envelope": message.envelope.to_dict(),
        "statuses": [s.to_dict() for s in message.statuses],
        "attempts": message.attempts,
        "warned": message.warned,
    }
    if message.prefix:
        # JSON holds text: each octet as the character of that number (latin-1), so any octets
        # come back as they were, and a DKIM signature (ASCII) reads as itself. Absent when
        # empty (most messages); no version bump: a reader that ignores it sends the text
        # unsigned, which a signature never prevents anyway.
        d["prefix"] = message.prefix.decode("latin-1")
    d["next_attempt"] = message.next_attempt
    d["held"] = message.held
    return d


def message_from_dict(d: dict[str, Any]) -> QueuedMessage:
    version = d.get("version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise ValueError(
            f"queue file format {version} is newer than this mailrelay ({FORMAT_VERSION})"
        )
    return QueuedMessage(
        queue_id=d["queue_id"],
        envelope=Envelope.from_dict(d["envelope"]),
        statuses=tuple(RecipientStatus.from_dict(s) for s in d["statuses"]),
        attempts=int(d.get("attempts", 0)),
        next_attempt=float(d.get("next_attempt", 0.0)),
        held=bool(d.get("held", False)),
        warned=bool(d.get("warned", False)),
        prefix=d.get("prefix", "").encode("latin-1"),
    )
