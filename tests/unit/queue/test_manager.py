"""The queue manager on a task.Clock with the public fakes: whole retry schedules in zero time."""

from __future__ import annotations

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer

from mailrelay.config import QueueConfig
from mailrelay.envelope import (
    Envelope,
    QueuedMessage,
    Recipient,
    RecipientState,
    RecipientStatus,
    Reply,
)
from mailrelay.errors import PermanentFailure, TemporaryFailure
from mailrelay.interfaces import ILeasingStore
from mailrelay.observer import RelayObserver
from mailrelay.queue.manager import QueueManager
from mailrelay.testing import FakeRouter, MemoryQueueStore, RecordingDeliverer, route_to

T0 = 1_700_000_000.0
OK = Reply(250, "2.0.0", "Ok: queued")
LATER = Reply(451, "4.4.1", "try again later")
NOUSER = Reply(550, "5.1.1", "no such user")
SCHEDULE = (60.0, 300.0, 900.0)


def envelope(*rcpts: str, sender: str = "sender@example.org") -> Envelope:
    return Envelope(sender, tuple(Recipient(r) for r in rcpts), received_at=T0)


class World:
    def __init__(self, router=None, deliverer=None, config=None, **kw) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = MemoryQueueStore(self.clock)
        self.router = router or FakeRouter({"*": route_to("127.0.0.1", 2526)})
        self.deliverer = deliverer or RecordingDeliverer()
        self.config = config or QueueConfig(retry_schedule=SCHEDULE, max_lifetime=86400.0)
        self.manager = QueueManager(
            self.store,
            self.router,
            self.deliverer,
            self.clock,
            self.config,
            "relay.example.test",
            jitter=lambda d: d,
            **kw,
        )

    def send(self, *rcpts: str, body: bytes = b"Subject: t\r\n\r\nhi\r\n") -> str:
        return self.store.inject(envelope(*rcpts), body)

    def state(self, qid: str) -> QueuedMessage:
        return self.store.messages[qid]


def capped(
    per_destination: int, router: FakeRouter | None = None
) -> tuple[World, RecordingDeliverer]:
    """A started World whose deliveries hang until the test answers them, at most
    ``per_destination`` in flight to a destination (and as many more waiting for a slot)."""
    deliverer = RecordingDeliverer(default=None)
    w = World(
        router=router,
        deliverer=deliverer,
        config=QueueConfig(
            retry_schedule=SCHEDULE, max_deliveries=10, max_per_destination=per_destination
        ),
    )
    w.manager.start()
    return w, deliverer


def waiting_for_slow(per_destination: int, n: int) -> tuple[World, FakeRouter, int]:
    """``capped`` with ``n`` messages sent to one destination and looked at once: the World,
    its router, and how many routing questions that took."""
    router = FakeRouter({"slow.test": route_to("127.0.0.1", 1)})
    w, _ = capped(per_destination, router)
    for i in range(n):
        w.send(f"u{i}@slow.test")
    w.clock.advance(0)
    return w, router, len(router.calls)


def test_committed_message_is_delivered_at_once_and_removed():
    w = World()
    w.manager.start()
    qid = w.send("a@example.test", "b@example.test")
    w.clock.advance(0)
    assert [c.addresses for c in w.deliverer.calls] == [["a@example.test", "b@example.test"]]
    assert w.deliverer.calls[0].body == b"Subject: t\r\n\r\nhi\r\n"
    assert w.deliverer.calls[0].route.hops[0].port == 2526
    assert qid not in w.store.messages and w.store.removed == [qid]


def test_temporary_failure_is_retried_on_the_schedule_and_the_last_interval_repeats():
    w = World(deliverer=RecordingDeliverer([LATER] * 5))
    w.manager.start()
    qid = w.send("a@example.test")
    w.clock.advance(0)
    times = [T0]
    for delay in (60, 300, 900, 900, 900):
        w.clock.advance(delay - 1)
        assert len(w.deliverer.calls) == len(times), "not before its time"
        w.clock.advance(1)
        times.append(w.clock.seconds())
        assert len(w.deliverer.calls) == len(times)
    assert [t - T0 for t in times] == [0, 60, 360, 1260, 2160, 3060]
    assert qid not in w.store.messages  # the sixth attempt (default answer) delivered it
    last_save = [m for m in w.store.saves if m.queue_id == qid][-1]
    assert last_save.attempts == 5 and last_save.statuses[0].attempts == 5
    assert last_save.statuses[0].last_reply == LATER


def test_partial_delivery_retries_only_the_recipients_left():
    deliverer = RecordingDeliverer([{"b@example.test": LATER}, OK])
    w = World(deliverer=deliverer)
    w.manager.start()
    qid = w.send("a@example.test", "b@example.test", "c@example.test")
    w.clock.advance(0)
    m = w.state(qid)
    assert [s.state for s in m.statuses] == [
        RecipientState.DELIVERED,
        RecipientState.PENDING,
        RecipientState.DELIVERED,
    ]
    assert m.statuses[0].remote == "127.0.0.1[127.0.0.1]:2526"
    assert m.next_attempt == T0 + 60
    w.clock.advance(60)
    assert deliverer.calls[1].addresses == ["b@example.test"]
    assert qid not in w.store.messages


def test_permanent_failure_is_final_and_not_retried():
    deliverer = RecordingDeliverer([{"b@example.test": NOUSER, "a@example.test": LATER}])
    w = World(deliverer=deliverer)
    w.manager.start()
    qid = w.send("a@example.test", "b@example.test")
    w.clock.advance(0)
    m = w.state(qid)
    assert m.statuses[1].state is RecipientState.FAILED and m.statuses[1].last_reply == NOUSER
    # the sender is told at once (the bounce is queued and delivered like any message)
    assert (
        deliverer.calls[1].addresses == ["sender@example.org"]
        and deliverer.calls[1].envelope.sender == ""
    )
    w.clock.advance(60)
    assert deliverer.calls[2].addresses == ["a@example.test"]
    assert qid not in w.store.messages
    w.clock.advance(3600)
    assert len(deliverer.calls) == 3


def test_routing_answers_become_recipient_outcomes():
    later = TemporaryFailure(Reply(451, "4.4.3", "directory unavailable"))
    router = FakeRouter(
        {
            "tmp@example.test": later,
            "gone@example.test": PermanentFailure(Reply(550, "5.1.1", "unknown user")),
            "nobody.test": None,
            "example.test": route_to("127.0.0.1", 2526),
        }
    )
    heard = []

    class Unrouted(RelayObserver):
        def recipient_unrouted(self, envelope, recipient, reply):
            if envelope.sender:  # not the bounce to sender@example.org, unroutable here too
                heard.append((recipient, reply.code))

    w = World(router=router, observer=Unrouted())
    w.manager.start()
    qid = w.send("ok@example.test", "tmp@example.test", "gone@example.test", "x@nobody.test")
    w.clock.advance(0)
    # settled by routing, with no attempt: the observer still hears of them
    assert heard == [("tmp@example.test", 451), ("gone@example.test", 550), ("x@nobody.test", 550)]
    m = w.state(qid)
    assert [s.state for s in m.statuses] == [
        RecipientState.DELIVERED,
        RecipientState.PENDING,
        RecipientState.FAILED,
        RecipientState.FAILED,
    ]
    assert m.statuses[1].last_reply == later.reply
    assert m.statuses[2].last_reply.code == 550
    assert (m.statuses[3].last_reply.code, m.statuses[3].last_reply.enhanced) == (550, "5.1.2")
    assert [c.addresses for c in w.deliverer.calls] == [["ok@example.test"]]
    router.mapping["tmp@example.test"] = route_to("127.0.0.1", 2526)
    w.clock.advance(60)
    assert w.deliverer.calls[1].addresses == ["tmp@example.test"]
    assert qid not in w.store.messages


def test_recipients_are_grouped_by_destination_and_rewritten():
    router = FakeRouter(
        {
            "one.test": route_to("127.0.0.1", 2001),
            "two.test": route_to("127.0.0.1", 2002),
            "alias@one.test": route_to("127.0.0.1", 2001, recipient="real@one.test"),
        }
    )
    w = World(router=router)
    w.manager.start()
    w.send("a@one.test", "b@two.test", "alias@one.test", "c@two.test")
    w.clock.advance(0)
    by_port = {c.route.hops[0].port: c for c in w.deliverer.calls}
    assert sorted(by_port) == [2001, 2002]
    assert by_port[2001].addresses == ["a@one.test", "real@one.test"]
    assert by_port[2001].recipients[1].orcpt == "rfc822;alias@one.test"
    assert by_port[2002].addresses == ["b@two.test", "c@two.test"]


def test_recovery_at_start_schedules_every_message_found():
    w = World()
    due = w.send("due@example.test")
    later = w.send("later@example.test")
    held = w.send("held@example.test")
    w.store.messages[later] = attrs.evolve(w.state(later), next_attempt=T0 + 500, attempts=1)
    w.store.messages[held] = attrs.evolve(w.state(held), held=True)
    d = w.manager.start()
    assert d.result == 3
    w.clock.advance(0)
    assert [c.addresses for c in w.deliverer.calls] == [["due@example.test"]]
    w.clock.advance(499)
    assert len(w.deliverer.calls) == 1
    w.clock.advance(1)
    assert [c.addresses for c in w.deliverer.calls][1] == ["later@example.test"]
    assert list(w.store.messages) == [held]
    assert due in w.store.removed


def test_start_up_burst_is_bounded():
    deliverer = RecordingDeliverer(default=None)  # every delivery hangs until the test answers it
    w = World(deliverer=deliverer, max_active=5)
    for i in range(12):
        w.send(f"r{i}@example.test")
    w.manager.start()
    w.clock.advance(0)
    assert len(deliverer.calls) == 5
    deliverer.calls[0].answer(OK)
    assert len(deliverer.calls) == 6  # one finished, one more starts
    answered = 1
    while answered < len(deliverer.calls):
        assert len(deliverer.calls) - answered <= 5
        deliverer.calls[answered].answer(OK)
        answered += 1
    assert len(deliverer.calls) == 12 and w.store.messages == {}


def test_per_destination_cap_and_a_dead_destination_does_not_stall_others():
    router = FakeRouter(
        {"dead.test": route_to("127.0.0.1", 1), "live.test": route_to("127.0.0.1", 2)}
    )
    deliverer = RecordingDeliverer(default=None)
    w = World(
        router=router,
        deliverer=deliverer,
        config=QueueConfig(retry_schedule=SCHEDULE, max_deliveries=6, max_per_destination=3),
    )
    w.manager.start()
    for i in range(10):
        w.send(f"u{i}@dead.test")
    w.clock.advance(0)
    dead_calls = [c for c in deliverer.calls if c.route.hops[0].port == 1]
    assert len(dead_calls) == 3  # its cap, the rest wait
    for i in range(3):
        w.send(f"v{i}@live.test")
    w.clock.advance(0)
    live = [c for c in deliverer.calls if c.route.hops[0].port == 2]
    assert len(live) == 3, "the live destination gets its slots while the dead one hangs"
    for c in live:
        c.answer(OK)
    assert w.manager.slots.in_flight == 3
    # the dead one finally times out: its waiting messages get their turn, three at a time
    for c in dead_calls:
        c.answer(LATER)
    assert len([c for c in deliverer.calls if c.route.hops[0].port == 1]) == 6


def test_flush_attempts_a_deferred_message_now():
    w = World(deliverer=RecordingDeliverer([LATER]))
    w.manager.start()
    qid = w.send("a@example.test")
    w.clock.advance(0)
    assert qid in w.store.messages
    flushed = []
    w.manager.flush(qid).addCallback(flushed.append)
    assert flushed == [1]
    w.clock.advance(0)
    assert qid not in w.store.messages


def test_hold_release_and_delete():
    w = World(deliverer=RecordingDeliverer(default=LATER))
    w.manager.start()
    qid = w.send("a@example.test")
    w.clock.advance(0)

    def calls() -> int:
        return sum(c.addresses == ["a@example.test"] for c in w.deliverer.calls)

    w.manager.hold(qid)
    assert w.state(qid).held
    w.clock.advance(3600)
    assert calls() == 1  # held: never attempted
    w.manager.release(qid)
    assert not w.state(qid).held
    w.clock.advance(0)
    assert calls() == 2
    w.manager.delete(qid)
    assert qid not in w.store.messages
    w.clock.advance(3600)
    assert calls() == 2  # deleted: never attempted again


def test_stop_waits_for_deliveries_then_cancels_and_records_them():
    deliverer = RecordingDeliverer([None])
    w = World(deliverer=deliverer)
    w.manager.start()
    qid = w.send("a@example.test")
    w.clock.advance(0)
    d = w.manager.stop(grace=5)
    assert not d.called
    w.clock.advance(5)
    assert d.called
    m = w.state(qid)
    assert m.statuses[0].state is RecipientState.PENDING and m.statuses[0].last_reply.code == 451
    # nothing new is picked up once stopped
    w.send("b@example.test")
    w.clock.advance(3600)
    assert len(deliverer.calls) == 1


def test_stop_lets_a_delivery_that_finishes_in_time_record_its_result():
    deliverer = RecordingDeliverer([None])
    w = World(deliverer=deliverer)
    w.manager.start()
    qid = w.send("a@example.test")
    w.clock.advance(0)
    d = w.manager.stop(grace=5)
    deliverer.calls[0].answer(OK)
    assert d.called and qid not in w.store.messages


def test_a_deliverer_that_fails_or_miscounts_is_a_temporary_failure():
    deliverer = RecordingDeliverer([RuntimeError("bug"), [OK, OK]])
    w = World(deliverer=deliverer)
    w.manager.start()
    qid = w.send("a@example.test")
    w.clock.advance(0)
    assert w.state(qid).statuses[0].last_reply.code == 451
    w.clock.advance(60)
    assert w.state(qid).statuses[0].last_reply.code == 451  # two answers for one recipient
    w.clock.advance(300)
    assert qid not in w.store.messages


def test_asynchronous_router_answers_are_awaited():
    pending: list[defer.Deferred] = []

    def slow(recipient, env):
        d = defer.Deferred()
        pending.append(d)
        return d

    w = World(router=FakeRouter({"*": slow}))
    w.manager.start()
    qid = w.send("a@example.test")
    w.clock.advance(0)
    assert w.deliverer.calls == [] and w.manager.is_active(qid)
    pending[0].callback(route_to("127.0.0.1", 2526))
    assert qid not in w.store.messages


@pytest.mark.parametrize("attempts,expected", [(1, 60.0), (2, 300.0), (3, 900.0), (9, 900.0)])
def test_saved_next_attempt_follows_the_schedule(attempts, expected):
    w = World(deliverer=RecordingDeliverer(default=LATER))
    qid = w.send("a@example.test")
    w.store.messages[qid] = attrs.evolve(
        w.state(qid),
        attempts=attempts - 1,
        statuses=(RecipientStatus(Recipient("a@example.test"), attempts=attempts - 1),),
    )
    w.manager.start()
    w.clock.advance(0)
    assert w.state(qid).next_attempt == T0 + expected


def test_one_postfix_style_log_line_per_recipient_attempt():
    from twisted.logger import capturedLogs, formatEvent

    w = World(deliverer=RecordingDeliverer([{"b@example.test": LATER}]))
    w.manager.start()
    with capturedLogs() as events:
        qid = w.send("a@example.test", "b@example.test")
        w.clock.advance(0)
    lines = [
        formatEvent(e)
        for e in events
        if e.get("log_namespace") == "mailrelay.queue" and "to=<" in formatEvent(e)
    ]
    assert len(lines) == 2
    sent, deferred = lines
    assert sent.startswith(
        f"{qid}: to=<a@example.test>, relay=127.0.0.1[127.0.0.1]:2526, delay=0.00"
    )
    assert "dsn=2.0.0, status=sent (250 2.0.0 Ok)" in sent
    assert "dsn=4.4.1, status=deferred (451 4.4.1 try again later)" in deferred


def test_messages_for_a_full_destination_wait_without_churn():
    router = FakeRouter({"dead.test": route_to("127.0.0.1", 1)})
    w, deliverer = capped(2, router)
    ids = [w.send(f"u{i}@dead.test") for i in range(20)]
    w.clock.advance(0)
    assert (
        len(deliverer.calls) == 2
        and w.manager.slots.waiting(router.mapping["dead.test"].destination) == 2
    )
    blocked = [q for q in ids if w.state(q).attempts == 0 and not w.manager.is_active(q)]
    assert len(blocked) == 16  # not attempted: no attempt counted, nothing recorded for them
    assert all(w.state(q).statuses[0].last_reply is None for q in blocked)
    assert not [m for m in w.store.saves if m.queue_id in blocked], (
        "waiting is not written to the store"
    )
    routed = len(router.calls)
    deliverer.calls[0].answer(
        LATER
    )  # one slot frees: one waiter runs, one blocked message takes its place
    assert len(deliverer.calls) == 3
    w.clock.advance(0)
    assert len(router.calls) - routed == 1, "only as many blocked messages as the line has room for"
    assert w.manager.slots.waiting(router.mapping["dead.test"].destination) == 2


def test_a_reloaded_queue_config_changes_the_caps_at_once():
    deliverer = RecordingDeliverer(default=None)
    w = World(
        deliverer=deliverer,
        config=QueueConfig(retry_schedule=SCHEDULE, max_deliveries=10, max_per_destination=1),
    )
    w.manager.start()
    ids = [w.send(f"u{i}@example.test") for i in range(3)]
    w.clock.advance(0)
    assert len(deliverer.calls) == 1  # one in flight, one waiting, one blocked
    w.manager.config = QueueConfig(retry_schedule=(5.0,), max_deliveries=10, max_per_destination=3)
    assert len(deliverer.calls) == 2  # the waiting delivery starts under the new cap at once
    deliverer.calls[0].answer(LATER)
    w.clock.advance(0)
    assert len(deliverer.calls) == 3  # the blocked one woke when a slot freed
    assert w.state(ids[0]).next_attempt == T0 + 5  # and the new schedule applies


def test_a_store_failure_under_an_attempt_is_retried_not_forgotten():
    from twisted.logger import capturedLogs

    w = World(deliverer=RecordingDeliverer([LATER]))
    real_save = w.store.save
    failures = [TemporaryFailure(Reply(452, "4.3.1", "Insufficient system storage"))]

    def save(message):
        return defer.fail(failures.pop()) if failures else real_save(message)

    w.store.save = save
    w.manager.start()
    with capturedLogs() as events:
        qid = w.send("a@example.test")
        w.clock.advance(0)
    assert any("will retry" in (e.get("log_format") or "") for e in events)
    assert len(w.deliverer.calls) == 1 and qid in w.store.messages
    w.clock.advance(60)  # the first retry interval
    assert len(w.deliverer.calls) == 2 and qid not in w.store.messages


@pytest.mark.parametrize("how", ["raises", "fails"])
def test_a_load_that_breaks_is_retried_and_a_message_deleted_meanwhile_is_left_alone(how):
    """A store's load may raise at once or fail later: either way the message is tried again on
    the schedule (not forgotten, not a crash of the pump); KeyError means deleted: nothing to do."""
    w = World()
    real_load = w.store.load
    broken = [OSError(5, "Input/output error")]

    def load(queue_id):
        if broken:
            error = broken.pop()
            if how == "raises":
                raise error
            return defer.fail(error)
        return real_load(queue_id)

    w.store.load = load
    w.manager.start()
    qid = w.send("a@example.test")
    w.clock.advance(0)
    assert w.deliverer.calls == [] and qid in w.store.messages
    w.clock.advance(60)
    assert len(w.deliverer.calls) == 1 and qid not in w.store.messages

    broken.append(KeyError("gone"))
    other = w.send("b@example.test")
    w.clock.advance(0)
    assert len(w.deliverer.calls) == 1 and other not in w.manager.scheduled()


def test_a_store_unavailable_for_now_is_one_warning_line_and_a_retry_not_a_traceback():
    """A database outage (the PostgreSQL store's TemporaryFailure) is expected operation: the
    attempt waits for the schedule and says so in one line; other store failures keep their
    traceback."""
    from twisted.logger import LogLevel, capturedLogs

    w = World()
    real_load = w.store.load
    broken = [TemporaryFailure(Reply(451, "4.3.0", "Queue database unavailable, try again later"))]
    w.store.load = lambda qid: defer.fail(broken.pop()) if broken else real_load(qid)
    w.manager.start()
    with capturedLogs() as events:
        qid = w.send("a@example.test")
        w.clock.advance(0)
    assert w.deliverer.calls == [] and qid in w.store.messages
    mine = [e for e in events if "attempt on" in e.get("log_format", "")]
    assert [(e["log_level"], "log_failure" in e) for e in mine] == [(LogLevel.warn, False)]
    w.clock.advance(60)
    assert len(w.deliverer.calls) == 1


def test_a_blocked_message_is_delivered_when_its_destination_frees_though_never_saved():
    w, deliverer = capped(1)
    ids = [w.send(f"u{i}@example.test") for i in range(4)]
    w.clock.advance(0)
    assert len(deliverer.calls) == 1  # one in flight, one waiting for the slot, two blocked
    for n in range(1, 5):
        deliverer.calls[n - 1].answer(OK)
        w.clock.advance(0)
        assert len(deliverer.calls) == min(n + 1, 4)
    assert w.store.messages == {} and sorted(w.store.removed) == sorted(ids)
    assert w.store.saves == []  # each was written once, at its commit, and removed once


def test_a_blocked_message_whose_state_changed_is_saved():
    """Waiting past the delay warning: the warning goes out and the saved state says so."""
    deliverer = RecordingDeliverer(default=None)
    w = World(
        deliverer=deliverer,
        config=QueueConfig(
            retry_schedule=SCHEDULE,
            max_lifetime=86400.0,
            delay_warning=3600.0,
            max_deliveries=10,
            max_per_destination=1,
        ),
    )
    w.clock.advance(7200)  # the messages below were received two hours ago
    w.manager.start()
    ids = [w.send(f"u{i}@example.test") for i in range(3)]
    w.clock.advance(0)
    blocked = ids[2]
    assert not w.manager.is_active(blocked) and w.state(blocked).attempts == 0
    assert w.state(blocked).warned and [m.queue_id for m in w.store.saves if m.warned] == [blocked]


def test_a_flushed_message_that_must_wait_is_saved_due_now():
    """The store says it is due later: a restart must not lose the operator's flush."""
    deliverer = RecordingDeliverer([LATER], default=None)
    w = World(
        deliverer=deliverer,
        config=QueueConfig(retry_schedule=SCHEDULE, max_deliveries=10, max_per_destination=1),
    )
    w.manager.start()
    deferred = w.send("a@example.test")
    w.clock.advance(0)
    assert w.state(deferred).next_attempt == T0 + 60  # deferred once: the store says a minute on
    busy = [
        w.send(f"u{i}@example.test") for i in range(2)
    ]  # the one slot and its one waiting place
    w.clock.advance(0)
    del w.store.saves[:]
    w.manager.flush(deferred)
    w.clock.advance(0)
    assert not w.manager.is_active(deferred) and len(deliverer.calls) == 2  # blocked behind them
    assert [m.queue_id for m in w.store.saves] == [deferred]  # its stored due time is rewritten
    assert all(w.manager.is_active(q) for q in busy)


@implementer(ILeasingStore)
class _LeasingStore(MemoryQueueStore):
    """A store shared with other nodes, as far as the queue manager can tell."""

    def claim(self, queue_id: str) -> defer.Deferred[bool]:
        return defer.succeed(queue_id in self.messages)

    def release(self, queue_id: str) -> defer.Deferred[None]:
        return defer.succeed(None)

    def make_due(self, queue_id: str | None = None) -> defer.Deferred[None]:
        return defer.succeed(None)


def test_a_blocked_message_in_a_shared_store_is_saved_for_the_other_nodes():
    deliverer = RecordingDeliverer(default=None)
    w = World(
        deliverer=deliverer,
        config=QueueConfig(retry_schedule=SCHEDULE, max_deliveries=10, max_per_destination=1),
    )
    w.store = _LeasingStore(w.clock)
    w.manager = QueueManager(
        w.store, w.router, deliverer, w.clock, w.config, "relay.example.test", jitter=lambda d: d
    )
    w.manager.start()
    ids = [w.send(f"u{i}@example.test") for i in range(3)]
    w.clock.advance(0)
    assert [m.queue_id for m in w.store.saves] == [ids[2]]
    assert w.store.saves[0].next_attempt > T0  # the others leave it alone until then


def test_a_message_due_now_leaves_the_armed_retry_timer_where_it_is():
    """A new message is taken up at the next turn by a call of its own: moving the retry timer
    sooner would cost Twisted a linear search of every timed call in the reactor, per message."""
    w = World(deliverer=RecordingDeliverer([LATER]))
    w.manager.start()
    first = w.send("a@example.test")
    w.clock.advance(0)  # deferred: the retry timer now waits for T0 + 60
    (retry,) = w.clock.getDelayedCalls()
    assert retry.getTime() == T0 + 60
    w.send("b@example.test")
    assert retry.getTime() == T0 + 60 and len(w.clock.getDelayedCalls()) == 2
    w.clock.advance(0)
    assert [c.addresses for c in w.deliverer.calls] == [["a@example.test"], ["b@example.test"]]
    assert w.clock.getDelayedCalls() == [retry]
    w.clock.advance(60)
    assert len(w.deliverer.calls) == 3 and first not in w.store.messages


def test_blocked_messages_deleted_meanwhile_do_not_use_up_the_wake_of_those_still_waiting():
    """A freed slot wakes as many blocked messages as the line has room for, counting only those
    still queued: deleted ones must not leave the rest waiting for the fallback time."""
    w, deliverer = capped(1)
    ids = [w.send(f"u{i}@example.test") for i in range(5)]
    w.clock.advance(0)
    assert len(deliverer.calls) == 1  # ids[0] in flight, ids[1] waiting for the slot, three blocked
    for qid in ids[2:4]:  # the two blocked the longest
        w.manager.delete(qid)
    w.clock.advance(0)
    deliverer.calls[0].answer(OK)  # ids[1] takes the slot; the line has room for one more
    w.clock.advance(0)
    deliverer.calls[1].answer(OK)
    w.clock.advance(0)
    assert [c.addresses for c in deliverer.calls] == [
        ["u0@example.test"],
        ["u1@example.test"],
        ["u4@example.test"],
    ]


def test_messages_behind_a_busy_destination_are_looked_at_again_only_at_the_longest_interval():
    """Freed slots wake them; the fallback is the schedule's longest interval, not its first, or
    every message queued behind a slow destination would be loaded and routed again each time."""
    w, router, routed = waiting_for_slow(2, 20)
    w.clock.advance(SCHEDULE[0])
    assert len(router.calls) == routed, "not at the first interval"
    w.clock.advance(SCHEDULE[-1] - SCHEDULE[0] - 1)
    assert len(router.calls) == routed
    w.clock.advance(1)
    assert len(router.calls) == routed + 16  # the fallback: all that wait, looked at once more


def test_new_routes_wake_the_messages_waiting_for_a_busy_destination():
    """They may go elsewhere now, where no freed slot of the old destination would wake them."""
    w, deliverer = capped(1, FakeRouter({"example.test": route_to("127.0.0.1", 1)}))
    ids = [w.send(f"u{i}@example.test") for i in range(4)]
    w.clock.advance(0)
    assert len(deliverer.calls) == 1  # one in flight, one waiting for its slot, two blocked
    deliverer.default = OK
    w.manager.router = FakeRouter({"example.test": route_to("127.0.0.1", 2)})
    w.clock.advance(0)
    assert [c.route.hops[0].port for c in deliverer.calls] == [1, 2, 2]
    assert set(w.store.messages) == set(ids[:2])  # the two blocked went the new way at once


def test_the_same_router_set_again_wakes_nothing():
    w, router, routed = waiting_for_slow(1, 5)
    w.manager.router = router  # a reload that kept it
    w.clock.advance(0)
    assert len(router.calls) == routed


def test_who_reports_a_success_follows_the_route_and_the_hops_dsn():
    """RFC 3461 5.2.2: a final delivery (LMTP, a maildir) is ours to report as "delivered"; a hop
    that took the NOTIFY reports itself ("passed"); else we say "relayed"."""
    from mailrelay.envelope import NextHop, Route
    from mailrelay.queue.outcome import success_notice

    hop = (NextHop("127.0.0.1", 25),)
    assert success_notice(Route(hop, lmtp=True), ()) == "delivered"
    assert success_notice(Route((), maildir="var/mail"), ()) == "delivered"
    assert success_notice(Route(hop), (True,)) == "passed"
    assert success_notice(Route(hop), ()) == "relayed"
