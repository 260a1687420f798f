"""A worker's log events, carried to its supervisor as JSON lines and logged there with ``worker``.

The worker writes each event on its stdout (a pipe to the supervisor) as one JSON line; the
supervisor turns the line back into an event with the same time, level, namespace and fields
plus ``worker`` (its number), so the one log of the instance (text or ``--log-format json``,
rotated by twistd) says which worker did what: ``[worker 1] 01J...: delivered to ...``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

from mailrelay._log import _plain

_SKIP = frozenset({"format", "message", "isError", "why", "failure", "time", "text", "worker"})


def encode_event(event: dict[str, Any]) -> bytes:
    """One event as one JSON line: time, level, namespace, formatted text, plain fields."""
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}\n{failure.getTraceback()}"
    level = event.get("log_level")
    fields = {k: _plain(v) for k, v in event.items() if not k.startswith("log_") and k not in _SKIP}
    record = {"t": event.get("log_time", 0.0), "l": getattr(level, "name", "info"),
              "n": event.get("log_namespace", ""), "text": text, "f": fields}
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str).encode() + b"\n"


def decode_line(line: bytes, worker: int) -> dict[str, Any]:
    """The event a worker's line stands for, marked with ``worker``; a line that is not ours is text."""
    try:
        record = json.loads(line)
        if not isinstance(record, dict):
            raise ValueError(line)
    except ValueError:
        record = {"l": "info", "n": "mailrelay.workers", "text": line.decode("utf-8", "replace"), "f": {}}
    try:
        level = LogLevel.lookupByName(record.get("l", "info"))
    except ValueError:
        level = LogLevel.info
    event: dict[str, Any] = {k: v for k, v in (record.get("f") or {}).items()
                             if isinstance(k, str) and not k.startswith("log_")}
    event.update(log_format="[worker {worker}] {text}", log_level=level,
                 log_namespace=record.get("n") or "mailrelay.workers", text=str(record.get("text", "")),
                 worker=worker)
    if isinstance(record.get("t"), (int, float)):  # noqa: UP038 - a tuple: no Union built per line
        event["log_time"] = float(record["t"])
    return event


@implementer(ILogObserver)
class LineWriter:
    """The worker's log observer: each event to file descriptor ``fd`` as one JSON line, blocking.

    Blocking on purpose: a supervisor slow to read holds the worker back instead of losing lines;
    a supervisor gone (EPIPE) loses them, and the worker stops anyway (it watches its stdin).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            data = encode_event(event)
        except Exception as e:  # never lose the line because one field would not serialise
            data = json.dumps({"l": "error", "text": f"unloggable event: {e!r}"}).encode() + b"\n"
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError:
            pass


class LineSplitter:
    """Splits a pipe's chunks into lines (the last, unfinished one kept for the next chunk)."""

    def __init__(self, limit: int = 1 << 20) -> None:
        self.buffer = b""
        self.limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        if len(self.buffer) > self.limit:  # a runaway line: pass it on in pieces
            lines.append(self.buffer)
            self.buffer = b""
        return [ln for ln in lines if ln.strip()]

    def flush(self) -> list[bytes]:
        rest, self.buffer = self.buffer, b""
        return [rest] if rest.strip() else []
