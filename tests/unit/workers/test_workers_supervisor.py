"""The supervisor's logic in memory: processes are fakes, time is a ``task.Clock``."""

from __future__ import annotations

import json
import signal
from typing import Any

import attrs
import pytest
from twisted.internet import task
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from mailrelay import config
from mailrelay.workers.logs import LineSplitter, decode_line, encode_event
from mailrelay.workers.supervisor import (
    LOUD_AFTER,
    MIN_UPTIME,
    STOP_MARGIN,
    Supervisor,
    restart_delay,
)


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []

    def signalProcess(self, signum: int) -> None:
        self.signals.append(signum)


class Harness:
    def __init__(self, tmp_path: Any, workers: int = 2, metrics: bool = False) -> None:
        text = (
            f"[server]\nworkers = {workers}\nlisten = "
            f'["tcp:0:interface=127.0.0.1"]\nshutdown_timeout = "5s"\n[spool]\npath = '
            f'"{tmp_path}/spool"\n'
        )
        self.cfg = config.loads(text, "test.toml")
        self.clock = task.Clock()
        self.spawned: list[tuple[Any, FakeProcess]] = []
        self.events: list[dict[str, Any]] = []
        self.sup = Supervisor(
            self.cfg,
            str(tmp_path / "test.toml"),
            self.clock,
            spawn=self.spawn,
            publish=self.events.append,
        )

    def spawn(self, proto: Any, worker: Any) -> FakeProcess:
        proc = FakeProcess(1000 + len(self.spawned))
        self.spawned.append((proto, proc))
        return proc

    def end(self, n: int, reason: Failure) -> None:
        self.spawned[n][0].processEnded(reason)

    def running(self) -> list[int | None]:
        return [w.pid if w.process is not None else None for w in self.sup.workers]


def killed() -> Failure:
    return Failure(ProcessTerminated(signal=signal.SIGKILL))


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    harness.sup.startService()
    yield harness
    for _, _, sock in harness.sup.sockets:
        sock.close()


def test_starts_one_process_per_worker_sharing_every_listener(h):
    assert h.running() == [1000, 1001]
    spec = h.sup.worker_spec(h.sup.workers[1])
    assert spec["index"] == 1 and spec["workers"] == 2
    [listener] = spec["listeners"]
    assert listener["fd"] == 3 and listener["kind"] == "smtp"
    bound = h.sup.sockets[0][2]
    assert bound.getsockname()[0] == "127.0.0.1" and bound.getsockname()[1] > 0  # bound once, here
    assert json.loads(json.dumps(spec)) == spec  # passed on the command line


def test_a_worker_that_dies_after_a_healthy_run_is_restarted_at_once(h):
    h.clock.advance(MIN_UPTIME + 5)
    h.end(1, killed())
    assert h.running() == [1000, None]
    h.clock.advance(0)
    assert h.running() == [1000, 1002]
    assert h.sup.metrics.restarts._value.get() == 1


def test_a_worker_dying_young_is_restarted_with_growing_delays_and_logged_loudly(h, caplog_events):
    delays = []
    for i in range(5):
        h.end(len(h.spawned) - 1 if i else 1, killed())
        before = len(h.spawned)
        waited = 0.0
        while len(h.spawned) == before:
            h.clock.advance(0.25)
            waited += 0.25
        delays.append(waited)
    assert delays == sorted(delays) and delays[-1] > delays[0]
    assert [restart_delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 8.0]
    critical = [e for e in caplog_events if e.get("log_level") == LogLevel.critical]
    assert len(critical) == 5 - LOUD_AFTER + 1
    assert "keeps dying" in critical[0]["log_format"]


def test_a_healthy_run_resets_the_backoff(h):
    h.end(1, killed())  # young: the next start waits
    assert h.sup.workers[1].quick_deaths == 1
    h.clock.advance(restart_delay(1))
    for _ in range(3):
        h.clock.advance(MIN_UPTIME + 1)
        h.end(len(h.spawned) - 1, killed())
        assert h.sup.workers[1].quick_deaths == 0  # it had lived: restarted at once
        h.clock.advance(0)
        assert h.running()[1] == h.spawned[-1][1].pid


def test_sighup_is_passed_on_to_every_worker(h):
    restart = h.sup.reconfigure(attrs.evolve(h.cfg, server=attrs.evolve(h.cfg.server, workers=3)))
    assert [p.signals for _, p in h.spawned] == [[signal.SIGHUP], [signal.SIGHUP]]
    assert restart.result == ["server.workers"]
    assert len(h.sup.workers) == 2  # until a restart


def test_sigterm_stops_the_workers_and_waits_for_them(h):
    d = h.sup.stopService()
    assert [p.signals for _, p in h.spawned] == [[signal.SIGTERM], [signal.SIGTERM]]
    assert h.sup.sockets == []  # our copies closed at once
    h.end(0, Failure(ProcessDone(0)))
    assert not d.called
    h.end(1, Failure(ProcessDone(0)))
    assert d.called
    h.clock.advance(3600)
    assert h.running() == [None, None]  # nobody restarted while stopping
    assert [p.signals for _, p in h.spawned] == [[signal.SIGTERM], [signal.SIGTERM]]


def test_workers_still_running_after_the_timeout_are_killed(h):
    d = h.sup.stopService()
    h.end(0, Failure(ProcessDone(0)))
    h.clock.advance(5 + STOP_MARGIN - 0.1)
    assert h.spawned[1][1].signals == [signal.SIGTERM]
    h.clock.advance(0.2)
    assert h.spawned[1][1].signals == [signal.SIGTERM, signal.SIGKILL]
    h.end(1, killed())
    assert d.called


def test_a_pending_restart_is_cancelled_by_stopping(h):
    h.end(1, killed())  # died young: restart in 0.5s
    h.sup.stopService()
    h.end(0, Failure(ProcessDone(0)))
    h.clock.advance(60)
    assert len(h.spawned) == 2


def test_worker_log_lines_become_events_marked_with_the_worker(h):
    event = {
        "log_format": "{queue_id}: delivered to {rcpt}",
        "queue_id": "01ABC",
        "rcpt": "r@example.test",
        "log_level": LogLevel.warn,
        "log_namespace": "mailrelay.queue",
        "log_time": 1234.5,
    }
    line = encode_event(event)
    proto = h.spawned[1][0]
    proto.childDataReceived(1, line[:10])
    assert h.events == []  # half a line: wait for the rest
    proto.childDataReceived(1, line[10:] + b"not json\n")
    first, second = h.events
    assert (
        first["worker"] == 1
        and first["queue_id"] == "01ABC"
        and first["log_level"] == LogLevel.warn
    )
    assert first["log_namespace"] == "mailrelay.queue" and first["log_time"] == 1234.5
    from twisted.logger import formatEvent

    assert formatEvent(first) == "[worker 1] 01ABC: delivered to r@example.test"
    assert formatEvent(second) == "[worker 1] not json"


def test_line_splitter_keeps_the_unfinished_line():
    s = LineSplitter()
    assert s.feed(b"a\nb") == [b"a"]
    assert s.feed(b"c\n\n") == [b"bc"]
    assert s.flush() == []
    assert decode_line(b'{"l":"nonsense","text":"x"}', 3)["log_level"] == LogLevel.info


@pytest.fixture
def caplog_events():
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def test_worker_events_in_the_json_log_keep_their_fields_and_the_worker():
    from mailrelay._log import event_as_json

    line = encode_event(
        {
            "log_format": "{queue_id}: queued",
            "queue_id": "01ABC",
            "log_level": LogLevel.info,
            "log_namespace": "mailrelay.smtp.session",
            "log_time": 0.0,
        }
    )
    record = json.loads(event_as_json(decode_line(line, 2)))
    assert record["worker"] == 2 and record["queue_id"] == "01ABC"
    assert (
        record["text"] == "[worker 2] 01ABC: queued"
        and record["namespace"] == "mailrelay.smtp.session"
    )


def test_merged_summaries_add_up_by_domain_and_age():
    from mailrelay.control.info import summary
    from mailrelay.control.sources import merge_summaries

    now = 10_000.0

    def info(domain: str, age_min: float, held: bool = False) -> dict[str, Any]:
        return {
            "arrival": now - age_min * 60,
            "held": held,
            "recipients": [{"address": f"r@{domain}", "state": "pending"}],
        }

    a = [info("a.test", 1), info("b.test", 30, held=True)]
    b = [info("a.test", 100), info("c.test", 1)]
    merged = merge_summaries([summary(a, now), summary(b, now)])
    assert merged == summary(a + b, now)
