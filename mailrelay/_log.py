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
from typing import IO, Any

from twisted.logger import ILogObserver, formatEventAsClassicLogText, formatTime
from twisted.logger import formatEvent as _twisted_format_event
from zope.interface import implementer

_SECRET = re.compile(r"pass|secret|credential|token", re.I)
_SKIP = frozenset({"format", "message", "isError", "why", "failure", "time"})


_SIMPLE: dict[str, bool] = {}  # log format -> whether str.format_map renders it as twisted.logger does
_PARSER = string.Formatter()


def _simple(fmt: str) -> bool:
    simple = _SIMPLE.get(fmt)
    if simple is None:
        try:
            simple = all(name is None or (name.isidentifier() and "{" not in (spec or ""))
                         for _, name, spec, _ in _PARSER.parse(fmt))
        except ValueError:
            simple = False
        if len(_SIMPLE) < 10_000:  # formats are few; never grow without bound on odd callers
            _SIMPLE[fmt] = simple
    return simple


def formatEvent(event: dict[str, Any]) -> str:  # noqa: N802 - twisted.logger's name, same contract
    """``twisted.logger.formatEvent``, without its per-event parse when the format is plain names."""
    fmt = event.get("log_format")
    if type(fmt) is str and "log_flattened" not in event and _simple(fmt):
        try:
            return fmt.format_map(event)
        except Exception:
            pass  # a missing field, a failing __format__: twisted.logger says so its own way
    return _twisted_format_event(event)


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
    """Writes each event to ``stream`` as a JSON line, flushed at once (for ``tail -f``/shippers)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            line = event_as_json(event)
        except Exception as e:  # never lose the line because one field would not serialise
            line = json.dumps({"level": "error", "text": f"unloggable event: {e!r}"})
        self.stream.write(line + "\n")
        self.stream.flush()
