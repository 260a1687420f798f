"""Relay access control: no address trick turns mailrelay into an open relay."""

from __future__ import annotations

import ipaddress

import pytest

from mailrelay.config import ServerConfig
from mailrelay.envelope import Reply, SessionInfo
from mailrelay.policy import PolicyChain, build_policy
from mailrelay.policy.access import RelayAccess, is_trusted
from tests.support.smtp.fakes import Conn

NETS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))


@pytest.mark.parametrize(
    "address, trusted",
    [
        ("10.1.2.3", True),
        ("11.0.0.1", False),
        ("::ffff:10.0.0.1", True),
        ("2001:db8::5", True),
        ("2001:db9::5", False),
        ("fe80::1%eth0", False),
        ("unknown", False),
    ],
)
def test_trusted_networks(address: str, trusted: bool) -> None:
    assert is_trusted(address, NETS) is trusted


def untrusted_conn() -> Conn:
    config = ServerConfig(
        hostname="mx.example.test",
        trusted_networks=NETS,
        local_domains=("example.test",),
        relay_domains=(".relay.example",),
    )
    c = Conn(config=config, client="192.0.2.77")
    c.ehlo()
    c.send("MAIL FROM:<a@example.org>\r\n")
    assert c.codes() == [250]
    return c


@pytest.mark.parametrize(
    "rcpt",
    [
        "victim@elsewhere.example",
        "user%elsewhere.example@example.test",  # percent hack
        "elsewhere.example!user@example.test",  # bang path
        '"user@elsewhere.example"@example.test',  # quoted @
        '"user%elsewhere.example"@example.test',
        '"elsewhere.example:user"@example.test',
        "@example.test:victim@elsewhere.example",  # source route through us
        "@example.test,@example.test:victim@elsewhere.example",
        "user@[192.0.2.1]",  # address literal
        "user@[IPv6:2001:db8::1]",
        "user@example.test.elsewhere.example",
        "user@notexample.test",
        "user@relay.example",  # only subdomains of it
    ],
)
def test_untrusted_client_cannot_relay(rcpt: str) -> None:
    c = untrusted_conn()
    c.send(f"RCPT TO:<{rcpt}>\r\n")
    code, text = c.replies()[0]
    assert code in (554, 501), text
    if code == 554:
        assert text.startswith("5.7.1") and "Relay access denied" in text


@pytest.mark.parametrize(
    "rcpt",
    [
        "user@example.test",
        "User@EXAMPLE.TEST",
        "user@sub.relay.example",
        "Postmaster",
        "postmaster",
        "@any.example:user@example.test",
        "first.last+tag@example.test",
    ],
)
def test_untrusted_client_may_send_to_our_domains(rcpt: str) -> None:
    c = untrusted_conn()
    c.send(f"RCPT TO:<{rcpt}>\r\n")
    assert c.codes() == [250]


def test_trailing_dot_never_parses() -> None:
    c = untrusted_conn()
    c.send("RCPT TO:<user@example.test.>\r\nRCPT TO:<user@elsewhere.example.>\r\n")
    assert c.codes() == [501, 501]


def test_trusted_and_authenticated_clients_relay_anywhere() -> None:
    access = RelayAccess(NETS, ["example.test"])
    trusted = SessionInfo("10.9.9.9")
    access.connect(trusted)
    assert trusted.trusted
    assert access.rcpt(trusted, "", "victim@elsewhere.example", {}) is None
    stranger = SessionInfo("192.0.2.1")
    access.connect(stranger)
    assert not stranger.trusted
    assert access.rcpt(stranger, "", "victim@elsewhere.example", {}) == Reply(
        554, "5.7.1", "<victim@elsewhere.example>: Relay access denied"
    )
    stranger.auth = "alice"
    assert access.rcpt(stranger, "", "victim@elsewhere.example", {}) is None


def test_chain_first_objection_wins_and_waits_for_deferreds() -> None:
    from twisted.internet import defer

    calls = []

    class P:
        def __init__(self, name, answer):
            self.name, self.answer = name, answer

        def helo(self, session, name):
            calls.append(self.name)
            return self.answer

    d: defer.Deferred = defer.Deferred()
    chain = PolicyChain(
        [P("a", None), P("b", d), P("c", Reply(550, "5.7.1", "c says no")), P("d", None)]
    )
    result = chain.helo(None, "x")
    assert calls == ["a", "b"]
    got = []
    result.addCallback(got.append)
    d.callback(None)
    assert calls == ["a", "b", "c"] and got == [Reply(550, "5.7.1", "c says no")]
    sync = PolicyChain([P("x", None), P("y", Reply(421, "4.7.0", "busy"))]).helo(None, "x")
    assert sync == Reply(421, "4.7.0", "busy")


def test_chain_skips_stages_a_policy_leaves_to_the_base_and_keeps_order_after_a_deferred() -> None:
    from twisted.internet import defer

    from mailrelay.policy import Policy

    calls = []

    class Later(Policy):
        def __init__(self, d):
            self.d = d

        def rcpt(self, session, sender, recipient, params):
            calls.append("later")
            return self.d

    class Silent(Policy):  # checks nothing: never asked
        pass

    class Last(Policy):
        def rcpt(self, session, sender, recipient, params):
            calls.append("last")
            return Reply(550, "5.1.1", "last says no")

    d: defer.Deferred = defer.Deferred()
    chain = PolicyChain([Silent(), Later(d), Silent(), Last()])
    assert [chain.connect(None), chain.helo(None, "x"), chain.mail(None, "", {})] == [
        None,
        None,
        None,
    ]
    result = chain.rcpt(None, "", "a@example.test", {})
    assert calls == ["later"]
    got = []
    result.addCallback(got.append)
    d.callback(None)
    assert calls == ["later", "last"] and got == [Reply(550, "5.1.1", "last says no")]
    single = defer.Deferred()
    assert PolicyChain([Silent(), Later(single)]).rcpt(None, "", "a@example.test", {}) is single


def test_build_policy_puts_extras_after_access() -> None:
    class Extra:
        def rcpt(self, session, sender, recipient, params):
            return Reply(550, "5.1.1", "extra says no")

    policy = build_policy(ServerConfig(hostname="h", trusted_networks=()), extra=[Extra()])
    s = SessionInfo("192.0.2.1")
    assert policy.rcpt(s, "", "x@elsewhere.example", {}).code == 554
    s.trusted = True
    assert policy.rcpt(s, "", "x@elsewhere.example", {}).enhanced == "5.1.1"


def test_policy_base_lets_embedders_override_one_stage() -> None:
    from zope.interface.verify import verifyObject

    from mailrelay.interfaces import IPolicy
    from mailrelay.policy import Policy

    class NoMondays(Policy):
        def mail(self, session, sender, params):
            return Reply(450, "4.7.1", "not today") if sender.startswith("monday") else None

    verifyObject(IPolicy, NoMondays())
    c = Conn(
        config=ServerConfig(hostname="h", trusted_networks=()), policy=PolicyChain([NoMondays()])
    )
    c.ehlo()
    c.send("MAIL FROM:<monday@example.org>\r\nMAIL FROM:<tuesday@example.org>\r\n")
    assert c.codes() == [450, 250]


@pytest.mark.parametrize(
    "domain",
    [
        "ｅｘａｍｐｌｅ.ｔｅｓｔ",
        "example。test",
        "exa\u200bmple.test",
        "example.test\u3000",
        "EXAMPLE.\u212aEY",
        "ＥＸＡＭＰＬＥ.test",
    ],
)
def test_a_look_alike_of_our_domain_is_refused_as_a_bad_address(domain: str) -> None:
    """Not taken as example.test (and passed on in the raw spelling): 501 5.1.3 at RCPT."""
    c = untrusted_conn()
    c.send(f"RCPT TO:<user@{domain}>\r\nRCPT TO:<user@example.test>\r\n")
    (code, text), ok = c.replies()
    assert (code, text[:5]) == (501, "5.1.3") and ok[0] == 250
    assert RelayAccess(NETS, ["example.test"]).is_our_domain(domain) is False


def test_an_international_local_domain_matches_in_either_spelling() -> None:
    access = RelayAccess(NETS, ["Bücher.example"])
    assert access.is_our_domain("bücher.example") and access.is_our_domain("XN--BCHER-KVA.example")
    assert not access.is_our_domain("bucher.example")
