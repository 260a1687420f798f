"""Config errors name the file, the key path and the reason; values come out typed."""

from __future__ import annotations

import ipaddress

import pytest

from mailrelay import config
from mailrelay.errors import ConfigError


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        config.loads(text, "relay.toml")
    return str(e.value)


def test_defaults_are_postfix_like_and_loopback_only():
    c = config.loads("", "relay.toml")
    assert c.server.listen == ("tcp:2525:interface=127.0.0.1",)
    assert ipaddress.ip_address("127.0.0.5") in c.server.trusted_networks[0]
    assert c.server.max_message_size == 52428800 and c.server.max_recipients == 100
    assert c.queue.retry_schedule[0] == 300 and c.queue.max_lifetime == 5 * 86400
    assert c.queue.delay_warning is None and c.spool.backend == "filesystem"


def test_documented_keys_parse_to_typed_values():
    c = config.loads(
        """
[server]
hostname = "MX.Example.TEST."
listen = ["tcp:2525:interface=127.0.0.1", "tcp6:2525:interface=\\\\:\\\\:1"]
trusted_networks = ["10.1.2.3/8"]
local_domains = ["Example.TEST"]
max_message_size = "10M"
[spool]
path = "/var/spool/mailrelay"
fsync_threads = 0
[queue]
retry_schedule = ["1m", "5m", "1h"]
max_lifetime = "5d"
delay_warning = "4h"
[[routes]]
type = "static"
domains = ["example.test"]
hosts = ["127.0.0.1:2526"]
[metrics]
listen = "tcp:9125:interface=127.0.0.1"
""",
        "relay.toml",
    )
    assert c.server.hostname == "mx.example.test"
    assert c.server.trusted_networks == (ipaddress.ip_network("10.0.0.0/8"),)
    assert c.server.local_domains == ("example.test",)
    assert c.server.max_message_size == 10 * 1024 * 1024
    assert c.queue.retry_schedule == (60.0, 300.0, 3600.0)
    assert c.spool.fsync_threads == 0
    assert c.queue.delay_warning == 4 * 3600
    assert c.routes[0].type == "static" and c.routes[0].key == "routes[0]"
    assert c.routes[0].options == {"domains": ["example.test"], "hosts": ["127.0.0.1:2526"]}
    assert c.metrics_listen == "tcp:9125:interface=127.0.0.1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\nmax_message_size = -1\n", "relay.toml: server.max_message_size: "),
        (
            "[server]\ntrusted_networks = ['nonsense']\n",
            "relay.toml: server.trusted_networks[0]: 'nonsense' is not a network",
        ),
        ("[server]\nlisten = []\n", "server.listen: must name at least one endpoint"),
        ("[server]\nlisten = 'tcp:25'\n", "server.listen: must be a list"),
        (
            "[server]\nmax_recipients = 0\n",
            "server.max_recipients: must be a whole number of at least 1",
        ),
        ("[server]\nhopcount_limit = 1\n", "server.hopcount_limit: must be at least 2, not 1"),
        (
            "[server]\ntls_certificate = 'c.pem'\n",
            "server.tls_key: tls_certificate and tls_key go together",
        ),
        ("[server]\nhostnme = 'x'\n", "server.hostnme: unknown key"),
        (
            "[queue]\nretry_schedule = ['5 parsecs']\n",
            "queue.retry_schedule[0]: '5 parsecs' is not a duration",
        ),
        ("[queue]\nretry_schedule = []\n", "queue.retry_schedule: must have at least one interval"),
        (
            "[spool]\nfsync_threads = 65\n",
            "spool.fsync_threads: must be a whole number from 0 to 64, not 65",
        ),
        (
            "[spool]\nfsync_threads = true\n",
            "spool.fsync_threads: must be a whole number from 0 to 64",
        ),
        (
            "[spool]\nbackend = 'nfs'\n",
            "spool.backend: 'nfs': must be 'filesystem' or 'postgresql'",
        ),
        ("[spool]\nbackend = 'postgresql'\n", "spool.dsn: required when backend = 'postgresql'"),
        ("[[routes]]\ndomains = ['*']\n", "routes[0].type: missing"),
        ("[rout]\n", "relay.toml: rout: unknown section"),
        ("[server\n", "relay.toml: not valid TOML"),
    ],
)
def test_errors_name_file_key_and_reason(text, expected):
    assert expected in error_of(text)


def test_binarymime_offered_only_when_every_route_carries_it():
    one = (
        "[[routes]]\ntype = 'static'\ndomains = ['a.test']\nhosts = ['127.0.0.1:2526']\nbinarymime "
        "= true\n"
    )
    other = "[[routes]]\ntype = 'mx'\n"
    assert config.loads(one).binarymime
    assert config.loads(one).routes[0].options == {
        "domains": ["a.test"],
        "hosts": ["127.0.0.1:2526"],
    }
    assert not config.loads(one + other).binarymime  # an MX hop may not take it
    assert not config.loads("").binarymime
    assert "routes[0].binarymime" in error_of("[[routes]]\ntype = 'mx'\nbinarymime = 'yes'\n")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.load(str(tmp_path / "nope.toml"))
    assert "nope.toml" in str(e.value) and "No such file" in str(e.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:2526", ("127.0.0.1", 2526)),
        ("[::1]:25", ("::1", 25)),
        ("mx.example.test", ("mx.example.test", 25)),
        ("::1", ("::1", 25)),
        ("[::1]", ("::1", 25)),
    ],
)
def test_hostport(value, expected):
    assert config.parse_hostport(value) == expected


@pytest.mark.parametrize(
    "value",
    ["127.0.0.1:0", "127.0.0.1:65536", "h:x", "[::1", ":25", "", "h:\u0662\u0665", "h:２５", "h:²"],
)
def test_bad_hostport(value):
    with pytest.raises(ValueError):
        config.parse_hostport(value)


@pytest.mark.parametrize(
    "domain",
    ["ｌｏｃａｌ.ｔｅｓｔ", "local。test", "lo\u200bcal.test", "local.test\u3000", "a_b.test"],
)
def test_a_configured_domain_must_be_a_valid_name_as_written(domain):
    """No mapping makes a look-alike in the config match (or stand for) another name."""
    assert f"relay.toml: server.local_domains[0]: {domain!r} is not" in error_of(
        f'[server]\nlocal_domains = ["{domain}"]\n'
    )


def test_configured_domains_are_kept_in_canonical_form():
    c = config.loads("[server]\nlocal_domains = ['Bücher.Example', 'faß.example']\n", "relay.toml")
    assert c.server.local_domains == ("xn--bcher-kva.example", "xn--fa-hia.example")


@pytest.mark.parametrize("routes", ["", "routes = []\n"])
def test_no_routes_means_every_domain_by_mx_as_without_a_file(routes):
    from mailrelay.routing.mx import MXRouter
    from mailrelay.service import MailRelayService
    from mailrelay.testing import MemoryQueueStore

    c = config.loads(routes + '[server]\nhostname = "relay.example.test"\n', "relay.toml")
    assert c.routes == config.DEFAULT_ROUTES
    relay = MailRelayService(c, store=MemoryQueueStore())
    assert [type(r) for r in relay.router.routers] == [MXRouter]


def test_every_error_of_a_file_is_reported_at_once_each_on_its_line():
    with pytest.raises(ConfigError) as e:
        config.loads(
            'nosuch = 1\n[server]\nmax_recipients = 0\nidle_timeout = "soon"\nlisten = [1, '
            '"tcp:25"]\n'
            "[queue]\nretry_schedule = []\n[[routes]]\nhosts = []\n",
            "relay.toml",
        )
    assert str(e.value).splitlines() == [
        "relay.toml: nosuch: unknown section (known: server, spool, queue, delivery, routes, "
        "metrics, dkim)",
        "relay.toml: server.listen[0]: must be a string, not int",
        "relay.toml: server.max_recipients: must be a whole number of at least 1, not 0",
        "relay.toml: server.idle_timeout: 'soon' is not a duration such as 30s, 5m, 4h or 5d",
        "relay.toml: queue.retry_schedule: must have at least one interval",
        "relay.toml: routes[0].type: missing: every [[routes]] needs a type (static, mx, ldap or "
        "a plugin's name)",
    ]


@pytest.mark.parametrize("text", ["\u0665m", "５m", "1\u3000m"])
def test_durations_and_sizes_are_ascii_digits(text):
    """``\\d`` and ``\\s`` on str take other scripts' digits and blanks: "٥m" was five minutes."""
    with pytest.raises(ValueError):
        config.parse_duration(text)
    with pytest.raises(ValueError):
        config.parse_size(text.replace("m", "M"))
    assert config.parse_duration(" 5m ") == 300.0 and config.parse_size("10M") == 10 * 1024**2
