"""The control channel's AMP commands: what ``mailrelay queue ...`` asks a running instance.

Answers are JSON (``JSONValue``), split over as many AMP values as needed, so a message with
thousands of recipients is not cut at AMP's 64 KiB value limit. An unknown queue id is a
``KeyError`` on both sides.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from twisted.protocols import amp

_CHUNK = 60_000


class JSONValue(amp.Argument):
    """Any JSON-serialisable value, in chunks ``name.0``, ``name.1``, ... on the wire."""

    def toBox(self, name: bytes, strings: Any, objects: dict[str, Any], proto: Any) -> None:
        value = objects.pop(name.decode())
        data = json.dumps(value, separators=(",", ":")).encode()
        for i in range(0, max(len(data), 1), _CHUNK):
            strings[name + b".%d" % (i // _CHUNK)] = data[i : i + _CHUNK]

    def fromBox(self, name: bytes, strings: Any, objects: dict[str, Any], proto: Any) -> None:
        parts, i = [], 0
        while (key := name + b".%d" % i) in strings:
            parts.append(strings.pop(key))
            i += 1
        objects[name.decode()] = json.loads(b"".join(parts)) if parts else None


class MessageHeld(Exception):
    """The message is on hold: ``release`` it to have it attempted."""


_ERRORS: dict[type[Exception], bytes] = {KeyError: b"NO_SUCH_MESSAGE"}


class ListQueue(amp.Command):
    """A page of the queue, in id (= arrival) order, after ``after``."""

    arguments = [(b"after", amp.Unicode(optional=True)), (b"limit", amp.Integer())]
    response = [(b"messages", JSONValue()), (b"more", amp.Boolean())]


class ShowMessage(amp.Command):
    arguments = [(b"queue_id", amp.Unicode())]
    response = [(b"message", JSONValue())]
    errors = _ERRORS


class Summary(amp.Command):
    """Counts of pending recipients by destination domain and age (like Postfix's qshape)."""

    arguments: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    response = [(b"summary", JSONValue())]


class Flush(amp.Command):
    arguments = [(b"queue_id", amp.Unicode(optional=True))]
    response = [(b"count", amp.Integer())]
    errors = {**_ERRORS, MessageHeld: b"MESSAGE_HELD"}


class Delete(amp.Command):
    arguments = [(b"queue_id", amp.Unicode())]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    errors = _ERRORS


class Hold(amp.Command):
    arguments = [(b"queue_id", amp.Unicode())]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    errors = _ERRORS


class Release(amp.Command):
    arguments = [(b"queue_id", amp.Unicode())]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    errors = _ERRORS


class Metrics(amp.Command):
    """The instance's Prometheus figures in the text exposition format (a supervisor merges its
    workers')."""

    arguments: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    response = [(b"text", JSONValue())]
