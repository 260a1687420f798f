"""MTA-STS in memory: the TXT record and policy parsers, MX patterns, the policy cache on a Clock,
and what the MX router makes of each mode (fake DNS, policies served from a dict)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.names import error as dnserror

from mailrelay.envelope import Envelope, NextHop, TLSPolicy
from mailrelay.errors import ConfigError, TemporaryFailure
from mailrelay.routing.context import RouterContext
from mailrelay.routing.mtasts import (
    HTTPSFetcher,
    Mode,
    Policy,
    PolicyCache,
    PolicyError,
    mx_matches,
    parse_policy,
    parse_record,
)
from mailrelay.routing.mx import MXRouter
from mailrelay.testing import FakeResolver
from tests.support.delivery.certs import CertificateAuthority
from tests.support.routing.helpers import result_of

ENV = Envelope("s@example.org", ())
ENFORCE = (
    "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmx: *.backup.test\r\nmax_age: "
    "86400\r\n"
)


# --- the TXT record -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["v=STSv1; id=20240101T000000"], "20240101T000000"),
        (["v=STSv1;id=abc;"], "abc"),  # no spaces, trailing delimiter
        (["v=STSv1; id=abc; ext_1=x.y"], "abc"),  # extensions are allowed
        (["v=spf1 -all", "v=STSv1; id=abc"], "abc"),  # other records are ignored
        (["v=STSv1; id=a", "v=STSv1; id=b"], None),  # two policies: none
        ([], None),
        (["v=STSv1"], None),  # no id
        (["v=STSv2; id=abc"], None),
        (["v=STSv1; id=" + "a" * 33], None),  # id is at most 32 characters
        (["v=STSv1; id=a-b"], None),  # letters and digits only
        (["v=STSv1; id=a; id=b"], None),
        (["v=STSv1; id=a; bogus"], None),
        (["V=STSv1; id=a"], None),  # case-sensitive
    ],
)
def test_txt_record(texts: list[str], expected: str | None) -> None:
    assert parse_record(texts) == expected


# --- the policy file
# --------------------------------------------------------------------------------


def test_policy_parses_crlf_and_lf_and_ignores_unknown_keys() -> None:
    p = parse_policy(ENFORCE.encode(), "id1")
    assert p == Policy("id1", Mode.ENFORCE, ("mx1.example.test", "*.backup.test"), 86400)
    lf = "version:STSv1\nmode: testing\nfuture: thing\nmode: none\nmx: MX.Example.Test.\nmax_age: 0"
    assert parse_policy(lf, "x") == Policy(
        "x", Mode.TESTING, ("mx.example.test",), 0
    )  # first mode counts
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 60\n", "y").mx == ()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("mode: enforce\nmx: a.test\nmax_age: 1\n", "version"),
        ("version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n", "version"),
        ("version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n", "mode"),
        ("version: STSv1\nmode: enforce\nmx: a.test\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmax_age: 60\n", "mx patterns"),
        ("version: STSv1\nmode: enforce\nmx: bad host.test\nmax_age: 60\n", "mx pattern"),
        ("version: STSv1\nmode: enforce\nmx: a.*.test\nmax_age: 60\n", "mx pattern"),
        ("<html>version: STSv1</html>\n", "malformed"),
        # ASCII only (RFC 8461 3.2, RFC 5234): no U+3000 as a blank, no other script's digits
        ("version: STSv1\nmode\u3000: enforce\nmx: a.test\nmax_age: 60\n", "malformed"),
        ("version: STSv1\n\u3000\nmode: enforce\nmx: a.test\nmax_age: 60\n", "malformed"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: \u0661\u0660\n", "max_age"),
    ],
)
def test_invalid_policies_are_refused(text: str, reason: str) -> None:
    with pytest.raises(PolicyError, match=reason):
        parse_policy(text, "id")
    with pytest.raises(PolicyError, match="UTF-8"):
        parse_policy(b"version: STSv1\xff\n", "id")


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mx1.example.test", "mx1.example.test", True),
        ("mx1.example.test", "MX1.Example.Test.", True),
        ("mx1.example.test", "mx2.example.test", False),
        ("*.example.test", "mx1.example.test", True),
        ("*.example.test", "a.mx1.example.test", False),  # the wildcard is one label
        ("*.example.test", "example.test", False),
        ("*.example.test", ".example.test", False),
    ],
)
def test_mx_patterns(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches


# --- the cache
# -------------------------------------------------------------------------------------


class Policies:
    """An in-memory policy host for every domain: ``bodies[domain]``; a missing one fails like a
    404."""

    def __init__(self) -> None:
        self.bodies: dict[str, str] = {}
        self.fetches: list[str] = []
        self.pending: defer.Deferred[bytes] | None = None

    def __call__(self, domain: str) -> defer.Deferred[bytes]:
        self.fetches.append(domain)
        if self.pending is not None:
            return self.pending
        if domain not in self.bodies:
            return defer.fail(
                PolicyError(f"https://mta-sts.{domain}/.well-known/mta-sts.txt: HTTP 404")
            )
        return defer.succeed(self.bodies[domain].encode())


def dns_zone(txt: str | None = "v=STSv1; id=one", ttl: int = 300) -> FakeResolver:
    r = FakeResolver(ttl=ttl)
    r.add(
        "example.test",
        "MX",
        (10, "mx1.example.test"),
        (20, "mx2.example.test"),
        (30, "mx3.backup.test"),
    )
    r.add("mx1.example.test", "A", "127.0.0.1")
    r.add("mx2.example.test", "A", "127.0.0.2")
    r.add("mx3.backup.test", "A", "127.0.0.3")
    if txt is not None:
        r.add("_mta-sts.example.test", "TXT", txt)
    return r


def setup(
    resolver: FakeResolver | None = None, **kw: Any
) -> tuple[MXRouter, PolicyCache, Policies, Clock]:
    clock = Clock()
    r = MXRouter(
        resolver if resolver is not None else dns_zone(),
        clock,
        port=2525,
        random=random.Random(3),
        **kw,
    )
    policies = Policies()
    policies.bodies["example.test"] = ENFORCE
    cache = PolicyCache(clock, r.txt, policies, negative_ttl=60, retry_after=60)
    r.mta_sts = cache
    return r, cache, policies, clock


def txt_queries(resolver: FakeResolver) -> int:
    return sum(1 for q in resolver.queries if q == ("_mta-sts.example.test", "TXT"))


def test_cached_for_max_age_and_fetched_again_only_when_the_id_changes() -> None:
    resolver = dns_zone()
    _, cache, policies, clock = setup(resolver)
    first = result_of(cache.policy("example.test"))
    assert first.mode is Mode.ENFORCE and first.id == "one"
    clock.advance(299)
    assert result_of(cache.policy("example.test")) is first
    assert (
        policies.fetches == ["example.test"] and txt_queries(resolver) == 1
    )  # TXT cached for its TTL
    clock.advance(2)
    assert result_of(cache.policy("example.test")) is first  # TXT asked again, same id: no fetch
    assert policies.fetches == ["example.test"] and txt_queries(resolver) == 2
    resolver.records["_mta-sts.example.test"] = []
    resolver.add("_mta-sts.example.test", "TXT", "v=STSv1; id=two")
    policies.bodies["example.test"] = ENFORCE.replace("enforce", "testing")
    clock.advance(301)
    second = result_of(cache.policy("example.test"))
    assert (second.id, second.mode) == ("two", Mode.TESTING)
    assert policies.fetches == ["example.test"] * 2


def test_a_failed_fetch_keeps_the_cached_policy_until_it_expires() -> None:
    resolver = dns_zone()
    _, cache, policies, clock = setup(resolver)
    first = result_of(cache.policy("example.test"))  # max_age 86400
    resolver.records["_mta-sts.example.test"] = []
    resolver.add("_mta-sts.example.test", "TXT", "v=STSv1; id=two")
    del policies.bodies["example.test"]  # the policy host is gone
    clock.advance(3600)
    assert result_of(cache.policy("example.test")) is first
    assert len(policies.fetches) == 2
    clock.advance(30)
    assert result_of(cache.policy("example.test")) is first
    assert len(policies.fetches) == 2  # a failed fetch is not tried again for retry_after
    clock.advance(86400)
    assert result_of(cache.policy("example.test")) is None  # expired, and nothing new: no policy
    assert len(policies.fetches) == 3


def test_no_record_no_policy_and_a_withdrawn_record_leaves_the_cached_policy_in_force() -> None:
    resolver = dns_zone(txt=None)
    _, cache, policies, clock = setup(resolver)
    assert result_of(cache.policy("example.test")) is None
    assert policies.fetches == []  # no TXT record (NODATA): nothing fetched
    resolver.add("_mta-sts.example.test", "TXT", "v=STSv1; id=one")
    clock.advance(61)
    policy = result_of(cache.policy("example.test"))
    assert policy.mode is Mode.ENFORCE
    del resolver.records["_mta-sts.example.test"]  # NXDOMAIN now
    clock.advance(301)
    assert result_of(cache.policy("example.test")) is policy
    clock.advance(86400)
    assert result_of(cache.policy("example.test")) is None


def test_a_dns_failure_uses_the_cached_policy() -> None:
    resolver = dns_zone()
    _, cache, _, clock = setup(resolver)
    policy = result_of(cache.policy("example.test"))
    resolver.fail("_mta-sts.example.test", "TXT", dnserror.DNSServerError("SERVFAIL"))
    clock.advance(301)
    assert result_of(cache.policy("example.test")) is policy
    resolver2 = dns_zone()
    resolver2.fail("_mta-sts.example.test", "TXT", defer.TimeoutError())
    _, cache2, policies2, _ = setup(resolver2)
    assert result_of(cache2.policy("example.test")) is None and policies2.fetches == []


def test_concurrent_lookups_share_one_fetch() -> None:
    _, cache, policies, _ = setup()
    policies.pending = defer.Deferred()
    waiting = [cache.policy("example.test") for _ in range(5)]
    assert not any(d.called for d in waiting)
    policies.pending.callback(ENFORCE.encode())
    assert {result_of(d).id for d in waiting} == {"one"}
    assert policies.fetches == ["example.test"]


# --- the router
# ------------------------------------------------------------------------------------


def hops(route: Any) -> list[tuple[str, str | None]]:
    return [(h.host, h.name) for h in route.hops]


def test_enforce_keeps_only_listed_mx_hosts_and_verifies_them() -> None:
    r, _, _, _ = setup()
    route = result_of(r.route("u@example.test", ENV))
    assert hops(route) == [("127.0.0.1", "mx1.example.test"), ("127.0.0.3", "mx3.backup.test")]
    assert route.tls is TLSPolicy.VERIFY
    assert (
        result_of(r.route("v@example.test", ENV)) is route
    )  # the same route while nothing changed


def test_enforce_with_no_listed_mx_is_a_temporary_failure_and_looks_for_a_newer_policy() -> None:
    r, _, policies, clock = setup()
    policies.bodies["example.test"] = ENFORCE.replace(
        "mx1.example.test", "mx9.example.test"
    ).replace("*.backup.test", "*.elsewhere.test")
    with pytest.raises(TemporaryFailure) as info:
        result_of(r.route("u@example.test", ENV))
    reply = info.value.reply
    assert (reply.code, reply.enhanced) == (451, "4.7.5")
    assert "MTA-STS" in reply.text and "mx1.example.test" in reply.text
    policies.bodies["example.test"] = ENFORCE  # fixed, under the same id
    clock.advance(1)
    route = result_of(
        r.route("u@example.test", ENV)
    )  # fetched again although the id did not change
    assert route.tls is TLSPolicy.VERIFY and len(policies.fetches) == 2


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def _texts(events: list[dict[str, Any]]) -> str:
    from twisted.logger import formatEvent

    return "\n".join(formatEvent(e) for e in events)


def test_testing_mode_delivers_as_usual_and_logs_what_enforce_would_refuse(
    logged: list[dict[str, Any]],
) -> None:
    r, _, policies, _ = setup()
    policies.bodies["example.test"] = ENFORCE.replace("enforce", "testing")
    route = result_of(r.route("u@example.test", ENV))
    assert hops(route) == [
        ("127.0.0.1", "mx1.example.test"),
        ("127.0.0.2", "mx2.example.test"),
        ("127.0.0.3", "mx3.backup.test"),
    ]
    assert route.tls is TLSPolicy.MAY
    assert "enforce would refuse MX mx2.example.test" in _texts(logged)


@pytest.mark.parametrize("body", ["version: STSv1\nmode: none\nmax_age: 600\n", None])
def test_mode_none_or_no_policy_is_ordinary_delivery(body: str | None) -> None:
    r, _, policies, _ = setup(tls=TLSPolicy.ENCRYPT)
    if body is None:
        del policies.bodies["example.test"]
    else:
        policies.bodies["example.test"] = body
    route = result_of(r.route("u@example.test", ENV))
    assert len(route.hops) == 3 and route.tls is TLSPolicy.ENCRYPT


def test_failures_are_logged(logged: list[dict[str, Any]]) -> None:
    r, _, policies, _ = setup()
    del policies.bodies["example.test"]
    result_of(r.route("u@example.test", ENV))
    assert (
        "policy of example.test (id one) not fetched: "
        "https://mta-sts.example.test/.well-known/mta-sts.txt: "
        "HTTP 404" in _texts(logged)
    )


def test_address_literals_and_routers_without_mta_sts_ask_no_txt() -> None:
    resolver = dns_zone()
    r, _, _, _ = setup(resolver)
    result_of(r.route("u@[127.0.0.1]", ENV))
    plain = MXRouter(resolver, Clock(), port=2525)
    assert len(result_of(plain.route("u@example.test", ENV)).hops) == 3
    assert txt_queries(resolver) == 0


# --- configuration
# ---------------------------------------------------------------------------------


def test_options(tmp_path: Path) -> None:
    context = RouterContext(Clock(), source="relay.toml", key="routes[0]", resolver=dns_zone())
    assert MXRouter.from_options({}, context).mta_sts is None  # off by default
    ca = tmp_path / "ca.pem"
    ca.write_bytes(CertificateAuthority().ca_pem)
    r = MXRouter.from_options(
        {
            "mta_sts": True,
            "mta_sts_port": 8443,
            "mta_sts_ca_file": str(ca),
            "mta_sts_timeout": "3s",
        },
        context,
    )
    assert isinstance(r.mta_sts, PolicyCache)
    fetch = r.mta_sts.fetch
    assert isinstance(fetch, HTTPSFetcher) and fetch.timeout == 3.0
    assert (
        fetch.url("mta-sts.example.test")
        == "https://mta-sts.example.test:8443/.well-known/mta-sts.txt"
    )
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    for options, key, reason in (
        ({"mta_sts": "yes"}, "mta_sts", "must be bool"),
        ({"mta_sts_port": 0}, "mta_sts_port", "1-65535"),
        ({"mta_sts_ca_file": str(tmp_path / "missing.pem")}, "mta_sts_ca_file", "cannot read"),
        ({"mta_sts_ca_file": str(not_pem)}, "mta_sts_ca_file", "not a PEM CA file"),
        ({"mta_sts_timeout": "0s"}, "mta_sts_timeout", "more than 0"),
        ({"mta_sts_timeout": "soon"}, "mta_sts_timeout", ""),
    ):
        with pytest.raises(ConfigError) as info:
            MXRouter.from_options({"mta_sts": True, **options}, context)
        assert (info.value.path, info.value.key) == ("relay.toml", f"routes[0].{key}")
        assert reason in info.value.reason


def test_route_hops_are_those_of_the_policy_for_the_ldap_router_too() -> None:
    """``route_domain`` (what the LDAP router calls for a routing address's domain) applies the
    policy."""
    r, _, _, _ = setup()
    route = result_of(r.route_domain("example.test", 2526))
    assert (
        route.hops[0] == NextHop("127.0.0.1", 2526, 10, "mx1.example.test")
        and route.tls is TLSPolicy.VERIFY
    )


def test_a_look_alike_mx_pattern_or_host_is_not_folded_onto_an_ascii_name() -> None:
    """str.lower() turns the Kelvin sign (U+212A) into "k"; an MX name is compared in ASCII case
    only."""
    assert not mx_matches("mx.\u212aey.example", "mx.key.example")
    assert not mx_matches("mx.key.example", "mx.\u212aey.example")
    assert mx_matches("MX.Key.Example", "mx.key.example.")
    with pytest.raises(PolicyError):
        parse_policy("version: STSv1\nmode: enforce\nmx: mx.\u212aey.example\nmax_age: 60\n", "x")


def test_a_dns_name_is_lower_cased_in_ascii_only() -> None:
    from mailrelay.routing.dns import name_text as _text

    assert _text(b"MX.\xe2\x84\xaaey.example.") == "mx.\u212aey.example"
