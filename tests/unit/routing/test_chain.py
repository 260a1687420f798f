"""RouterChain: config order, first answer wins, Deferred answers, failures stop the chain."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay.envelope import Envelope, NextHop, Reply, Route
from mailrelay.errors import PermanentFailure, TemporaryFailure
from mailrelay.interfaces import IRouter
from mailrelay.routing.chain import RouterChain
from tests.support.routing.helpers import result_of

ENV = Envelope("s@example.org", ())


def route_to(host: str) -> Route:
    return Route((NextHop(host, 25),))


@implementer(IRouter)
class Answering:
    """Answers ``answer`` (a value, a Deferred or an exception to raise) and counts its calls."""

    def __init__(self, answer: object) -> None:
        self.answer, self.calls = answer, []

    def route(self, recipient, envelope):  # type: ignore[no-untyped-def]
        self.calls.append(recipient)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_chain_provides_irouter() -> None:
    assert verifyObject(IRouter, RouterChain([]))


def test_first_non_none_answer_wins_and_later_routers_are_not_asked() -> None:
    first, second, third = Answering(None), Answering(route_to("b")), Answering(route_to("c"))
    chain = RouterChain([first, second, third])
    assert result_of(chain.route("u@x.test", ENV)) == route_to("b")
    assert first.calls == ["u@x.test"] and second.calls == ["u@x.test"] and third.calls == []


def test_deferred_answers_are_waited_for_in_order() -> None:
    pending: defer.Deferred[Route | None] = defer.Deferred()
    later = Answering(route_to("later"))
    chain = RouterChain([Answering(pending), later])
    d = chain.route("u@x.test", ENV)
    assert not d.called and later.calls == []
    pending.callback(None)
    assert result_of(d) == route_to("later")


def test_a_deferred_route_is_the_answer() -> None:
    chain = RouterChain([Answering(defer.succeed(route_to("a"))), Answering(route_to("b"))])
    assert result_of(chain.route("u@x.test", ENV)) == route_to("a")


@pytest.mark.parametrize(
    "error",
    [
        TemporaryFailure(Reply(451, "4.4.3", "ldap down")),
        PermanentFailure(Reply(550, "5.1.1", "no such user")),
    ],
)
def test_failures_propagate_and_stop_the_chain(error: Exception) -> None:
    later = Answering(route_to("b"))
    for first in (Answering(error), Answering(defer.fail(error))):
        chain = RouterChain([first, later])
        with pytest.raises(type(error)) as info:
            result_of(chain.route("u@x.test", ENV))
        assert info.value.reply == error.reply  # type: ignore[attr-defined]
    assert later.calls == []


def test_no_answer_is_550_5_1_2() -> None:
    chain = RouterChain([Answering(None)])
    with pytest.raises(PermanentFailure) as info:
        result_of(chain.route("u@nowhere.test", ENV))
    assert (info.value.reply.code, info.value.reply.enhanced) == (550, "5.1.2")
    assert "nowhere.test" in info.value.reply.text


def test_no_answer_takes_the_default_route_when_configured() -> None:
    chain = RouterChain([Answering(None)], default=route_to("smarthost"))
    assert result_of(chain.route("u@nowhere.test", ENV)) == route_to("smarthost")


def test_close_reaches_the_routers_that_hold_resources() -> None:
    closed = []

    class Holding(Answering):
        def close(self) -> defer.Deferred[None]:
            closed.append(self)
            return defer.succeed(None)

    holding = Holding(None)
    chain = RouterChain([Answering(None), holding])
    assert result_of(chain.close()) is None
    assert closed == [holding]


@pytest.mark.parametrize(
    "bad",
    [
        "a@b.test>\r\nRCPT TO:<victim@elsewhere.test",  # a directory value that would add a command
        "a@b.test\nDATA",
        "a\x00@b.test",
        "no-at-sign",
        "a@ｂ.test",
        "<a@b.test>",
    ],
)
def test_a_rewrite_that_is_not_a_mailbox_is_a_temporary_failure(bad: str) -> None:
    """A rewritten recipient comes from directory data or a plugin, never through the SMTP parser:
    the chain refuses what would not parse as a mailbox, sync or async, before a client writes
    it."""
    for answer in (
        Route((NextHop("h", 25),), recipient=bad),
        defer.succeed(Route((NextHop("h", 25),), recipient=bad)),
    ):
        with pytest.raises(TemporaryFailure) as info:
            result_of(RouterChain([Answering(answer)]).route("u@x.test", ENV))
        assert info.value.reply.code == 451 and info.value.reply.enhanced == "4.3.5"


def test_a_rewrite_to_a_mailbox_is_kept() -> None:
    route = Route((NextHop("h", 25),), recipient='"a b"@bücher.example')
    assert result_of(RouterChain([Answering(route)]).route("u@x.test", ENV)) == route
