"""MailRelayService embedded in a Twisted program: started, used, stopped, in-process."""

from __future__ import annotations

import smtplib

import pytest
import pytest_twisted
from twisted.internet import threads

from mailrelay import config
from mailrelay.errors import ConfigError
from mailrelay.service import MailRelayService

pytestmark = pytest.mark.integration


def relay_config(
    tmp_path, sink_port: int, *, server: str = "", domain: str = "*", source: str = "embedded.toml"
) -> config.Config:
    """One listener on a free port, one static route for ``domain``; ``server``: more [server]
    keys."""
    return config.loads(
        f"""
[server]
hostname = "embedded.mailrelay.test"
listen = ["tcp:0:interface=127.0.0.1"]
{server}
[spool]
path = "{tmp_path / "spool"}"
[[routes]]
type = "static"
domains = ["{domain}"]
hosts = ["127.0.0.1:{sink_port}"]
""",
        source,
    )


@pytest_twisted.inlineCallbacks
def test_embedded_service_relays_and_stops_cleanly(tmp_path, smtp_sink):
    from twisted.application import service as appservice

    application = appservice.MultiService()  # the embedding program's own service tree
    relay = MailRelayService(relay_config(tmp_path, smtp_sink.port))
    relay.setServiceParent(application)
    application.startService()
    try:
        yield relay.listeners[0].listening
        port = relay.ports[0].getHost().port

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port) as client:
                client.sendmail(
                    "a@example.org", ["b@example.test"], b"Subject: embedded\r\n\r\nhi\r\n"
                )

        yield threads.deferToThread(send)
        yield threads.deferToThread(smtp_sink.wait_for, 1, 20)
        assert b"by embedded.mailrelay.test" in smtp_sink.messages()[0]
    finally:
        yield application.stopService()
    assert relay.ports == [] or not relay.running


def test_bad_route_config_fails_when_built_naming_the_key(tmp_path):
    cfg = config.loads(
        f'[spool]\npath = "{tmp_path}"\n[[routes]]\ntype = "static"\ndomains = ["*"]\nhosts = '
        f'["127.0.0.1:99999"]\n',
        "bad.toml",
    )
    with pytest.raises(ConfigError) as e:
        MailRelayService(cfg)
    assert "bad.toml" in str(e.value) and "routes[0].hosts[0]" in str(e.value)


def test_unknown_router_type_is_a_config_error(tmp_path):
    cfg = config.loads(f'[spool]\npath = "{tmp_path}"\n[[routes]]\ntype = "nosuch"\n', "bad.toml")
    with pytest.raises(ConfigError) as e:
        MailRelayService(cfg)
    assert "routes[0].type" in str(e.value) and "nosuch" in str(e.value)


def test_the_service_reports_what_the_config_names_and_every_route_at_once_before_making_the_spool(
    tmp_path,
):
    """What twistd relies on to build the routes once, as the service starts (not in a check
    before)."""
    cfg = config.loads(
        f'[server]\nlisten = ["tcpp:2525"]\n[spool]\npath = "{tmp_path}/spool"\n'
        '[[routes]]\ntype = "nosuch"\n[[routes]]\ntype = "static"\ndomains = ["*"]\n'
        'hosts = ["127.0.0.1:99999"]\n',
        "bad.toml",
    )
    with pytest.raises(ConfigError) as e:
        MailRelayService(cfg)
    assert [line.split(": ")[1] for line in str(e.value).splitlines()] == [
        "server.listen[0]",
        "routes[0].type",
        "routes[1].hosts[0]",
    ]
    assert not (tmp_path / "spool").exists()


def verifying_config(tmp_path, verify: str) -> config.Config:
    """example.test is ours, but the only route is for another domain: its users are unknown."""
    return relay_config(
        tmp_path,
        9,
        server=f'local_domains = ["example.test"]\n{verify}',
        domain="other.test",
        source="verify.toml",
    )


@pytest_twisted.inlineCallbacks
@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("", (550, b"5.1.1")),  # the default: routed at RCPT, no route is no such user
        ("verify_recipients = true", (550, b"5.1.1")),
        ("verify_recipients = false", (250, b"2.1.5")),  # accepted; the queue bounces it later
    ],
)
def test_recipient_verification_at_rcpt_follows_the_config(tmp_path, setting, expected):
    relay = MailRelayService(verifying_config(tmp_path, setting))
    relay.startService()
    try:
        yield relay.listeners[0].listening
        port = relay.ports[0].getHost().port

        def rcpt() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port) as client:
                client.ehlo("client.example.org")
                client.mail("a@example.org")
                code, text = client.rcpt("nosuchuser@example.test")
                return code, text[:5]

        assert (yield threads.deferToThread(rcpt)) == expected
    finally:
        yield relay.stopService()


def test_verify_recipients_must_be_a_boolean(tmp_path):
    with pytest.raises(ConfigError) as e:
        verifying_config(tmp_path, 'verify_recipients = "no"')
    assert "verify.toml" in str(e.value) and "server.verify_recipients" in str(e.value)


@pytest_twisted.inlineCallbacks
def test_binarymime_offered_while_every_route_carries_it_and_a_reload_follows(tmp_path):
    carried = config.loads(
        f'[spool]\npath = "{tmp_path / "spool"}"\n[[routes]]\ntype = "static"\n'
        'domains = ["*"]\nhosts = ["127.0.0.1:9"]\nbinarymime = true\n'
    )
    relay = MailRelayService(carried)
    assert relay.factory.settings.binarymime
    yield relay.reconfigure(relay_config(tmp_path, 9))  # a route that does not say so
    assert not relay.factory.settings.binarymime


def test_our_deliverer_lets_the_server_refuse_at_data_what_no_hop_can_carry(tmp_path):
    from mailrelay.policy.onward import OnwardCapabilities

    relay = MailRelayService(relay_config(tmp_path, 9))
    policies = relay.policy.policies  # type: ignore[attr-defined]
    assert any(
        isinstance(p, OnwardCapabilities) and p.capabilities is relay.deliverer.capabilities
        for p in policies
    )
