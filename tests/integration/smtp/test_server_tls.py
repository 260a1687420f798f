"""STARTTLS, implicit TLS, AUTH and BDAT over real sockets on 127.0.0.1: swaks, smtplib, bytes."""

from __future__ import annotations

import smtplib
import socket
import ssl
import subprocess

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.endpoints import serverFromString

from mailrelay.config import ServerConfig
from mailrelay.listener import reconfigure, server_factory
from mailrelay.policy import build_policy
from mailrelay.smtp.auth import hash_password
from tests.support.peers import free_port
from tests.support.smtp.certs import make_certs
from tests.support.smtp.fakes import RecordingSink

pytestmark = pytest.mark.integration


@pytest.fixture
def tls_files(tmp_path):
    ca, cert, key = make_certs(tmp_path)
    passwords = tmp_path / "passwd"
    passwords.write_text(f"# test users\nalice:{hash_password('s3cret', iterations=10_000)}\n")
    return ca, cert, key, passwords


def server_config(cert, key, passwords, **kw) -> ServerConfig:
    return ServerConfig(
        hostname="mx.example.test",
        local_domains=("example.test",),
        trusted_networks=(),
        tls_certificate=str(cert),
        tls_key=str(key),
        auth_password_file=str(passwords),
        **kw,
    )


def swaks(port: int, *args: str) -> str:
    cmd = [
        "swaks",
        "--server",
        f"127.0.0.1:{port}",
        "--helo",
        "client.example.org",
        "--from",
        "a@example.org",
        "--timeout",
        "10",
        "--hide-informational",
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    return done.stdout + done.stderr


@pytest_twisted.inlineCallbacks
def test_swaks_starttls_auth_and_submission(tls_files):
    ca, cert, key, passwords = tls_files
    config = server_config(cert, key, passwords)
    sink = RecordingSink()
    policy = build_policy(config)
    port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        server_factory(config, sink, policy, reactor)
    )
    sub = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        server_factory(config, sink, policy, reactor, submission=True)
    )
    n, s = port.getHost().port, sub.getHost().port
    try:
        tls_local = yield threads.deferToThread(swaks, n, "--tls", "--to", "user@example.test")
        relay_denied = yield threads.deferToThread(swaks, n, "--tls", "--to", "x@elsewhere.example")
        auth_plain = yield threads.deferToThread(
            swaks,
            n,
            "--tls",
            "--to",
            "x@elsewhere.example",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "s3cret",
        )
        auth_login = yield threads.deferToThread(
            swaks,
            n,
            "--tls",
            "--to",
            "x@elsewhere.example",
            "--auth",
            "LOGIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "s3cret",
        )
        plaintext_auth = yield threads.deferToThread(
            swaks,
            n,
            "--to",
            "x@elsewhere.example",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "s3cret",
        )
        bad_password = yield threads.deferToThread(
            swaks,
            n,
            "--tls",
            "--to",
            "x@elsewhere.example",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "nope",
        )
        submission_anon = yield threads.deferToThread(
            swaks, s, "--tls", "--to", "user@example.test"
        )
        submission_auth = yield threads.deferToThread(
            swaks,
            s,
            "--tls",
            "--to",
            "x@elsewhere.example",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "s3cret",
        )
    finally:
        yield port.stopListening()
        yield sub.stopListening()
    assert (
        "<-  220 2.0.0 Ready to start TLS" in tls_local
        and "<~  250 2.0.0 Ok: queued as" in tls_local
    )
    assert "554 5.7.1 <x@elsewhere.example>: Relay access denied" in relay_denied
    assert "235 2.7.0 Authentication successful" in auth_plain and "Ok: queued as" in auth_plain
    assert "235 2.7.0 Authentication successful" in auth_login and "Ok: queued as" in auth_login
    assert "Host did not advertise authentication" in plaintext_auth and "235" not in plaintext_auth
    assert "535 5.7.8" in bad_password
    assert "530 5.7.0 Authentication required" in submission_anon
    assert "Ok: queued as" in submission_auth
    assert len(sink.committed) == 4
    first = sink.committed[0]
    head = first.data.split(b"\r\n\r\n")[0]
    assert b"(using TLSv1." in head and first.envelope.protocol == "ESMTPS"
    assert [w.envelope.protocol for w in sink.committed[1:]] == ["ESMTPSA"] * 3
    assert {w.envelope.auth for w in sink.committed[1:]} == {"alice"}


@pytest_twisted.inlineCallbacks
def test_implicit_tls_listener_from_an_ssl_endpoint_string(tls_files):
    ca, cert, key, passwords = tls_files
    config = server_config(cert, key, passwords)
    sink = RecordingSink()
    n = free_port()
    port = yield serverFromString(
        reactor, f"ssl:{n}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    ).listen(server_factory(config, sink, build_policy(config), reactor))

    def client():
        ctx = ssl.create_default_context(cafile=str(ca))
        with smtplib.SMTP_SSL("127.0.0.1", n, context=ctx, timeout=10) as c:
            code, text = c.ehlo("client.example.org")
            assert b"STARTTLS" not in text and b"AUTH PLAIN LOGIN" in text
            c.login("alice", "s3cret")
            c.sendmail("a@example.org", ["x@elsewhere.example"], b"Subject: tls\r\n\r\nhi\r\n")

    try:
        yield threads.deferToThread(client)
    finally:
        yield port.stopListening()
    (w,) = sink.committed
    assert w.envelope.protocol == "ESMTPSA" and b"(using TLSv1.3" in w.data


@pytest_twisted.inlineCallbacks
def test_plaintext_pipelined_after_starttls_is_never_obeyed(tls_files):
    ca, cert, key, passwords = tls_files
    config = server_config(cert, key, passwords)
    sink = RecordingSink()
    port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        server_factory(config, sink, build_policy(config), reactor)
    )
    n = port.getHost().port

    def client():
        raw = socket.create_connection(("127.0.0.1", n), timeout=10)
        f = raw.makefile("rb")
        f.readline()
        raw.sendall(b"EHLO c\r\n")
        while f.readline()[3:4] == b"-":
            pass
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<injected@example.org>\r\n")
        assert f.readline().startswith(b"220 2.0.0")
        ctx = ssl.create_default_context(cafile=str(ca))
        tls = ctx.wrap_socket(raw, server_hostname="mx.example.test")
        g = tls.makefile("rb")
        tls.sendall(b"MAIL FROM:<a@example.org>\r\nEHLO c\r\n")
        first = g.readline()
        lines = [g.readline()]
        while lines[-1][3:4] == b"-":
            lines.append(g.readline())
        tls.sendall(b"RCPT TO:<user@example.test>\r\n")
        return first, g.readline()

    try:
        first, rcpt = yield threads.deferToThread(client)
    finally:
        yield port.stopListening()
    assert first.startswith(b"503 5.5.1")  # the injected MAIL was dropped, and EHLO is needed again
    assert rcpt.startswith(b"503 5.5.1")  # no transaction from the injected MAIL either


@pytest_twisted.inlineCallbacks
def test_bdat_over_a_raw_socket_pipelined():
    config = ServerConfig(
        hostname="mx.example.test", local_domains=("example.test",), trusted_networks=()
    )
    sink = RecordingSink()
    port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        server_factory(config, sink, build_policy(config), reactor, binarymime=True)
    )
    n = port.getHost().port
    body = b"Subject: chunks\r\n\r\n" + b"".join(b"line %d\r\n" % i for i in range(2000))
    half = len(body) // 2

    def client():
        s = socket.create_connection(("127.0.0.1", n), timeout=10)
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"EHLO c\r\n")
        while f.readline()[3:4] == b"-":
            pass
        s.sendall(
            b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\nRCPT TO:<user@example.test>\r\n"
            + b"BDAT %d\r\n" % half
            + body[:half]
            + b"BDAT %d LAST\r\n" % (len(body) - half)
            + body[half:]
            + b"QUIT\r\n"
        )
        return [f.readline() for _ in range(5)]

    try:
        replies = yield threads.deferToThread(client)
    finally:
        yield port.stopListening()
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"250", b"221"]
    assert sink.committed[0].data.endswith(body)


def test_reconfigure_swaps_certificate_and_limits_and_refuses_a_bad_one(tls_files, tmp_path):
    ca, cert, key, passwords = tls_files
    config = server_config(cert, key, passwords, max_recipients=5)
    factory = server_factory(config, RecordingSink(), build_policy(config), reactor)
    old_options = factory.tls_options
    (tmp_path / "new").mkdir()
    _, cert2, key2 = make_certs(tmp_path / "new", hostname="mx2.example.test")
    reconfigure(factory, server_config(cert2, key2, passwords, max_recipients=7))
    assert factory.tls_options is not old_options and factory.settings.max_recipients == 7
    broken = tmp_path / "broken.pem"
    broken.write_text("not a certificate")
    with pytest.raises(ValueError):
        reconfigure(factory, server_config(broken, key2, passwords, max_recipients=9))
    assert factory.settings.max_recipients == 7
