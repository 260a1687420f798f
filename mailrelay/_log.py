"""Log observers: twistd's classic text lines, and one JSON object per line for machines.

``TextLineObserver`` writes exactly what twistd's own text observer writes
(``2026-12-02T05:07:06+0000 [namespace#level] text``) at a fraction of the cost: a log format
whose fields are plain names is rendered by ``str.format_map`` (twisted.logger parses it with
``string.Formatter`` on every event, ~50 µs; three lines per relayed message), and the time stamp
is made once per second. Any other event (a failure, a call or attribute in the format, a missing
field) goes through twisted.logger's own formatting, so the text is the same either way.

Each JSON line has ``time`` (ISO 8601, UTC), ``level``, ``namespace``, ``text`` (the formatted
message as the text log shows it) and the event's own fields (``queue_id``, ``rcpt``, ``ip``, ...),
so a log shipper can index them without parsing the text. Fields whose name says they hold a
secret are replaced by ``"***"``.
"""

from __future__ import annotations

import datetime
import json
import re
import string
import threading
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import ILogObserver, formatEventAsClassicLogText, formatTime
from twisted.logger import formatEvent as _twisted_format_event
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

_SECRET = re.compile(r"pass|secret|credential|token", re.I)
_PORT_CHATTER = re.compile(
    r"\w*DNSDatagramProtocol starting on \d+|\(UDP Port \d+ Closed\)"
    r"|(?:Starting|Stopping) protocol "
    r"<twisted\.names\.dns\.DNSDatagramProtocol object at 0x[0-9a-f]+>",
    re.ASCII,
)
_SKIP = frozenset({"format", "message", "isError", "why", "failure", "time"})


_SIMPLE: dict[
    str, bool
] = {}  # log format -> whether str.format_map renders it as twisted.logger does
_PARSER = string.Formatter()


def _simple(fmt: str) -> bool:
    simple = _SIMPLE.get(fmt)
    if simple is None:
        try:
            simple = all(
                name is None or (name.isidentifier() and "{" not in (spec or ""))
                for _, name, spec, _ in _PARSER.parse(fmt)
            )
        except ValueError:
            simple = False
        if len(_SIMPLE) < 10_000:  # formats are few; never grow without bound on odd callers
            _SIMPLE[fmt] = simple
    return simple


def formatEvent(event: dict[str, Any]) -> str:  # noqa: N802 - twisted.logger's name, same contract
    """``twisted.logger.formatEvent``, minus its per-event parse when the format has plain names."""
    fmt = event.get("log_format")
    if type(fmt) is str and "log_flattened" not in event and _simple(fmt):
        try:
            return fmt.format_map(event)
        except Exception:
            pass  # a missing field, a failing __format__: twisted.logger says so its own way
    return _twisted_format_event(event)


def plural(n: int, word: str) -> str:
    """``plural(1, "message")`` → ``"1 message"``, ``plural(2, "message")`` → ``"2 messages"``: the
    counts in log lines and the CLI's output agree with their nouns."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def is_chatter(event: dict[str, Any]) -> bool:
    """Whether ``event`` is Twisted's chatter that the relay's own lines make redundant: the DNS
    query's UDP port and protocol (``Starting protocol <...DNSDatagramProtocol ...>``,
    ``DNSDatagramProtocol starting on N``, ``(UDP Port N Closed)``; see ``mailrelay._quiet``) and
    AMP's "connection established/lost" pair for each ``mailrelay queue`` command on the control
    socket.

    Twisted writes the DNS lines through its legacy ``log.msg``; the relay has no other UDP port,
    so ``(UDP Port N Closed)`` is always a finished DNS query.
    """
    namespace = event.get("log_namespace")
    if namespace == "twisted.protocols.amp":
        return event.get("cls") == "ControlProtocol"
    if namespace != "log_legacy":
        return False
    text = event.get("log_text")
    return isinstance(text, str) and _PORT_CHATTER.fullmatch(text) is not None


@implementer(ILogObserver)
class TextLineObserver:
    """twistd's text log (``textFileLogObserver``): one line per event, flushed at once."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._second: int | None = None
        self._stamp = ""

    def _line(self, event: dict[str, Any]) -> str | None:
        when = event.get("log_time")
        if "log_failure" in event or "log_system" in event or type(when) is not float:
            return formatEventAsClassicLogText(event)
        text = formatEvent(event)
        if not text:
            return None
        second = int(when)
        if second != self._second:
            self._second, self._stamp = second, formatTime(when)
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
        if "\n" in text:
            text = text.replace("\n", "\n\t")
        return f"{self._stamp} [{system}] {text}\n"

    def __call__(self, event: dict[str, Any]) -> None:
        if is_chatter(event):
            return
        try:
            line = self._line(event)
        except Exception:  # an odd event (a level that is not a LogLevel): twisted's own way
            line = formatEventAsClassicLogText(event)
        if line is None:
            return
        self.stream.write(line)
        self.stream.flush()


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def event_as_json(event: dict[str, Any]) -> str:
    """One event as one line of JSON (no newline)."""
    when = datetime.datetime.fromtimestamp(event.get("log_time", 0.0), datetime.UTC)
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "text": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _SKIP or key in record:
            continue
        record[key] = "***" if _SECRET.search(key) else _plain(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


@implementer(ILogObserver)
class JSONLineObserver:
    """Writes each event to ``stream`` as a JSON line, flushed at once (``tail -f``, shippers)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        if is_chatter(event):
            return
        try:
            line = event_as_json(event)
        except Exception as e:  # never lose the line because one field would not serialise
            line = json.dumps({"level": "error", "text": f"unloggable event: {e!r}"})
        self.stream.write(line + "\n")
        self.stream.flush()


class TurnStream:
    """A log stream that writes the lines of one turn of the reactor together, at its end.

    A relayed message logs three lines, each written and flushed on its own: three ``write``
    system calls, and with ``[server] workers`` three wake-ups of the supervisor that copies
    them. Lines written on the reactor thread while it runs are gathered and written in one go
    by a call at the start of its next turn (before it waits for events again), so a line still
    leaves within the turn that made it; a line from another thread, or while the reactor is not
    running, is written at once, with whatever waits before it. Only a process killed outright
    (SIGKILL) can lose lines, those of its last turn.
    """

    def __init__(
        self, stream: Any, reactor: Any, on_reactor_thread: Callable[[], bool] = isInIOThread
    ) -> None:
        self.stream = stream
        self.reactor = reactor
        self.on_reactor_thread = on_reactor_thread
        self._lines: list[Any] = []
        self._lock = threading.Lock()
        self._call: Any = None
        reactor.addSystemEventTrigger("after", "shutdown", self.drain)

    def _later(self) -> bool:
        return bool(self.reactor.running) and self.on_reactor_thread()

    def write(self, text: str | bytes) -> None:
        with self._lock:
            self._lines.append(text)
            if self._call is not None or not self._later():
                return
            self._call = self.reactor.callLater(0, self.drain)

    def flush(self) -> None:
        """Out by the end of this turn of the reactor; at once off it, or when it is not running."""
        if not self._later():
            self.drain()

    def drain(self) -> None:
        """Write out every line gathered so far."""
        with self._lock:  # held while writing: lines leave in the order they came
            call, self._call = self._call, None
            if call is not None and call.active():
                call.cancel()
            lines, self._lines = self._lines, []
            if lines:
                self.stream.write(lines[0][:0].join(lines))  # str lines, or bytes (FdStream)
                self.stream.flush()
