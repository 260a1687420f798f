"""LDAPRouter with an in-memory directory and resolver: the routing model, cache, failures,
options."""

from __future__ import annotations

import random
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from mailrelay.envelope import Envelope, NextHop, TLSPolicy
from mailrelay.errors import ConfigError, PermanentFailure, TemporaryFailure
from mailrelay.routing.context import RouterContext
from mailrelay.routing.ldap import (
    DEFAULT_FILTER,
    DirectoryUnavailable,
    LDAPRouter,
    escape_filter_value,
    make_filter,
)
from mailrelay.routing.mx import MXRouter
from mailrelay.testing import FakeResolver
from tests.support.routing.helpers import result_of
from tests.support.routing.zone import zone

ENV = Envelope("s@example.org", ())

DIRECTORY = {
    "alice@example.test": {
        "mailRoutingAddress": ["alice@mailstore1.example.test"],
        "mailHost": ["mx1.example.test"],
    },
    "a.smith@example.test": {
        "mailRoutingAddress": ["alice@mailstore1.example.test"],
        "mailHost": ["mx1.example.test"],
    },
    "bob@example.test": {"mailHost": ["mx2.example.test"]},
    "carol@example.test": {"mailRoutingAddress": ["carol@other.test"]},
    "dave@example.org": {"mailRoutingAddress": ["dave@example.org"], "mailHost": ["[127.0.0.1]"]},
    "frank@example.test": {"mailRoutingAddress": [], "mailHost": []},
    "host@example.test": {
        "mailhost": ["[mx2.example.test]"]
    },  # attribute names are case-insensitive
    "@example.net": {"mailRoutingAddress": ["postmaster@example.test"]},
}


class FakeDirectory:
    """A dict as a directory; ``down`` makes every search fail like a stopped server."""

    def __init__(self, entries: dict[str, Any]) -> None:
        self.entries, self.down, self.searches = entries, False, []

    def search(self, address: str) -> list[dict[str, list[str]]]:
        self.searches.append(address)
        if self.down:
            raise DirectoryUnavailable("connection refused")
        entry = self.entries.get(address.lower())
        if isinstance(entry, list):
            return entry
        return [entry] if entry is not None else []


def run_now(f: Any, *args: Any) -> defer.Deferred[Any]:
    """What deferToThreadPool does, minus the thread: the call's result or failure, in a
    Deferred."""
    return defer.maybeDeferred(f, *args)


def make(
    directory: FakeDirectory | None = None,
    clock: Clock | None = None,
    resolver: Any = None,
    **kw: Any,
) -> LDAPRouter:
    clock = clock or Clock()
    kw.setdefault("port", 2525)
    resolver = resolver or zone().add("other.test", "MX", (10, "mx2.example.test"))
    mx = MXRouter(resolver, clock, port=25, random=random.Random(1))
    return LDAPRouter(directory or FakeDirectory(DIRECTORY), clock, run_now, mx, **kw)


def answer(router: LDAPRouter, recipient: str) -> tuple[str | None, list[tuple[str, int]]] | None:
    route = result_of(router.route(recipient, ENV))
    if route is None:
        return None
    return route.recipient, [(h.host, h.port) for h in route.hops]


@pytest.mark.parametrize(
    "recipient, expected",
    [
        # mailRoutingAddress + mailHost: rewritten, to the host's MX (implicit: its own addresses)
        (
            "alice@example.test",
            ("alice@mailstore1.example.test", [("127.0.0.1", 2525), ("::1", 2525)]),
        ),
        (
            "a.smith@Example.TEST",
            ("alice@mailstore1.example.test", [("127.0.0.1", 2525), ("::1", 2525)]),
        ),
        # mailHost only: address unchanged
        ("bob@example.test", (None, [("127.0.0.2", 2525)])),
        # mailRoutingAddress only: by the MX of the new domain, on the standard port
        ("carol@example.test", ("carol@other.test", [("127.0.0.2", 25)])),
        # [address literal]: no DNS
        ("dave@example.org", ("dave@example.org", [("127.0.0.1", 2525)])),
        # [name]: the host's own addresses, no MX lookup
        ("host@example.test", (None, [("127.0.0.2", 2525)])),
        # the @domain catch-all
        (
            "anyone@example.net",
            ("postmaster@example.test", [("127.0.0.1", 25), ("::1", 25), ("127.0.0.2", 25)]),
        ),
        # an entry without routing attributes: the user exists, the next router routes it unchanged
        ("frank@example.test", None),
        # no entry at all
        ("nobody@example.test", None),
    ],
)
def test_mail_routing_model(recipient: str, expected: Any) -> None:
    assert answer(make(), recipient) == expected


def test_missing_entry_rejected_with_5_1_1_when_configured() -> None:
    with pytest.raises(PermanentFailure) as info:
        answer(make(missing="reject"), "nobody@example.test")
    assert (info.value.reply.code, info.value.reply.enhanced) == (550, "5.1.1")
    assert answer(make(missing="reject"), "frank@example.test") is None  # exists: not rejected


def test_catch_all_can_be_turned_off() -> None:
    directory = FakeDirectory(DIRECTORY)
    assert answer(make(directory, catch_all=False), "anyone@example.net") is None
    assert directory.searches == ["anyone@example.net"]


def test_bracketed_mailhost_does_not_look_up_mx() -> None:
    resolver = zone()
    answer(make(resolver=resolver), "host@example.test")
    assert ("mx2.example.test", "MX") not in resolver.queries


def test_only_configured_domains_are_looked_up() -> None:
    directory = FakeDirectory(DIRECTORY)
    router = make(directory, domains=["example.test"])
    assert router.route("dave@example.org", ENV) is None
    assert directory.searches == []


def test_directory_down_is_temporary_and_never_cached() -> None:
    directory = FakeDirectory(DIRECTORY)
    directory.down = True
    router = make(directory, missing="reject")
    with pytest.raises(TemporaryFailure) as info:
        answer(router, "bob@example.test")
    assert (info.value.reply.code, info.value.reply.enhanced) == (451, "4.4.3")
    directory.down = False
    assert answer(router, "bob@example.test") == (None, [("127.0.0.2", 2525)])


def test_ambiguous_entries_are_temporary() -> None:
    directory = FakeDirectory(
        {"twice@example.test": [{"mailHost": ["a.test"]}, {"mailHost": ["b.test"]}]}
    )
    with pytest.raises(TemporaryFailure):
        answer(make(directory), "twice@example.test")


def test_positive_and_negative_answers_are_cached_for_their_ttl() -> None:
    directory, clock = FakeDirectory(DIRECTORY), Clock()
    router = make(directory, clock, positive_ttl=300, negative_ttl=60)
    answer(router, "bob@example.test")
    answer(router, "nobody@example.test")
    assert directory.searches == ["bob@example.test", "nobody@example.test", "@example.test"]
    clock.advance(59)
    answer(router, "bob@example.test")
    answer(router, "nobody@example.test")
    assert len(directory.searches) == 3
    clock.advance(2)
    answer(router, "bob@example.test")
    answer(router, "nobody@example.test")
    assert directory.searches[3:] == ["nobody@example.test", "@example.test"]
    clock.advance(240)
    answer(router, "bob@example.test")
    assert directory.searches[5:] == ["bob@example.test"]


def test_an_unresolvable_mail_host_is_permanent() -> None:
    directory = FakeDirectory({"x@example.test": {"mailHost": ["nowhere.test"]}})
    with pytest.raises(PermanentFailure):
        answer(make(directory), "x@example.test")


def test_route_tls_policy_is_the_configured_one() -> None:
    route = result_of(make(tls=TLSPolicy.VERIFY).route("bob@example.test", ENV))
    assert route.tls is TLSPolicy.VERIFY
    assert route.hops == (NextHop("127.0.0.2", 2525, 0, "mx2.example.test"),)


@pytest.mark.parametrize(
    "value, escaped",
    [
        ("alice@example.test", "alice@example.test"),
        ("*", "\\2a"),
        ("a*)(mailLocalAddress=*", "a\\2a\\29\\28mailLocalAddress=\\2a"),
        ("back\\slash", "back\\5cslash"),
        ("nul\x00", "nul\\00"),
        ("ünïcode@exämple.test", "ünïcode@exämple.test"),
    ],
)
def test_filter_values_are_escaped(value: str, escaped: str) -> None:
    assert escape_filter_value(value) == escaped


def test_filter_template_fields() -> None:
    assert (
        make_filter("(&(uid={local})(dc={domain}))", "a(b@x.test") == "(&(uid=a\\28b)(dc=x.test))"
    )
    assert make_filter(DEFAULT_FILTER, "@example.net").endswith("(mailLocalAddress=@example.net))")


def context(**kw: Any) -> RouterContext:
    return RouterContext(
        Clock(),
        threadpool=object(),
        source="relay.toml",
        key="routes[1]",
        resolver=FakeResolver(),
        **kw,
    )


def test_from_options() -> None:
    router = LDAPRouter.from_options(
        {
            "uri": ["ldap://127.0.0.1:389", "ldap://127.0.0.2:389/"],
            "bind_dn": "cn=x",
            "bind_password": "pw",
            "base": "dc=example,dc=test",
            "port": 2525,
            "missing": "reject",
            "domains": ["example.test"],
            "positive_ttl": "10m",
            "negative_ttl": "30s",
            "filter": "(mail={address})",
        },
        context(),
    )
    assert (
        router.port == 2525 and router.missing == "reject" and router.domains == ("example.test",)
    )
    assert (router.positive_ttl, router.negative_ttl) == (600.0, 30.0)
    assert router.directory.uris == ["ldap://127.0.0.1:389", "ldap://127.0.0.2:389"]  # type: ignore[attr-defined]
    assert router.directory.filter_template == "(mail={address})"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "options, key",
    [
        ({"base": "dc=x"}, "routes[1].uri"),
        ({"uri": "http://x", "base": "dc=x"}, "routes[1].uri"),
        ({"uri": ["ldap://a", 5], "base": "dc=x"}, "routes[1].uri[1]"),
        ({"uri": "ldap://a"}, "routes[1].base"),
        ({"uri": "ldap://a", "base": "dc=x", "bind_dn": "cn=x"}, "routes[1].bind_password"),
        ({"uri": "ldap://a", "base": "dc=x", "filter": "mail={address}"}, "routes[1].filter"),
        ({"uri": "ldap://a", "base": "dc=x", "filter": "(mail={user})"}, "routes[1].filter"),
        ({"uri": "ldap://a", "base": "dc=x", "missing": "bounce"}, "routes[1].missing"),
        ({"uri": "ldap://a", "base": "dc=x", "port": 0}, "routes[1].port"),
        ({"uri": "ldap://a", "base": "dc=x", "binddn": "cn=x"}, "routes[1].binddn"),
        (
            {"uri": "ldaps://a", "base": "dc=x", "tls_ca_file": "/nonexistent/ca.pem"},
            "routes[1].tls_ca_file",
        ),
    ],
)
def test_option_errors_name_the_key(options: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        LDAPRouter.from_options(options, context())
    assert (info.value.path, info.value.key) == ("relay.toml", key)


def test_concurrent_questions_about_one_address_share_one_lookup() -> None:
    directory = FakeDirectory(DIRECTORY)
    held: list[tuple[defer.Deferred[Any], Any, tuple[Any, ...]]] = []

    def run_later(f: Any, *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        held.append((d, f, args))
        return d

    clock = Clock()
    mx = MXRouter(zone(), clock, random=random.Random(1))
    router = LDAPRouter(directory, clock, run_later, mx, port=2525)
    pending = [router.route("bob@example.test", ENV) for _ in range(3)]
    while held:
        d, f, args = held.pop(0)
        d.callback(f(*args))
    assert {result_of(p).hops[0].host for p in pending} == {"127.0.0.2"}
    assert directory.searches == ["bob@example.test"]


def test_a_failed_shared_lookup_fails_every_waiter_and_is_not_cached() -> None:
    directory = FakeDirectory(DIRECTORY)
    directory.down = True
    held: list[tuple[defer.Deferred[Any], Any, tuple[Any, ...]]] = []

    def run_later(f: Any, *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        held.append((d, f, args))
        return d

    router = LDAPRouter(directory, Clock(), run_later, None)
    pending = [router.route("bob@example.test", ENV) for _ in range(2)]
    d, f, args = held.pop(0)
    d.errback(DirectoryUnavailable("down"))
    for p in pending:
        with pytest.raises(TemporaryFailure):
            result_of(p)
    directory.down = False
    later = router.route("bob@example.test", ENV)
    d, f, args = held.pop(0)
    d.callback(f(*args))
    assert result_of(later).hops[0].host == "mx2.example.test"  # no MX router: the name as is
