"""A worker's log events, carried to its supervisor and into the one log of the instance.

Every line says which worker wrote it: ``[worker 1]`` before its text, a ``worker`` field in
JSON. Usually the worker formats its lines itself, exactly as the instance's log wants them
(text or ``--log-format json``), and writes them on its stdout, a pipe the supervisor copies into
its log file as they are (a few bytes copied per line, not an event re-formatted in the
supervisor). When the supervisor's log is not a stream it can copy into (``--syslog``), the
worker sends one JSON record per event instead and the supervisor logs it as an event with the
same time, level, namespace and fields.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.logger import ILogObserver, LogLevel
from zope.interface import implementer

from mailrelay._log import _plain, formatEvent, is_chatter

_SKIP = frozenset({"format", "message", "isError", "why", "failure", "time", "text", "worker"})


def _text(event: dict[str, Any]) -> str:
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}\n{failure.getTraceback()}"
    return text


def _fields(event: dict[str, Any]) -> dict[str, Any]:
    return {k: _plain(v) for k, v in event.items() if not k.startswith("log_") and k not in _SKIP}


def marked(event: dict[str, Any], worker: int) -> dict[str, Any]:
    """``event`` as the instance's log shows it: text after ``[worker k]``, a ``worker`` field."""
    return _event(
        event.get("log_time"),
        event.get("log_level") or LogLevel.info,
        event.get("log_namespace") or "mailrelay.workers",
        _text(event),
        _fields(event),
        worker,
    )


def _event(
    when: Any, level: LogLevel, namespace: str, text: str, fields: dict[str, Any], worker: int
) -> dict[str, Any]:
    event: dict[str, Any] = {
        k: v for k, v in fields.items() if isinstance(k, str) and not k.startswith("log_")
    }
    event.update(
        log_format="[worker {worker}] {text}",
        log_level=level,
        log_namespace=namespace,
        text=text,
        worker=worker,
    )
    if isinstance(when, (int, float)):  # noqa: UP038 - a tuple: no Union built per line
        event["log_time"] = float(when)
    return event


def encode_event(event: dict[str, Any]) -> bytes:
    """One event as one JSON line for the supervisor: time, level, namespace, text, plain fields."""
    level = event.get("log_level")
    record = {
        "t": event.get("log_time", 0.0),
        "l": getattr(level, "name", "info"),
        "n": event.get("log_namespace", ""),
        "text": _text(event),
        "f": _fields(event),
    }
    return (
        json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str).encode() + b"\n"
    )


def decode_line(line: bytes, worker: int) -> dict[str, Any]:
    """The event a worker's line stands for, marked with ``worker``; a line not ours is text."""
    try:
        record = json.loads(line)
        if not isinstance(record, dict):
            raise ValueError(line)
    except ValueError:
        record = {
            "l": "info",
            "n": "mailrelay.workers",
            "text": line.decode("utf-8", "replace"),
            "f": {},
        }
    try:
        level = LogLevel.lookupByName(record.get("l", "info"))
    except ValueError:
        level = LogLevel.info
    return _event(
        record.get("t"),
        level,
        record.get("n") or "mailrelay.workers",
        str(record.get("text", "")),
        record.get("f") or {},
        worker,
    )


class FdStream:
    """A text stream on a file descriptor, each ``write`` one blocking ``os.write`` loop.

    Blocking on purpose: a supervisor slow to read holds the worker back instead of losing lines;
    a supervisor gone (EPIPE) loses them, and the worker stops anyway (it watches its stdin).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, text: str | bytes) -> None:
        view = memoryview(text.encode() if isinstance(text, str) else text)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError:
            pass

    def flush(self) -> None:
        pass


def worker_observer(fd: int, worker: int, form: str, reactor: Any = None) -> Any:
    """The worker's log observer, writing to ``fd`` (its stdout, read by the supervisor).

    ``form`` is what the supervisor asked for: ``"text"`` or ``"json"``, finished lines of the
    instance's log (marked with the worker) that it writes out as they are, or ``"event"``, one
    JSON record per event that it turns back into an event for its own observers (``--syslog``).
    With ``reactor``, the lines of one turn of it go out together (``TurnStream``): one write,
    and one wake-up of the supervisor, for them all.
    """
    from mailrelay._log import JSONLineObserver, TextLineObserver, TurnStream

    stream: Any = FdStream(fd) if reactor is None else TurnStream(FdStream(fd), reactor)
    if form == "event":
        return LineWriter(stream)
    out = JSONLineObserver(stream) if form == "json" else TextLineObserver(stream)

    def observe(event: dict[str, Any]) -> None:
        out(marked(event, worker))

    return observe


@implementer(ILogObserver)
class LineWriter:
    """Each event to ``stream`` (an ``FdStream``) as a JSON line (``encode_event``)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        if is_chatter(event):
            return
        try:
            data = encode_event(event)
        except Exception as e:  # never lose the line because one field would not serialise
            data = json.dumps({"l": "error", "text": f"unloggable event: {e!r}"}).encode() + b"\n"
        self.stream.write(data)
        self.stream.flush()


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
