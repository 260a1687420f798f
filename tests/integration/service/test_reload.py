"""SIGHUP to a real ``twistd mailrelay``: new routes without dropping a session; a bad file refused.

Also, in process: ``MailRelayService.reconfigure`` swaps routes and policies, and a config whose
certificate does not load changes nothing.
"""

from __future__ import annotations

import os
import signal
import smtplib

import pytest

from mailrelay import config
from mailrelay.service import MailRelayService, needs_restart
from tests.support.metrics import scrape, value
from tests.support.peers import SMTPSink, free_port
from tests.support.relay import RelayProcess
from tests.support.reliability.helpers import Raw, route_to, stuff

pytestmark = pytest.mark.integration


@pytest.fixture
def sinks():
    a, b = SMTPSink().start(), SMTPSink().start()
    yield a, b
    a.stop()
    b.stop()


def send(port: int, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.sendmail(
            "a@example.org", ["b@example.test"], f"Subject: {subject}\r\n\r\nhi\r\n".encode()
        )


def rewrite(relay: RelayProcess, sink_port: int, route_extra: str = "") -> None:
    """Replace the route in the relay's config file, keeping its [server] and [spool] tables."""
    text = relay.config.read_text()
    head = text[: text.index("[[routes]]")]
    relay.config.write_text(head + route_to(sink_port, route_extra=route_extra).lstrip())


def hup_and_wait(relay: RelayProcess, text: str) -> None:
    before = relay.log_text().count(text)
    assert relay.proc is not None
    os.kill(relay.proc.pid, signal.SIGHUP)
    import time

    deadline = time.monotonic() + 20
    while relay.log_text().count(text) <= before:
        assert time.monotonic() < deadline, (
            f"{text!r} not logged after SIGHUP:\n{relay.log_text()[-2000:]}"
        )
        time.sleep(0.05)


def subjects(sink: SMTPSink) -> list[str]:
    """The subjects of what the sink has counted (its dump files are written as data arrives)."""
    import time

    deadline = time.monotonic() + 20
    while sink.count() < len(sink.messages()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return sorted(str(m["Subject"]) for m in sink.parsed())


def test_sighup_switches_the_route_keeps_open_sessions_and_refuses_a_broken_file(sinks):
    a, b = sinks
    relay = RelayProcess(route_to(a.port)).start()
    try:
        send(relay.port, "before")
        a.wait_for(1)
        with Raw(relay.port) as open_session:
            open_session.greet()
            rewrite(relay, b.port)
            hup_and_wait(relay, "reloaded ")
            send(relay.port, "after")
            b.wait_for(1)
            assert subjects(b) == ["after"] and subjects(a) == ["before"]

            # the session opened before the reload is still served (and routed the new way)
            assert open_session.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
            assert open_session.cmd("RCPT TO:<b@example.test>").startswith(b"250")
            assert open_session.cmd("DATA").startswith(b"354")
            open_session.send(stuff(b"Subject: open across reload\r\n\r\nhi\r\n"))
            assert open_session.reply().startswith(b"250")
            b.wait_for(2)

            # a broken file is refused, with the key and the reason in the log; mail still flows
            good = relay.config.read_text()
            relay.config.write_text(good.replace(f"127.0.0.1:{b.port}", "127.0.0.1:99999"))
            hup_and_wait(relay, "reload refused")
            assert "routes[0].hosts[0]" in relay.log_text()
            assert "port must be 1-65535" in relay.log_text()
            relay.config.write_text("[server\nthis is not toml")
            hup_and_wait(relay, "reload refused")
            assert "not valid TOML" in relay.log_text()
            send(relay.port, "after refusal")
            b.wait_for(3)
            assert subjects(b) == ["after", "after refusal", "open across reload"]
            assert open_session.cmd("NOOP").startswith(b"250")
        assert relay.proc is not None and relay.proc.poll() is None
        assert relay.stop() == 0
    finally:
        relay.cleanup()


def _config(tmp_path, text: str) -> config.Config:
    return config.loads(
        f'[server]\nhostname = "r.test"\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
        f'[spool]\npath = "{tmp_path}/spool"\n{text}',
        "test.toml",
    )


def test_reconfigure_swaps_the_router_and_policy_in_process(tmp_path):
    relay = MailRelayService(_config(tmp_path, route_to(2600)))
    old_router, old_policy = relay.router, relay.policy
    new = config.loads(
        f'[server]\nhostname = "r.test"\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
        'local_domains = ["example.test"]\n'
        f'[spool]\npath = "{tmp_path}/spool"\n' + route_to(2601),
        "test.toml",
    )
    d = relay.reconfigure(new)
    assert d.called and d.result == []
    assert relay.router is not old_router and relay.manager.router is relay.router
    assert relay.policy is not old_policy and relay.factory.policy is relay.policy
    assert relay.factory.settings.hostname == "r.test"
    assert relay.config == new


def test_reconfigure_with_an_unloadable_certificate_changes_nothing(tmp_path):
    relay = MailRelayService(_config(tmp_path, route_to(2600)))
    old = (relay.router, relay.policy, relay.config, relay.factory.settings)
    missing = tmp_path / "missing.pem"
    bad = config.loads(
        f'[server]\nhostname = "r.test"\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
        f'tls_certificate = "{missing}"\ntls_key = "{missing}"\n'
        f'[spool]\npath = "{tmp_path}/spool"\n' + route_to(2601),
        "test.toml",
    )
    d = relay.reconfigure(bad)
    assert d.called
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure is not None and not isinstance(failure, list)
    assert (relay.router, relay.policy, relay.config, relay.factory.settings) == old


def test_a_new_hostname_waits_for_the_restart_everywhere_while_the_rest_is_applied(tmp_path):
    from twisted.internet import task
    from twisted.internet.testing import StringTransport

    clock = task.Clock()
    relay = MailRelayService(_config(tmp_path, route_to(2600)), reactor=clock)
    new = config.loads(
        f'[server]\nhostname = "new.test"\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
        'local_domains = ["example.test"]\n'
        f'[spool]\npath = "{tmp_path}/spool"\n' + route_to(2601),
        "test.toml",
    )
    d = relay.reconfigure(new)
    assert d.result == ["server.hostname"]
    assert relay.config.server.local_domains == ("example.test",)  # applied
    # one name until the restart: greeting and Received, EHLO/HELO to next hops, bounces,
    # 421 at stop
    protocol = relay.factory.buildProtocol(("127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    clock.advance(0)
    assert transport.value().startswith(b"220 r.test ")
    assert relay.factory.settings.hostname == "r.test"
    assert relay.deliverer.deliverer.network.helo_name == "r.test"
    assert relay.manager.hostname == relay.manager.notifier.hostname == "r.test"
    assert relay.config.server.hostname == "r.test"
    protocol.connectionLost(None)


def test_a_reload_whose_password_file_does_not_read_changes_nothing(tmp_path):
    relay = MailRelayService(_config(tmp_path, route_to(2600)))
    old = (relay.router, relay.policy, relay.config, relay.factory.settings, relay.factory.checker)
    bad = config.loads(
        f'[server]\nhostname = "r.test"\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
        'local_domains = ["example.test"]\n'
        f'auth_password_file = "{tmp_path}/missing"\n[spool]\npath = "{tmp_path}/spool"\n'
        + route_to(2601),
        "test.toml",
    )
    d = relay.reconfigure(bad)
    failure = d.result
    d.addErrback(lambda f: None)
    assert "test.toml: server.auth_password_file:" in str(failure.value)
    assert (
        relay.router,
        relay.policy,
        relay.config,
        relay.factory.settings,
        relay.factory.checker,
    ) == old


def test_needs_restart_names_what_a_reload_cannot_apply(tmp_path):
    old = _config(tmp_path, route_to(2600))
    new = config.loads(
        f'[server]\nhostname = "r.test"\nlisten = ["tcp:2525:interface=127.0.0.1"]\n'
        f'[spool]\npath = "{tmp_path}/other"\n[metrics]\nlisten = "tcp:9125"\n' + route_to(2601),
        "t.toml",
    )
    assert needs_restart(old, new) == ["server.listen", "spool", "metrics.listen"]
    assert needs_restart(old, old) == []


def _tls_session(port: int):  # type: ignore[no-untyped-def]
    """A session upgraded with STARTTLS → (TLS socket, its reader, the server certificate's CN)."""
    import socket
    import ssl

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    plain = sock.makefile("rb")

    def reply(f):  # type: ignore[no-untyped-def]
        lines = [f.readline()]
        while lines[-1][3:4] == b"-":
            lines.append(f.readline())
        return b"".join(lines)

    assert reply(plain).startswith(b"220")
    sock.sendall(b"EHLO client.example.org\r\n")
    assert b"STARTTLS" in reply(plain)
    sock.sendall(b"STARTTLS\r\n")
    assert reply(plain).startswith(b"220")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    tls = ctx.wrap_socket(sock)
    cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    reader = tls.makefile("rb")

    def cmd(line: str) -> bytes:
        tls.sendall(line.encode() + b"\r\n")
        return reply(reader)

    return tls, cmd, cn


def test_sighup_reloads_relay_domains_and_the_tls_certificate(tmp_path, smtp_sink):
    from tests.support.smtp.certs import make_certs

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, cert_a, key_a = make_certs(tmp_path / "a", "a.mailrelay.test")
    _, cert_b, key_b = make_certs(tmp_path / "b", "b.mailrelay.test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(cert_a.read_bytes())
    key.write_bytes(key_a.read_bytes())
    server = (
        f'[server]\ntrusted_networks = []\ntls_certificate = "{cert}"\ntls_key = "{key}"\n'
        'local_domains = ["example.test"]\n'
    )
    metrics_port = free_port()
    metrics = f'[metrics]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\n'
    relay = RelayProcess(server + metrics + route_to(smtp_sink.port)).start()
    try:
        before, before_cmd, cn = _tls_session(relay.port)
        assert cn == "a.mailrelay.test"
        assert before_cmd("EHLO client.example.org").startswith(b"250")
        assert before_cmd("MAIL FROM:<a@example.org>").startswith(b"250")
        assert before_cmd("RCPT TO:<x@other.test>").startswith(b"554 5.7.1")

        cert.write_bytes(cert_b.read_bytes())
        key.write_bytes(key_b.read_bytes())
        relay.config.write_text(
            relay.config.read_text().replace(
                'local_domains = ["example.test"]', 'local_domains = ["example.test", "other.test"]'
            )
        )
        hup_and_wait(relay, "reloaded ")

        after, after_cmd, cn = _tls_session(relay.port)
        assert cn == "b.mailrelay.test"  # the renewed certificate, without a restart
        assert after_cmd("EHLO client.example.org").startswith(b"250")
        assert after_cmd("MAIL FROM:<a@example.org>").startswith(b"250")
        assert after_cmd("RCPT TO:<x@other.test>").startswith(b"250")  # the new relay domain
        assert after_cmd("QUIT").startswith(b"221")
        after.close()
        # the TLS session opened before the reload is still up and serving
        assert before_cmd("RSET").startswith(b"250")
        assert before_cmd("QUIT").startswith(b"221")
        before.close()
        samples = scrape(metrics_port)
        assert (
            value(samples, "mailrelay_tls_handshakes_total", direction="inbound", version="TLSv1.3")
            == 2
        )
        assert value(samples, "mailrelay_config_reloads_total", result="applied") == 1
        assert (
            value(samples, "mailrelay_smtp_rejections_total", command="RCPT", status="5.7.1") == 1
        )
        assert relay.stop() == 0, relay.log_text()[-3000:]
    finally:
        relay.cleanup()


def test_a_reload_that_adds_our_first_domain_starts_verifying_its_recipients(tmp_path):
    """Without domains of its own the relay skips recipient verification; a reload that adds one
    must bring it back, or unknown users of that domain would get 250 and a bounce later."""
    from mailrelay.smtp.session import SessionInfo
    from tests.support.routing.helpers import result_of

    session = SessionInfo(client_address="192.0.2.7", helo="client.example.org")
    relay = MailRelayService(_config(tmp_path, route_to(2600, domains='["other.test"]')))
    ours = config.loads(
        f'[server]\nhostname = "r.test"\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
        'local_domains = ["example.test"]\n'
        f'[spool]\npath = "{tmp_path}/spool"\n' + route_to(2600, domains='["other.test"]'),
        "test.toml",
    )
    assert relay.reconfigure(ours).called
    reply = result_of(relay.policy.rcpt(session, "a@example.org", "nosuch@example.test", {}))
    assert reply is not None and (reply.code, reply.enhanced) == (550, "5.1.1")
