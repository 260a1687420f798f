"""The public fakes of mailrelay.testing provide the real interfaces and behave as documented."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from mailrelay.envelope import Envelope, Recipient, Reply
from mailrelay.errors import PermanentFailure, TemporaryFailure
from mailrelay.interfaces import IDeliverer, IMessageWriter, IQueueStore, IRouter
from mailrelay.testing import FakeRouter, MemoryQueueStore, RecordingDeliverer, route_to
from tests.support.routing.helpers import result_of

ENV = Envelope("s@example.org", (Recipient("a@example.test"), Recipient("b@example.test")))


def test_memory_store_round_trip():
    clock = Clock()
    clock.advance(1000)
    store = MemoryQueueStore(clock)
    assert verifyObject(IQueueStore, store)
    heard = []
    store.subscribe(heard.append)
    w = store.open(ENV)
    assert verifyObject(IMessageWriter, w)
    w.write(b"abc")
    w.write(b"def")
    qid = result_of(w.commit())
    assert heard == [qid] and result_of(store.list_ids()) == [qid]
    assert store.open_body(qid).read() == b"abcdef"
    m = result_of(store.load(qid))
    assert m.envelope.received_at == 1000 and len(m.statuses) == 2
    result_of(store.remove(qid))
    with pytest.raises(KeyError):
        result_of(store.load(qid))


def test_memory_store_full_fails_commit_with_452():
    store = MemoryQueueStore()
    store.full = True
    w = store.open(ENV)
    with pytest.raises(TemporaryFailure) as e:
        result_of(w.commit())
    assert e.value.reply.code == 452 and store.messages == {}


def test_recording_deliverer_scripts():
    d = RecordingDeliverer(
        [Reply(451, "4.4.1", "later"), {"b@example.test": Reply(550, "5.1.1", "no")}, None]
    )
    assert verifyObject(IDeliverer, d)
    route = route_to("127.0.0.1", 2526)
    body = lambda: __import__("io").BytesIO(b"body")  # noqa: E731
    first = result_of(d.deliver(ENV, list(ENV.recipients), route, body))
    assert [r.code for r, _ in first] == [451, 451] and first[0][1] == "127.0.0.1[127.0.0.1]:2526"
    second = result_of(d.deliver(ENV, list(ENV.recipients), route, body))
    assert [r.code for r, _ in second] == [250, 550]
    third = d.deliver(ENV, list(ENV.recipients), route, body)
    assert not third.called
    d.calls[2].answer(Reply(250, "2.0.0", "ok"))
    assert third.called
    assert d.calls[0].body == b"body" and d.delivered[0] == ("a@example.test", b"body")


def test_fake_router_lookup_order():
    r = FakeRouter(
        {
            "special@example.test": route_to("10.0.0.1"),
            "example.test": route_to("10.0.0.2"),
            "bad.test": PermanentFailure(Reply(550, "5.1.2", "no")),
            "*": None,
        }
    )
    assert verifyObject(IRouter, r)
    assert r.route("Special@example.test", ENV).hops[0].host == "10.0.0.1"
    assert r.route("x@example.test", ENV).hops[0].host == "10.0.0.2"
    assert r.route("x@other.test", ENV) is None
    with pytest.raises(PermanentFailure):
        r.route("x@bad.test", ENV)
    r2 = FakeRouter({"*": TemporaryFailure(Reply(451, "4.4.3", "later"))})
    with pytest.raises(TemporaryFailure):
        r2.route("x@y.test", ENV)
    assert len(r.calls) == 4


def test_fake_router_does_not_fold_look_alikes() -> None:
    from mailrelay.envelope import Envelope, Recipient
    from mailrelay.testing import FakeRouter

    router = FakeRouter({"k@example.test": None, "*": "fallback"})
    assert (
        router.route("\u212a@example.test", Envelope("", (Recipient("x@example.test"),)))
        == "fallback"
    )
