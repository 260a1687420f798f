"""The log observers in memory: text and JSON lines, secrets hidden, lines of one reactor turn
written together. (Logs of a real relay: tests/integration/service/test_logging_relay.py.)"""

from __future__ import annotations

import json

from twisted.internet import task
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from mailrelay._log import TextLineObserver, TurnStream, event_as_json


def test_event_as_json_hides_secret_fields_and_keeps_tracebacks():
    try:
        raise ValueError("boom")
    except ValueError:
        failure = Failure()
    event = {
        "log_format": "bind as {user} failed",
        "log_level": LogLevel.error,
        "log_namespace": "t",
        "log_time": 0.0,
        "user": "cn=x",
        "bind_password": "hunter2",
        "log_failure": failure,
        "peer": object(),
    }
    record = json.loads(event_as_json(event))
    assert record["text"] == "bind as cn=x failed" and record["level"] == "error"
    assert record["bind_password"] == "***" and "hunter2" not in json.dumps(record)
    assert "ValueError: boom" in record["traceback"]
    assert record["time"] == "1970-01-01T00:00:00.000Z"
    assert record["peer"].startswith("<object")


class _Shape:
    b = 1


def _events() -> list[dict]:
    now = 1764651600.25
    failure = Failure(ZeroDivisionError("division by zero"))
    return [
        dict(
            log_format="{queue_id}: size={size:d} x={x!r}",
            queue_id="01ABC",
            size=12,
            x="q",
            log_time=now,
            log_level=LogLevel.info,
            log_namespace="mailrelay.smtp.session",
        ),
        dict(
            log_format="{a.b} {c()}",
            a=_Shape(),
            c=lambda: 3,
            log_time=now,
            log_level=LogLevel.warn,
            log_namespace="n",
        ),
        dict(log_format="missing {nope}", log_time=now, log_level=LogLevel.info, log_namespace="n"),
        dict(
            log_format="two\nlines {x}",
            x="y",
            log_time=now + 1,
            log_level=LogLevel.error,
            log_namespace="n",
        ),
        dict(log_format=None, log_time=now),
        dict(log_format="from {system}", system="legacy", log_system="custom", log_time=now),
        dict(log_format="{x}", x=1, log_time=now),
        dict(log_format="{x}", x=1),
        dict(
            log_format="boom {x}",
            x=1,
            log_failure=failure,
            log_time=now,
            log_level=LogLevel.critical,
            log_namespace="n",
        ),
    ]


def test_text_observer_writes_what_twistds_text_observer_writes():
    import io

    from twisted.logger import formatEventAsClassicLogText

    for event in _events():
        out = io.StringIO()
        TextLineObserver(out)(event)
        assert out.getvalue() == (formatEventAsClassicLogText(event) or ""), event


def test_text_observer_renders_plain_formats_without_twisted_loggers_parser(monkeypatch):
    import io

    import mailrelay._log as log_module

    def parse_nothing(event):
        raise AssertionError("string.Formatter parse on the hot path")

    monkeypatch.setattr(log_module, "_twisted_format_event", parse_nothing)
    out = io.StringIO()
    log_module.TextLineObserver(out)(_events()[0])
    assert out.getvalue().endswith(" [mailrelay.smtp.session#info] 01ABC: size=12 x='q'\n")


class _Reactor(task.Clock):
    """A clock that says it runs, and keeps its shutdown triggers."""

    running = True

    def __init__(self) -> None:
        super().__init__()
        self.triggers: list = []

    def addSystemEventTrigger(self, phase, event, f):  # noqa: N802 - IReactorCore's name
        self.triggers.append((phase, event, f))


class _Out:
    def __init__(self) -> None:
        self.writes: list = []

    def write(self, data) -> None:  # noqa: ANN001
        self.writes.append(data)

    def flush(self) -> None:
        pass


def test_the_lines_of_one_turn_of_the_reactor_go_out_together_in_order_at_its_end():
    reactor, out = _Reactor(), _Out()
    stream = TurnStream(out, reactor, on_reactor_thread=lambda: True)
    observer = TextLineObserver(stream)  # writes, then flushes, each line
    for n in range(3):
        observer({"log_format": "line {n}", "n": n, "log_time": 1.0, "log_namespace": "t"})
    assert out.writes == []
    reactor.advance(0)  # the next turn
    assert len(out.writes) == 1
    assert [line.split("] ")[1] for line in out.writes[0].splitlines()] == [
        "line 0",
        "line 1",
        "line 2",
    ]
    stream.write("later\n")
    reactor.advance(0)
    assert out.writes[1:] == ["later\n"]


def test_a_line_from_another_thread_or_a_stopped_reactor_goes_out_at_once_after_those_waiting():
    reactor, out = _Reactor(), _Out()
    here = [True]
    stream = TurnStream(out, reactor, on_reactor_thread=lambda: here[0])
    stream.write("from the reactor\n")
    here[0] = False
    stream.write("from a thread\n")
    stream.flush()
    assert out.writes == ["from the reactor\nfrom a thread\n"]
    reactor.advance(0)  # nothing left for the turn's end
    assert len(out.writes) == 1
    reactor.running = False
    stream.write(b"stopped\n")  # bytes too (a worker's FdStream)
    stream.flush()
    assert out.writes[1:] == [b"stopped\n"]


def test_what_waits_at_shutdown_is_written_by_the_after_shutdown_trigger():
    reactor, out = _Reactor(), _Out()
    stream = TurnStream(out, reactor, on_reactor_thread=lambda: True)
    stream.write("last words\n")
    [(phase, event, drain)] = reactor.triggers
    assert (phase, event) == ("after", "shutdown")
    drain()
    assert out.writes == ["last words\n"]


def test_text_and_json_observers_leave_out_only_the_dns_port_lines():
    """The two lines a DNS query's UDP port writes whatever its protocol says are left out; a
    listener's own port lines stay."""
    import io

    from twisted.python import log as legacy

    from mailrelay._log import JSONLineObserver

    for make in (TextLineObserver, JSONLineObserver):
        out = io.StringIO()
        observer = make(out)
        events: list[dict] = []
        legacy.theLogPublisher.addObserver(events.append)
        try:
            for text in (
                "_QuietDNSDatagramProtocol starting on 61772",
                "(UDP Port 61772 Closed)",
                "SMTPServerFactory starting on 2525",
                "(TCP Port 2525 Closed)",
            ):
                legacy.msg(text)
        finally:
            legacy.theLogPublisher.removeObserver(events.append)
        for event in events:
            observer(event)
        written = out.getvalue()
        assert "UDP Port" not in written and "Datagram" not in written, make
        assert (
            "SMTPServerFactory starting on 2525" in written and "(TCP Port 2525 Closed)" in written
        ), make
