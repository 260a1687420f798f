"""StaticRouter: domain matching table, hop order, per-route options, config errors naming keys."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from mailrelay.envelope import Envelope, NextHop, Route, TLSPolicy
from mailrelay.errors import ConfigError
from mailrelay.routing.context import RouterContext
from mailrelay.routing.static import StaticRouter, parse_domain_pattern

ENV = Envelope("s@example.org", ())


def build(**options: Any) -> StaticRouter:
    options.setdefault("hosts", ["127.0.0.1:2526"])
    return StaticRouter.from_options(
        options, RouterContext(Clock(), source="relay.toml", key="routes[2]")
    )


@pytest.mark.parametrize(
    "patterns, recipient, matched",
    [
        (["example.test"], "u@example.test", True),
        (["example.test"], "u@EXAMPLE.Test.", True),
        (["example.test"], "u@sub.example.test", False),
        (["example.test"], "u@badexample.test", False),
        ([".example.test"], "u@sub.example.test", True),
        ([".example.test"], "u@a.b.example.test", True),
        ([".example.test"], "u@example.test", False),
        ([".example.test"], "u@notexample.test", False),
        (["example.test", ".example.test"], "u@example.test", True),
        (["*"], "u@anything.org", True),
        (["*"], "u@[127.0.0.1]", True),
        (["other.test"], "u@example.test", False),
        (["example.test"], "example.test", False),  # no domain at all
    ],
)
def test_domain_matching(patterns: list[str], recipient: str, matched: bool) -> None:
    answer = build(domains=patterns).route(recipient, ENV)
    assert (answer is not None) == matched


def test_hosts_in_order_with_preference_as_index_and_default_port() -> None:
    router = build(domains=["*"], hosts=["b.test:2526", "[::1]:2527", "127.0.0.1"], port=2600)
    assert router.route("u@x.test", ENV) == Route(
        (NextHop("b.test", 2526, 0), NextHop("::1", 2527, 1), NextHop("127.0.0.1", 2600, 2))
    )


def test_route_options_travel_with_the_route() -> None:
    route = build(
        domains=["*"],
        tls="verify",
        auth={"username": "relay", "password": "pw"},
        source="127.0.0.2",
        allow_plaintext_auth=True,
    ).route("u@x.test", ENV)
    assert route is not None
    assert route.tls is TLSPolicy.VERIFY
    assert route.auth == ("relay", "pw")
    assert route.source == "127.0.0.2"
    assert route.allow_plaintext_auth is True
    assert route.recipient is None


def test_rewrite_template() -> None:
    router = build(domains=[".example.test"], rewrite="{local}+{domain}@store.test")
    route = router.route("Bob@Sub.Example.test", ENV)
    assert route is not None and route.recipient == "Bob+sub.example.test@store.test"


@pytest.mark.parametrize(
    "options, key, reason",
    [
        ({"hosts": ["h:0"]}, "routes[2].hosts[0]", "port must be 1-65535"),
        ({"hosts": ["127.0.0.1:25", "h:x"]}, "routes[2].hosts[1]", "port must be a number"),
        ({"hosts": []}, "routes[2].hosts", "at least one"),
        ({"hosts": "127.0.0.1:25"}, "routes[2].hosts", "must be a list"),
        ({"domains": []}, "routes[2].domains", "at least one"),
        ({"domains": ["a..b"]}, "routes[2].domains[0]", "not a domain"),
        ({"tls": "sometimes"}, "routes[2].tls", "must be one of none, may, encrypt, verify"),
        ({"auth": {"username": "u"}}, "routes[2].auth.password", "missing"),
        ({"auth": {"username": "u", "password": "p", "x": 1}}, "routes[2].auth.x", "unknown key"),
        ({"auth": "u:p"}, "routes[2].auth", "must be a table"),
        ({"rewrite": "{user}@x.test"}, "routes[2].rewrite", "unknown field 'user'"),
        ({"port": 70000}, "routes[2].port", "port must be 1-65535"),
        ({"hostz": []}, "routes[2].hostz", "unknown key"),
    ],
)
def test_config_errors_name_the_key(options: dict[str, Any], key: str, reason: str) -> None:
    options = {"domains": ["example.test"], "hosts": ["127.0.0.1:2526"], **options}
    with pytest.raises(ConfigError) as info:
        StaticRouter.from_options(
            options, RouterContext(Clock(), source="relay.toml", key="routes[2]")
        )
    assert info.value.path == "relay.toml"
    assert info.value.key == key
    assert reason in info.value.reason


@pytest.mark.parametrize(
    "pattern",
    ["ｌｏｃａｌ.ｔｅｓｔ", ".local。test", "lo\u200bcal.test", "*.local.test", "local..test"],
)
def test_a_domain_pattern_is_refused_unless_valid_as_written(pattern: str) -> None:
    with pytest.raises(ValueError):
        parse_domain_pattern(pattern)
    assert parse_domain_pattern(".Bücher.example.") == ".xn--bcher-kva.example"


def test_maildir_route_replaces_the_hosts() -> None:
    router = StaticRouter.from_options(
        {"domains": ["demo.test"], "maildir": "var/mail"},
        RouterContext(Clock(), source="relay.toml", key="routes[0]"),
    )
    route = router.route("you@demo.test", ENV)
    assert route == Route(hops=(), maildir="var/mail")
    assert router.route("you@other.test", ENV) is None


@pytest.mark.parametrize(
    "options, key, reason",
    [
        ({"hosts": ["127.0.0.1:2526"]}, "routes[0].hosts", "not with 'maildir'"),
        ({"tls": "verify"}, "routes[0].tls", "not with 'maildir'"),
        ({"maildir": ""}, "routes[0].maildir", "must be a directory path"),
        ({"maildir": 3}, "routes[0].maildir", "must be a directory path"),
    ],
)
def test_maildir_config_errors_name_the_key(options: dict[str, Any], key: str, reason: str) -> None:
    options = {"domains": ["demo.test"], "maildir": "var/mail", **options}
    with pytest.raises(ConfigError) as info:
        StaticRouter.from_options(
            options, RouterContext(Clock(), source="relay.toml", key="routes[0]")
        )
    assert (info.value.key, info.value.path) == (key, "relay.toml")
    assert reason in info.value.reason
