"""MXRouter against an in-memory resolver: ordering, implicit and null MX, errors, CNAME, cache."""

from __future__ import annotations

import random
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.names import error as dnserror

from mailrelay.envelope import Envelope, NextHop, TLSPolicy
from mailrelay.errors import ConfigError, PermanentFailure, TemporaryFailure
from mailrelay.routing.context import RouterContext
from mailrelay.routing.mx import MXRouter
from mailrelay.testing import FakeResolver
from tests.support.routing.helpers import result_of
from tests.support.routing.zone import zone

ENV = Envelope("s@example.org", ())


def router(resolver: Any = None, clock: Clock | None = None, **kw: Any) -> MXRouter:
    kw.setdefault("port", 2525)
    kw.setdefault("random", random.Random(7))
    return MXRouter(resolver if resolver is not None else zone(), clock or Clock(), **kw)


def hops(r: MXRouter, recipient: str) -> list[tuple[str, int, int, str | None]]:
    route = result_of(r.route(recipient, ENV))
    return [(h.host, h.port, h.preference, h.name) for h in route.hops]


def failure(r: MXRouter, recipient: str) -> tuple[type, int, str | None]:
    with pytest.raises((PermanentFailure, TemporaryFailure)) as info:
        result_of(r.route(recipient, ENV))
    return type(info.value), info.value.reply.code, info.value.reply.enhanced


def test_preference_order_and_every_address_of_every_host() -> None:
    assert hops(router(), "u@example.test") == [
        ("127.0.0.1", 2525, 10, "mx1.example.test"),
        ("::1", 2525, 10, "mx1.example.test"),
        ("127.0.0.2", 2525, 20, "mx2.example.test"),
        # mx3's only address, ::1, is already in the list: not dialled twice
    ]


def test_mx_order_does_not_follow_the_answer_order() -> None:
    r = FakeResolver()
    r.add("rev.test", "MX", (30, "c.rev.test"), (10, "a.rev.test"), (20, "b.rev.test"))
    for name, ip in (("a", "127.0.0.1"), ("b", "127.0.0.2"), ("c", "127.0.0.3")):
        r.add(f"{name}.rev.test", "A", ip)
    assert [h[0] for h in hops(router(r), "u@rev.test")] == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


def test_ipv6_first_when_preferred() -> None:
    assert [h[0] for h in hops(router(prefer="ipv6"), "u@example.test")][:2] == ["::1", "127.0.0.1"]


def test_equal_preferences_are_shuffled_by_the_injected_random() -> None:
    firsts = set()
    for seed in range(20):
        firsts.add(hops(router(random=random.Random(seed)), "u@equal.test")[0][3])
    assert firsts == {"mx1.example.test", "mx2.example.test"}
    # ...and a seeded random gives the same order every time
    assert hops(router(random=random.Random(3)), "u@equal.test") == hops(
        router(random=random.Random(3)), "u@equal.test"
    )


def test_equal_preferences_are_reshuffled_for_each_attempt_even_from_the_cache() -> None:
    clock = Clock()
    r = router(clock=clock, random=random.Random(0))
    orders = set()
    for _ in range(20):
        clock.advance(1)
        orders.add(tuple(h[3] for h in hops(r, "u@equal.test")))
    assert len(orders) == 2


def test_recipients_routed_together_share_one_order_and_one_lookup() -> None:
    """The recipients of one message are routed at once: one DNS query, one destination."""
    resolver = zone()
    held: list[tuple[defer.Deferred[Any], Any]] = []

    class Slow:
        def __getattr__(self, name: str) -> Any:
            def lookup(domain: str) -> defer.Deferred[Any]:
                d: defer.Deferred[Any] = defer.Deferred()
                held.append((d, getattr(resolver, name)(domain)))
                return d

            return lookup

    r = router(Slow(), random=random.Random(0))
    pending = [r.route(f"u{i}@equal.test", ENV) for i in range(6)]
    while held:
        d, answer = held.pop(0)
        answer.chainDeferred(d)
    routes = {result_of(p) for p in pending}
    assert len(routes) == 1
    assert resolver.queries.count(("equal.test", "MX")) == 1


@pytest.mark.parametrize(
    "domain, expected",
    [
        ("nomx.test", [("127.0.0.2", 2525, 0, "nomx.test")]),
        ("nomx6.test", [("::1", 2525, 0, "nomx6.test")]),
    ],
)
def test_implicit_mx_from_a_and_aaaa(domain: str, expected: list[Any]) -> None:
    assert hops(router(), f"u@{domain}") == expected


def test_null_mx_is_permanent_5_1_10_without_falling_back_to_a() -> None:
    resolver = zone()
    assert failure(router(resolver), "u@nullmx.test") == (PermanentFailure, 556, "5.1.10")
    assert ("nullmx.test", "A") not in resolver.queries


def test_nxdomain_is_permanent_5_1_2() -> None:
    assert failure(router(), "u@nxdomain.test") == (PermanentFailure, 550, "5.1.2")


def test_no_mx_and_no_address_is_permanent() -> None:
    assert failure(router(), "u@empty.test") == (PermanentFailure, 550, "5.4.4")


def test_unresolvable_mx_target_is_permanent() -> None:
    assert failure(router(), "u@badmx.test") == (PermanentFailure, 550, "5.4.4")


@pytest.mark.parametrize(
    "error",
    [
        dnserror.DNSServerError("servfail"),
        dnserror.DNSQueryRefusedError("refused"),
        dnserror.DNSQueryTimeoutError("example.test"),
        defer.TimeoutError("timeout"),
    ],
)
def test_server_trouble_is_temporary_4_4_3(error: Exception) -> None:
    resolver = zone().fail("example.test", "MX", error)
    assert failure(router(resolver), "u@example.test") == (TemporaryFailure, 451, "4.4.3")


def test_an_mx_host_that_cannot_be_resolved_now_is_skipped_when_another_can() -> None:
    resolver = zone().fail("mx1.example.test", "A", dnserror.DNSServerError("x"))
    resolver.fail("mx1.example.test", "AAAA", dnserror.DNSServerError("x"))
    assert [h[0] for h in hops(router(resolver), "u@example.test")] == ["127.0.0.2", "::1"]


def test_when_no_mx_host_can_be_resolved_now_it_is_temporary() -> None:
    resolver = zone().fail("nowhere.badmx.test", "A", dnserror.DNSServerError("x"))
    assert failure(router(resolver), "u@badmx.test") == (TemporaryFailure, 451, "4.4.3")


def test_temporary_failures_are_not_cached() -> None:
    resolver = zone().fail("example.test", "MX", dnserror.DNSServerError("x"))
    r = router(resolver)
    failure(r, "u@example.test")
    del resolver.errors[("example.test", 15)]
    assert hops(r, "u@example.test")[0][0] == "127.0.0.1"


def test_mx_pointing_at_a_cname_is_followed() -> None:
    assert hops(router(), "u@cnamemx.test") == [
        ("127.0.0.1", 2525, 10, "alias.cnamemx.test"),
        ("::1", 2525, 10, "alias.cnamemx.test"),
    ]


def test_a_cname_leaving_the_answer_is_chased_with_a_new_query() -> None:
    r = FakeResolver()
    r.add("far.test", "MX", (10, "alias.far.test"))
    r.add("alias.far.test", "CNAME", "mx.elsewhere.test")
    r.add("mx.elsewhere.test", "A", "127.0.0.5")
    r.records["mx.elsewhere.test"] = r.records.pop("mx.elsewhere.test")
    # an answer with the CNAME only, as a server not authoritative for the target gives:
    original = r._answer
    r._answer = lambda name, qtype: [
        x for x in original(name, qtype) if name != "alias.far.test" or x.type == 5
    ]  # type: ignore[method-assign]
    assert [h[0] for h in hops(router(r), "u@far.test")] == ["127.0.0.5"]
    assert ("mx.elsewhere.test", "A") in r.queries


def test_bound_on_hosts_per_attempt() -> None:
    assert len(hops(router(max_hosts=2), "u@example.test")) == 2


def test_answers_are_cached_for_their_ttl_on_the_injected_clock() -> None:
    resolver, clock = zone(), Clock()
    r = router(resolver, clock)
    hops(r, "u@example.test")
    asked = len(resolver.queries)
    clock.advance(299)
    hops(r, "u@example.test")
    assert len(resolver.queries) == asked
    clock.advance(2)
    hops(r, "u@example.test")
    assert len(resolver.queries) == 2 * asked


def test_permanent_answers_are_cached_negatively() -> None:
    resolver, clock = zone(), Clock()
    r = router(resolver, clock, negative_ttl=30)
    failure(r, "u@nxdomain.test")
    failure(r, "u@nxdomain.test")
    assert resolver.queries.count(("nxdomain.test", "MX")) == 1
    clock.advance(31)
    failure(r, "u@nxdomain.test")
    assert resolver.queries.count(("nxdomain.test", "MX")) == 2


def test_address_literal_domains_need_no_dns() -> None:
    resolver = zone()
    assert hops(router(resolver), "u@[127.0.0.4]") == [("127.0.0.4", 2525, 0, "127.0.0.4")]
    assert hops(router(resolver), "u@[IPv6:::1]") == [("::1", 2525, 0, "::1")]
    assert resolver.queries == []


def test_only_configured_domains_are_routed() -> None:
    r = router(domains=[".test"])
    assert r.route("u@example.org", ENV) is None
    assert hops(r, "u@nomx.test")


def test_from_options_uses_an_injected_resolver_and_names_keys_in_errors() -> None:
    context = RouterContext(
        Clock(), source="relay.toml", key="routes[1]", resolver=zone(), random=random.Random(1)
    )
    r = MXRouter.from_options({"port": 2526, "tls": "encrypt", "max_hosts": 1}, context)
    route = result_of(r.route("u@example.test", ENV))
    assert route.hops == (NextHop("127.0.0.1", 2526, 10, "mx1.example.test"),)
    assert route.tls is TLSPolicy.ENCRYPT
    for options, key in (
        ({"nameservers": ["127.0.0.1:0"]}, "routes[1].nameservers[0]"),
        ({"port": "25"}, "routes[1].port"),
        ({"prefer": "ipv5"}, "routes[1].prefer"),
        ({"server": "x"}, "routes[1].server"),
    ):
        with pytest.raises(ConfigError) as info:
            MXRouter.from_options(options, context)
        assert info.value.key == key


def test_from_options_builds_a_resolver_with_exactly_the_configured_servers() -> None:
    r = MXRouter.from_options(
        {"nameservers": ["127.0.0.1:5353", "[::1]"]}, RouterContext(Clock(), key="routes[0]")
    )
    assert r.resolver.servers == [("127.0.0.1", 5353), ("::1", 53)]
    assert r.resolver.resolv is None  # /etc/resolv.conf is never read


def test_caches_stay_bounded() -> None:
    from mailrelay.routing.mx import bound_cache

    cache = {i: i for i in range(12)}
    bound_cache(cache, lambda v: v % 2 == 0, limit=10)
    assert sorted(cache) == [1, 3, 5, 7, 9, 11]  # expired entries go first
    cache = {i: i for i in range(12)}
    bound_cache(cache, lambda v: False, limit=10)
    assert sorted(cache) == list(range(6, 12))  # then the oldest half
