"""The PostgreSQL queue store against a real server: commit, load, save, remove, leases, NOTIFY.

Every test runs in its own schema (tests/support/pgserver.py), dropped afterwards.
"""

from __future__ import annotations

import os
import queue

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from zope.interface.verify import verifyObject

from mailrelay.config import QueueConfig
from mailrelay.envelope import Envelope, Recipient, RecipientState, RecipientStatus, Reply
from mailrelay.errors import TemporaryFailure
from mailrelay.interfaces import ILeasingStore, IMessageWriter, IQueueStore
from mailrelay.queue.manager import QueueManager
from mailrelay.queue.postgres import schema as pg_schema
from mailrelay.queue.store import is_queue_id
from mailrelay.testing import FakeRouter, RecordingDeliverer, route_to
from tests.support.peers import free_port
from tests.support.pgserver import psycopg, temp_schema

pytestmark = pytest.mark.integration

ENV = Envelope(
    "sender@example.org",
    (Recipient("a@one.test"), Recipient("b@two.test", ("FAILURE",))),
    helo="client.example.org",
    received_at=1700000000.0,
)


@pytest.fixture
def dsn():
    with temp_schema() as d:
        yield d


@pytest.fixture
def stores(dsn, tmp_path):
    """Makes started stores on the test's schema (each a "node"); stops them all at the end."""
    made = []

    def make(**kw):
        kw.setdefault("cache_dir", str(tmp_path / f"cache{len(made)}"))
        s = pg_store(dsn, **kw)
        s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        pytest_twisted.blockon(s.stop())


def pg_store(dsn, **kw):
    from mailrelay.queue.postgres import PostgresStore

    return PostgresStore(dsn, reactor, **kw)


def commit(store, body: bytes, envelope: Envelope = ENV, chunks: int = 1) -> defer.Deferred[str]:
    w = store.open(envelope)
    step = max(1, len(body) // chunks)
    for i in range(0, len(body), step):
        w.write(body[i : i + step])
    return w.commit()


def query(dsn: str, sql: str, *args):
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, args).fetchall()


def wait_until(predicate, timeout: float = 15.0) -> defer.Deferred[None]:
    @defer.inlineCallbacks
    def poll():
        for _ in range(int(timeout / 0.05)):
            if predicate():
                return
            yield task.deferLater(reactor, 0.05, lambda: None)
        raise AssertionError("condition not reached in time")

    return poll()


def test_upgrade_creates_then_is_idempotent(dsn):
    assert pg_schema.upgrade(dsn) == (0, pg_schema.LATEST)
    assert pg_schema.upgrade(dsn) == (pg_schema.LATEST, pg_schema.LATEST)
    tables = {
        r[0]
        for r in query(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    }
    assert {"mailrelay_message", "mailrelay_body", "mailrelay_schema_version"} <= tables


def test_a_newer_schema_is_refused(dsn):
    pg_schema.upgrade(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO mailrelay_schema_version (version) VALUES (%s)", (pg_schema.LATEST + 1,)
        )
    with pytest.raises(pg_schema.SchemaError):
        pg_schema.upgrade(dsn)


@pytest_twisted.inlineCallbacks
def test_commit_stores_everything_in_the_database_before_it_fires(stores, dsn):
    store = stores()
    verifyObject(IQueueStore, store)
    verifyObject(ILeasingStore, store)
    seen = []
    store.subscribe(seen.append)
    body = os.urandom(700 * 1024)  # several chunks
    w = store.open(ENV)
    verifyObject(IMessageWriter, w)
    for i in range(0, len(body), 10_000):
        w.write(body[i : i + 10_000])
    d = w.commit()
    in_db_when_fired = []
    d.addCallback(
        lambda qid: (
            in_db_when_fired.append(
                query(dsn, "SELECT count(*) FROM mailrelay_body WHERE queue_id = %s", qid)[0][0]
            )
            or qid
        )
    )
    qid = yield d
    assert is_queue_id(qid)
    assert in_db_when_fired[0] >= 3
    assert seen == [qid]
    assert (yield store.list_ids()) == [qid]
    # another node, with no local copy, reads the same message and body from the database
    other = stores()
    message = yield other.load(qid)
    assert message.envelope == ENV
    assert [s.state for s in message.statuses] == [RecipientState.PENDING] * 2
    with other.open_body(qid) as f:
        assert f.read() == body


@pytest_twisted.inlineCallbacks
def test_group_commit_stores_many_in_few_transactions(stores, dsn):
    store = stores()
    ids = yield defer.gatherResults([commit(store, b"message %d\r\n" % i) for i in range(40)])
    assert sorted(ids) == (yield store.list_ids())
    # xmin: the id of the transaction that inserted the row (nothing updates these rows here)
    transactions = query(dsn, "SELECT count(DISTINCT xmin::text) FROM mailrelay_message")[0][0]
    assert transactions < 40
    for i, qid in enumerate(ids):
        with store.open_body(qid) as f:
            assert f.read() == b"message %d\r\n" % i


@pytest_twisted.inlineCallbacks
def test_save_and_remove(stores, dsn):
    a, b = stores(), stores()
    qid = yield commit(a, b"body\r\n", attrs.evolve(ENV, trusted=True))
    message = yield a.load(qid)
    statuses = (
        attrs.evolve(
            message.statuses[0],
            state=RecipientState.DELIVERED,
            success="passed",
            last_reply=Reply(250, "2.0.0", "ok"),
            attempts=1,
        ),
        message.statuses[1],
    )
    yield a.save(
        attrs.evolve(message, statuses=statuses, attempts=1, next_attempt=1700000300.0, held=True)
    )
    seen_by_b = yield b.load(qid)
    assert seen_by_b.statuses[0].state is RecipientState.DELIVERED
    assert (
        seen_by_b.envelope.trusted and seen_by_b.statuses[0].success == "passed"
    )  # queue format 2
    assert seen_by_b.statuses[0].last_reply == Reply(250, "2.0.0", "ok")
    assert (seen_by_b.attempts, seen_by_b.next_attempt, seen_by_b.held) == (1, 1700000300.0, True)
    assert (yield b.load_schedule()) == [(qid, 1700000300.0, True)]
    yield b.remove(qid)
    assert (yield a.list_ids()) == []
    assert query(dsn, "SELECT count(*) FROM mailrelay_body")[0][0] == 0
    with pytest.raises(KeyError):
        yield a.load(qid)
    with pytest.raises(KeyError):
        yield a.save(seen_by_b)
    with pytest.raises(KeyError):
        yield a.remove(qid)
    with pytest.raises(KeyError):
        b.open_body(qid)  # the node that removed it keeps no copy


@pytest_twisted.inlineCallbacks
def test_database_down_gives_451_and_keeps_nothing(tmp_path):
    cache = tmp_path / "cache"
    store = pg_store(
        f"host=127.0.0.1 port={free_port()} dbname=test user=postgres connect_timeout=2",
        cache_dir=str(cache),
    )
    store.start()
    try:
        with pytest.raises(TemporaryFailure) as e:
            yield commit(store, b"body\r\n" * 100)
        assert (e.value.reply.code, e.value.reply.enhanced) == (451, "4.3.0")
        assert os.listdir(cache) == []
    finally:
        yield store.stop()


@pytest_twisted.inlineCallbacks
def test_other_nodes_hear_of_new_mail_through_notify(stores):
    a, b = stores(remote_delay=0.0), stores(remote_delay=0.0, scan_interval=3600)
    heard_a, heard_b = [], []
    a.subscribe(heard_a.append)
    b.subscribe(heard_b.append)
    yield wait_until(lambda: b.channel)  # its listener is up
    yield task.deferLater(reactor, 0.3, lambda: None)
    qid = yield commit(a, b"hello\r\n")
    yield wait_until(lambda: heard_b)
    assert heard_b == [qid]
    assert heard_a == [qid]  # once: its own NOTIFY is not delivered twice


@pytest_twisted.inlineCallbacks
def test_leases_are_exclusive_until_they_expire(stores):
    clock = task.Clock()
    clock.advance(1700000000)
    a = stores(clock=clock, lease_time=60, scan_interval=3600)
    b = stores(clock=clock, lease_time=60, scan_interval=3600)
    qid = yield commit(a, b"x\r\n")
    assert (yield a.claim(qid)) is True
    assert (yield b.claim(qid)) is False
    clock.advance(61)  # a "died": its lease ran out
    assert (yield b.claim(qid)) is True
    assert (yield a.claim(qid)) is False
    yield b.release(qid)
    message = yield a.load(qid)
    yield a.save(attrs.evolve(message, next_attempt=clock.seconds() + 300))
    assert (yield a.claim(qid)) is False  # not due yet
    clock.advance(300)
    assert (yield a.claim(qid)) is True
    yield a.save(attrs.evolve(message, held=True))
    yield a.release(qid)
    assert (yield b.claim(qid)) is False  # held


@pytest_twisted.inlineCallbacks
def test_takeover_never_resends_to_a_recipient_recorded_delivered(stores, dsn):
    # node A leases the message, delivers to a@one.test and records it, then dies (no renewals)
    a = stores(lease_time=1.0, scan_interval=3600)
    qid = yield commit(a, b"the body\r\n")
    assert (yield a.claim(qid)) is True
    message = yield a.load(qid)
    statuses = (
        attrs.evolve(
            message.statuses[0],
            state=RecipientState.DELIVERED,
            attempts=1,
            last_reply=Reply(250, "2.0.0", "ok"),
        ),
        message.statuses[1],
    )
    yield a.save(attrs.evolve(message, statuses=statuses, attempts=1))
    # node B runs a queue manager; it takes the message over once A's lease has expired
    b = stores(lease_time=5.0, scan_interval=0.3)
    deliverer = RecordingDeliverer()
    manager = QueueManager(
        b,
        FakeRouter({"*": route_to("127.0.0.1", 25)}),
        deliverer,
        reactor,
        QueueConfig(),
        "b.example.test",
    )
    yield manager.start()
    try:
        yield wait_until(lambda: query(dsn, "SELECT count(*) FROM mailrelay_message")[0][0] == 0)
    finally:
        yield manager.stop()
    assert [c.addresses for c in deliverer.calls] == [["b@two.test"]]
    assert deliverer.calls[0].body == b"the body\r\n"


@pytest_twisted.inlineCallbacks
def test_three_nodes_deliver_each_message_once(stores, dsn):
    nodes = []
    for n in range(3):
        store = stores(scan_interval=0.5, remote_delay=0.0)
        deliverer = RecordingDeliverer()
        manager = QueueManager(
            store,
            FakeRouter({"*": route_to("127.0.0.1", 25)}),
            deliverer,
            reactor,
            QueueConfig(),
            f"node{n}.example.test",
        )
        yield manager.start()
        nodes.append((store, manager, deliverer))
    try:
        env = Envelope("s@example.org", (Recipient("r@one.test"),), received_at=1.0)
        ids = yield defer.gatherResults(
            [commit(nodes[i % 3][0], b"m%d\r\n" % i, env) for i in range(60)]
        )
        yield wait_until(lambda: query(dsn, "SELECT count(*) FROM mailrelay_message")[0][0] == 0)
    finally:
        for _, manager, _ in nodes:
            yield manager.stop()
    bodies = [c.body for _, _, d in nodes for c in d.calls]
    assert sorted(bodies) == sorted(b"m%d\r\n" % i for i in range(60))
    assert len(set(ids)) == 60


@pytest_twisted.inlineCallbacks
def test_a_store_failure_in_save_is_retried_until_the_database_is_back(stores, dsn):
    store = stores(retry_for=30.0, scan_interval=3600)  # nothing else connects meanwhile
    qid = yield commit(store, b"x\r\n")
    message = yield store.load(qid)
    real_connect = store._conns.connect
    failures = []

    def flaky():
        if len(failures) < 2:
            failures.append(1)
            raise psycopg.OperationalError("connection refused (test)")
        return real_connect()

    class NoIdle(queue.LifoQueue):  # every call connects from now on
        def put(self, conn, block=True, timeout=None):  # type: ignore[no-untyped-def]
            conn.close()  # also one that a call still running returns late (it would be reused)

    store._conns.close()
    store._conns._idle = NoIdle()
    store._conns.connect = flaky
    done = RecipientStatus(
        message.statuses[0].recipient, RecipientState.DELIVERED, 1, Reply(250, "2.0.0", "ok")
    )
    yield store.save(attrs.evolve(message, statuses=(done, message.statuses[1])))
    assert len(failures) == 2
    assert (yield store.load(qid)).statuses[0].state is RecipientState.DELIVERED


@pytest_twisted.inlineCallbacks
def test_a_database_out_of_reach_is_a_temporary_failure_to_the_stores_callers(stores, dsn):
    """The queue manager knows no psycopg: a load while the database cannot be reached fails with
    the store's TemporaryFailure (451 4.3.0), which it retries quietly, not OperationalError."""
    store = stores(scan_interval=3600)
    yield commit(store, b"x\r\n")
    # every connection refused (idle ones too: a scan may hand one back to the pool meanwhile)
    store._conns.checkout = lambda: (_ for _ in ()).throw(
        psycopg.OperationalError("connection refused (test)")
    )
    with pytest.raises(TemporaryFailure) as e:
        yield store.load(
            store.new_id()
        )  # not one this node holds claimed: it must ask the database
    assert e.value.reply.code == 451 and isinstance(e.value.__cause__, psycopg.OperationalError)


@pytest_twisted.inlineCallbacks
def test_a_body_that_does_not_match_its_size_is_never_handed_out(stores, dsn):
    a = stores()
    qid = yield commit(a, os.urandom(600 * 1024))
    with psycopg.connect(dsn) as conn:  # a chunk lost (a damaged table, a delete racing the read)
        conn.execute("DELETE FROM mailrelay_body WHERE queue_id = %s AND seq = 1", (qid,))
    b = stores()
    with pytest.raises(KeyError):
        yield b.load(qid)
    assert (yield b.claim(qid)) is False
    with pytest.raises(KeyError):
        b.open_body(qid)
    assert os.listdir(b.cache_dir) == []


@pytest_twisted.inlineCallbacks
def test_each_destinations_outcome_is_saved_as_it_ends_and_a_takeover_skips_it(stores, dsn):
    router = FakeRouter(
        {"one.test": route_to("127.0.0.1", 25), "two.test": route_to("127.0.0.2", 25)}
    )
    # node A delivers to both destinations; one.test answers, two.test hangs; A stops renewing
    a = stores(lease_time=1.0, scan_interval=3600)
    a_deliverer = RecordingDeliverer(script=[None, None])
    a_manager = QueueManager(a, router, a_deliverer, reactor, QueueConfig(), "a.example.test")
    yield a_manager.start()
    qid = yield commit(a, b"two destinations\r\n")
    yield wait_until(lambda: len(a_deliverer.calls) == 2)
    [to_one] = [c for c in a_deliverer.calls if c.addresses == ["a@one.test"]]
    to_one.answer(Reply(250, "2.0.0", "ok"))
    yield wait_until(
        lambda: (
            '"state":"delivered"'
            in query(dsn, "SELECT state FROM mailrelay_message WHERE queue_id = %s", qid)[0][0]
        )
    )
    # node B takes over once A's lease has run out, and sends only to the recipient left
    b = stores(lease_time=5.0, scan_interval=0.3)
    b_deliverer = RecordingDeliverer()
    b_manager = QueueManager(b, router, b_deliverer, reactor, QueueConfig(), "b.example.test")
    yield b_manager.start()
    try:
        yield wait_until(lambda: query(dsn, "SELECT count(*) FROM mailrelay_message")[0][0] == 0)
    finally:
        [to_two] = [c for c in a_deliverer.calls if c.addresses == ["b@two.test"]]
        to_two.answer(
            Reply(250, "2.0.0", "ok")
        )  # A's late answer: its message is gone, nothing resent
        yield a_manager.stop()
        yield b_manager.stop()
    assert [c.addresses for c in b_deliverer.calls] == [["b@two.test"]]


LATER = Reply(451, "4.4.1", "try again later")


def settle(clock: task.Clock, predicate, timeout: float = 10.0) -> defer.Deferred[None]:
    """Wait (real time, for the database threads) until ``predicate()``, running what falls due on
    the fake ``clock`` meanwhile without ever moving it forward: no retry comes due by itself."""

    def check() -> bool:
        clock.advance(0)
        return predicate()

    return wait_until(check, timeout)


def deferred_node(stores, dsn, refusals: int = 1):
    """A node whose clock is a ``task.Clock`` and whose first ``refusals`` attempts are refused
    (4xx): those messages are due again an hour later."""
    clock = task.Clock()
    clock.advance(1700000000)
    store = stores(clock=clock, scan_interval=3600, lease_time=600, remote_delay=0.0)
    deliverer = RecordingDeliverer([LATER] * refusals)
    manager = QueueManager(
        store,
        FakeRouter({"*": route_to("127.0.0.1", 25)}),
        deliverer,
        clock,
        QueueConfig(retry_schedule=(3600.0,)),
        "a.example.test",
        jitter=lambda d: d,
    )
    return clock, store, deliverer, manager


def due_times(dsn):
    return dict(query(dsn, "SELECT queue_id, next_attempt FROM mailrelay_message"))


@pytest_twisted.inlineCallbacks
def test_flush_attempts_a_message_whose_retry_is_an_hour_away_now(stores, dsn):
    clock, store, deliverer, manager = deferred_node(stores, dsn)
    yield manager.start()
    try:
        qid = yield commit(store, b"flush me\r\n")
        yield settle(
            clock,
            lambda: (
                len(deliverer.calls) == 1
                and not manager.active_ids()
                and due_times(dsn).get(qid) == clock.seconds() + 3600
            ),
        )
        assert manager.scheduled() == {qid: clock.seconds() + 3600}
        assert (yield manager.flush(qid)) == 1
        yield settle(clock, lambda: not due_times(dsn))  # delivered, with no hour passed
        assert [c.body for c in deliverer.calls] == [b"flush me\r\n"] * 2
    finally:
        yield manager.stop()


@pytest_twisted.inlineCallbacks
def test_flush_all_makes_every_message_not_held_due_and_delivers_it(stores, dsn):
    clock, store, deliverer, manager = deferred_node(stores, dsn, refusals=3)
    yield manager.start()
    try:
        ids = yield defer.gatherResults([commit(store, b"m%d\r\n" % i) for i in range(3)])
        yield settle(
            clock,
            lambda: (
                len(deliverer.calls) == 3
                and not manager.active_ids()
                and set(due_times(dsn).values()) == {clock.seconds() + 3600}
            ),
        )
        yield manager.hold(ids[2])
        assert (yield manager.flush()) == 2
        yield settle(clock, lambda: set(due_times(dsn)) == {ids[2]})
        assert sorted(c.body for c in deliverer.calls[3:]) == [b"m0\r\n", b"m1\r\n"]
        assert query(dsn, "SELECT held FROM mailrelay_message")[0][0] is True
    finally:
        yield manager.stop()


@pytest_twisted.inlineCallbacks
def test_a_flush_on_one_node_or_with_no_node_wakes_the_others(stores, dsn):
    from mailrelay.queue.postgres import PostgresQueueReader

    clock, store, deliverer, manager = deferred_node(stores, dsn, refusals=2)
    yield manager.start()
    other = stores(clock=clock, scan_interval=3600)
    try:
        first = yield commit(store, b"first\r\n")
        second = yield commit(store, b"second\r\n")
        yield settle(
            clock,
            lambda: (
                len(deliverer.calls) == 2
                and not manager.active_ids()
                and set(due_times(dsn).values()) == {clock.seconds() + 3600}
            ),
        )
        # another node (no queue manager of its own here) flushes: this node hears it and delivers
        assert (yield other.make_due(first)) == [first]
        yield settle(clock, lambda: set(due_times(dsn)) == {second})
        # the CLI with no node on its machine: the tables say due now and the running nodes hear it
        reader = PostgresQueueReader(dsn)
        try:
            assert reader.make_due(None, clock.seconds()) == [second]
        finally:
            reader.close()
        yield settle(clock, lambda: not due_times(dsn))
        assert [c.body for c in deliverer.calls[2:]] == [b"first\r\n", b"second\r\n"]
    finally:
        yield manager.stop()


@pytest_twisted.inlineCallbacks
def test_a_flush_during_an_attempt_has_it_attempted_again_once_it_ends(stores, dsn):
    clock, store, deliverer, manager = deferred_node(stores, dsn, refusals=0)
    deliverer.script.append(None)  # the first attempt hangs until answered
    yield manager.start()
    try:
        qid = yield commit(store, b"busy\r\n")
        yield settle(clock, lambda: len(deliverer.calls) == 1)
        assert (yield manager.flush(qid)) == 1
        deliverer.calls[0].answer(
            LATER
        )  # saved as due in an hour, but the flush came after it began
        yield settle(clock, lambda: not due_times(dsn))
        assert len(deliverer.calls) == 2
    finally:
        yield manager.stop()


@pytest_twisted.inlineCallbacks
def test_duplicate_recipients_are_stored_once(stores):
    store = stores()
    dup = attrs.evolve(
        ENV,
        recipients=(
            Recipient("dup@one.test", ("FAILURE",)),
            Recipient("dup@one.test"),
            Recipient("dup@ONE.TEST"),
            Recipient("b@two.test"),
        ),
    )
    qid = yield commit(store, b"Subject: dup\r\n\r\nbody\r\n", dup)
    message = yield stores().load(qid)  # another node: what the database holds
    want = (Recipient("dup@one.test", ("FAILURE",)), Recipient("b@two.test"))
    assert (
        message.envelope.recipients == want and tuple(s.recipient for s in message.statuses) == want
    )


@pytest_twisted.inlineCallbacks
def test_a_database_that_ended_every_connection_costs_no_failed_call_and_no_warning(dsn, tmp_path):
    """As a restart does, the server ends every connection of the store (the writer's, the
    listener's, the pooled ones); the next commit, loads and save all succeed at the first try,
    nothing is logged above info, and other nodes' NOTIFYs are heard again."""
    from twisted.logger import LogLevel, globalLogPublisher

    name = f"mr_{os.urandom(6).hex()}"
    store = pg_store(
        f"{dsn} application_name={name}",
        cache_dir=str(tmp_path / "a"),
        scan_interval=3600,
        remote_delay=0.0,
    )
    other = pg_store(dsn, cache_dir=str(tmp_path / "b"), scan_interval=3600)
    store.start()
    other.start()
    events: list[dict] = []
    try:
        heard: list[str] = []
        store.subscribe(heard.append)
        qid = yield commit(store, b"first\r\n")
        yield defer.gatherResults([store.load(qid) for _ in range(4)])  # a few pooled connections

        def listening() -> bool:
            return bool(
                query(
                    dsn,
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
                    " AND query LIKE 'LISTEN%%'",
                    name,
                )
            )

        yield wait_until(listening)
        pids = [
            pid
            for (pid,) in query(
                dsn, "SELECT pid FROM pg_stat_activity WHERE application_name = %s", name
            )
        ]
        assert len(pids) >= 3 and store._conns._idle.qsize() >= 1
        globalLogPublisher.addObserver(events.append)
        query(dsn, "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", pids)
        yield wait_until(
            lambda: not query(dsn, "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", pids)
        )

        qid2 = yield commit(store, b"second\r\n")  # the writer's connection
        loaded = yield defer.gatherResults(
            [store.load(q) for q in (qid, qid2, qid, qid2)]
        )  # pooled ones
        assert [m.queue_id for m in loaded] == [qid, qid2, qid, qid2]
        yield store.save(loaded[0])
        yield wait_until(listening)
        remote = yield commit(other, b"from another node\r\n")
        yield wait_until(lambda: remote in heard)
    finally:
        globalLogPublisher.removeObserver(events.append)
        yield store.stop()
        yield other.stop()
    loud = [
        e
        for e in events
        if e.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical)
    ]
    assert loud == []
