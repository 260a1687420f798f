"""Log output for machines: one JSON object per line, built from twisted.logger events.

Each line has ``time`` (ISO 8601, UTC), ``level``, ``namespace``, ``text`` (the formatted message
as the text log shows it) and the event's own fields (``queue_id``, ``rcpt``, ``ip``, ...), so a
log shipper can index them without parsing the text. Fields whose name says they hold a secret are
replaced by ``"***"``.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import IO, Any

from twisted.logger import ILogObserver, formatEvent
from zope.interface import implementer

_SECRET = re.compile(r"pass|secret|credential|token", re.I)
_SKIP = frozenset({"format", "message", "isError", "why", "failure", "time"})


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
