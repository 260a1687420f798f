"""RecipientVerification: the router's answer at RCPT time, for our own domains only."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay.envelope import Envelope, NextHop, Reply, Route
from mailrelay.errors import PermanentFailure, TemporaryFailure
from mailrelay.interfaces import IPolicy, IRouter
from mailrelay.policy.verify import RecipientVerification
from mailrelay.smtp.session import SessionInfo
from tests.support.routing.helpers import result_of


@implementer(IRouter)
class ScriptedRouter:
    """Answers from a dict recipient → answer (a value, a Deferred or an exception); records
    calls."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers, self.calls = answers, []

    def route(self, recipient: str, envelope: Envelope) -> Any:
        self.calls.append((recipient, envelope))
        answer = self.answers.get(recipient)
        if isinstance(answer, Exception):
            raise answer
        return answer


ROUTE = Route((NextHop("127.0.0.1", 2526),))
SESSION = SessionInfo(client_address="192.0.2.7", helo="client.example.org")


def verify(router: Any, clock: Clock | None = None, **kw: Any) -> RecipientVerification:
    return RecipientVerification(router, ["example.test", ".relay.test"], clock or Clock(), **kw)


def rcpt(policy: RecipientVerification, recipient: str) -> Reply | None:
    return result_of(policy.rcpt(SESSION, "s@example.org", recipient, {}))  # type: ignore[no-any-return]


def test_provides_ipolicy() -> None:
    assert verifyObject(IPolicy, verify(ScriptedRouter({})))


def test_known_recipient_passes_and_the_router_sees_the_envelope() -> None:
    router = ScriptedRouter({"alice@example.test": ROUTE})
    assert rcpt(verify(router), "alice@example.test") is None
    ((recipient, envelope),) = router.calls
    assert recipient == "alice@example.test"
    assert envelope.sender == "s@example.org" and envelope.client_address == "192.0.2.7"
    assert [r.address for r in envelope.recipients] == ["alice@example.test"]


def test_no_such_user_is_550_5_1_1() -> None:
    router = ScriptedRouter(
        {"nobody@example.test": PermanentFailure(Reply(550, "5.1.1", "no such user here"))}
    )
    reply = rcpt(verify(router), "nobody@example.test")
    assert reply is not None and (reply.code, reply.enhanced) == (550, "5.1.1")
    assert "no such user here" in reply.text


def test_unroutable_local_recipient_is_550_5_1_1() -> None:
    router = ScriptedRouter(
        {"x@sub.relay.test": defer.fail(PermanentFailure(Reply(550, "5.1.2", "no route")))}
    )
    reply = rcpt(verify(router), "x@sub.relay.test")
    assert reply is not None and (reply.code, reply.enhanced) == (550, "5.1.1")


@pytest.mark.parametrize(
    "error",
    [
        TemporaryFailure(Reply(451, "4.4.3", "directory unavailable")),
        RuntimeError("a bug in a plugin"),
    ],
)
def test_cannot_answer_now_is_451_4_4_3(error: Exception) -> None:
    reply = rcpt(verify(ScriptedRouter({"bob@example.test": error})), "bob@example.test")
    assert reply is not None and (reply.code, reply.enhanced) == (451, "4.4.3")


def test_a_router_that_does_not_answer_in_time_is_451() -> None:
    clock = Clock()
    pending: defer.Deferred[Route] = defer.Deferred()
    d = verify(ScriptedRouter({"slow@example.test": pending}), clock, timeout=10).rcpt(
        SESSION, "s@example.org", "slow@example.test", {}
    )
    assert not d.called
    clock.advance(10)
    reply = result_of(d)
    assert (reply.code, reply.enhanced) == (451, "4.4.3")


def test_a_deferred_answer_is_waited_for() -> None:
    pending: defer.Deferred[Route] = defer.Deferred()
    d = verify(ScriptedRouter({"late@example.test": pending})).rcpt(
        SESSION, "s@example.org", "late@example.test", {}
    )
    assert not d.called
    pending.callback(ROUTE)
    assert result_of(d) is None


@pytest.mark.parametrize(
    "recipient",
    ["u@other.test", "u@relay.test", "postmaster", "u@[127.0.0.1]", "PostMaster@example.test"],
)
def test_other_domains_are_not_asked(recipient: str) -> None:
    router = ScriptedRouter({})
    assert verify(router).rcpt(SESSION, "s@example.org", recipient, {}) is None
    assert router.calls == []


def test_other_stages_have_no_objection() -> None:
    policy = verify(ScriptedRouter({}))
    env = Envelope("s@example.org", ())
    assert policy.connect(SESSION) is None and policy.helo(SESSION, "x") is None
    assert policy.mail(SESSION, "s@example.org", {}) is None
    assert policy.data(SESSION, env) is None and policy.end_of_data(SESSION, env, 10) is None
