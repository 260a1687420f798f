"""AUTH and STARTTLS attacks against a real relay (and our client against a hostile server).

- AUTH is refused before TLS (538 5.7.11) and not even offered; brute force ends the session
  after three failures (421 4.7.0); no password, and no base64 token carrying one, reaches the log,
  the spool or the delivered message.
- STARTTLS command injection on the server: a whole transaction pipelined in plaintext after
  STARTTLS is never obeyed (nothing reaches the sink).
- Downgrade: a next hop without STARTTLS under tls = "encrypt"/"verify" gets nothing in plaintext;
  the message is deferred (4.7.4), not bounced.
- STARTTLS injection on our client: text a server sends after its 220 (before the handshake) is
  never read as the answer to the EHLO that follows.
"""

from __future__ import annotations

import base64
import io
import socket
import ssl
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import reactor

from mailrelay.config import DeliveryConfig
from mailrelay.delivery import SMTPDeliverer
from mailrelay.envelope import Envelope, NextHop, Recipient, Route, TLSPolicy
from mailrelay.smtp.auth import hash_password
from tests.support.reliability.helpers import Raw, route_to, stuff, wait_for_ids
from tests.support.smtp.certs import make_certs

pytestmark = pytest.mark.integration

PASSWORD = "Tr0ub4dor&3-correct-horse"
WRONG = "hunter2-Wr0ng-guess"


@pytest.fixture
def tls_files(tmp_path):
    ca, cert, key = make_certs(tmp_path, "relay.mailrelay.test")
    passwd = tmp_path / "passwd"
    passwd.write_text(f"alice:{hash_password(PASSWORD, iterations=10_000)}\n")
    return ca, cert, key, passwd


def tls_server_keys(cert, key, passwd) -> str:
    return (
        f'[server]\ntrusted_networks = ["192.0.2.0/24"]\nlocal_domains = ["example.test"]\n'
        f'tls_certificate = "{cert}"\ntls_key = "{key}"\nauth_password_file = "{passwd}"\n'
    )


def starttls(c: Raw, ca) -> None:
    assert c.cmd("STARTTLS").startswith(b"220")
    ctx = ssl.create_default_context(cafile=str(ca))
    c.sock = ctx.wrap_socket(c.sock, server_hostname="relay.mailrelay.test")
    c.file = c.sock.makefile("rb")


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_auth_refused_in_plaintext_brute_force_cut_and_secrets_never_logged(
    relays, sinks, tls_files
):
    ca, cert, key, passwd = tls_files
    sink = sinks()
    relay = relays(tls_server_keys(cert, key, passwd) + route_to(sink.port))
    with Raw(relay.port) as c:
        ehlo = c.greet()
        assert b"STARTTLS" in ehlo and b"AUTH" not in ehlo  # not offered before TLS
        plaintext = c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")
        assert plaintext.startswith(b"538 5.7.11"), plaintext
        assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
        assert c.cmd("RCPT TO:<v@elsewhere.example>").startswith(b"554 5.7.1")  # and so no relaying
    attempts = []
    with Raw(relay.port) as c:
        c.greet()
        starttls(c, ca)
        assert b"AUTH PLAIN LOGIN" in c.cmd("EHLO client.example.org")
        for guess in (WRONG, WRONG + "1"):
            attempts.append(c.cmd(f"AUTH PLAIN {plain('alice', guess)}"))
        assert c.cmd("AUTH LOGIN").startswith(b"334")
        assert c.cmd(base64.b64encode(b"alice")).startswith(b"334")
        attempts.append(c.cmd(base64.b64encode((WRONG + "2").encode())))
        farewell = c.reply()
        after = c.closed()
    assert [a[:9] for a in attempts] == [b"535 5.7.8"] * 3
    assert farewell.startswith(b"421 4.7.0") and after, farewell
    with Raw(relay.port) as c:  # the right password then relays, and the message carries no secret
        c.greet()
        starttls(c, ca)
        c.cmd("EHLO client.example.org")
        assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}").startswith(b"235 2.7.0")
        assert c.cmd("MAIL FROM:<alice@example.org>").startswith(b"250")
        assert c.cmd("RCPT TO:<friend@elsewhere.example>").startswith(b"250")
        assert c.cmd("DATA").startswith(b"354")
        c.send(stuff(b"Message-ID: <auth@relay.test>\r\n\r\nhello\r\n"))
        assert c.reply().startswith(b"250 2.0.0")
    assert wait_for_ids(sink, ["<auth@relay.test>"], timeout=20) == {"<auth@relay.test>": 1}
    time.sleep(0.3)
    secrets = [
        PASSWORD,
        WRONG,
        WRONG + "1",
        WRONG + "2",
        plain("alice", PASSWORD),
        plain("alice", WRONG),
        base64.b64encode((WRONG + "2").encode()).decode(),
        base64.b64encode(PASSWORD.encode()).decode(),
    ]
    log = relay.log_text()
    stored = b"".join(
        p.read_bytes() for p in relay.dir.rglob("*") if p.is_file() and p.suffix != ".sock"
    )
    delivered = b"".join(sink.messages())
    print(
        f"\nAUTH: plaintext → {plaintext.decode().strip()}; 3 wrong passwords over TLS → "
        f"{attempts[2].decode().strip()!r} then {farewell.decode().strip()!r}, closed={after}; "
        f"right password → 235 and relayed; "
        f"{len(secrets)} secrets searched in {len(log)} octets of log, {len(stored)} of relay "
        f"files, "
        f"{len(delivered)} delivered: found "
        f"{[s for s in secrets if s in log or s.encode() in stored]}"
    )
    assert (
        "alice" in log
    )  # the identity is logged (or the check would be vacuous), never the password
    for secret in secrets:
        assert secret not in log, f"{secret!r} in the relay's log"
        assert secret.encode() not in stored and secret.encode() not in delivered


def test_plaintext_transaction_injected_after_starttls_is_never_delivered(relays, sinks, tls_files):
    ca, cert, key, passwd = tls_files
    sink = sinks()
    relay = relays(tls_server_keys(cert, key, passwd) + route_to(sink.port))
    with Raw(relay.port) as c:
        c.greet()
        injected = (
            b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
            b"Message-ID: <injected@attacker.example>\r\n\r\ninjected\r\n.\r\n"
        )
        c.send(b"STARTTLS\r\n" + injected)
        assert c.reply().startswith(b"220 2.0.0")
        ctx = ssl.create_default_context(cafile=str(ca))
        c.sock = ctx.wrap_socket(c.sock, server_hostname="relay.mailrelay.test")
        c.file = c.sock.makefile("rb")
        after_tls = c.cmd("MAIL FROM:<a@example.org>")  # no EHLO yet: the state was reset
        assert c.cmd("EHLO client.example.org").startswith(b"250")
        rcpt = c.cmd("RCPT TO:<user@example.test>")  # no transaction survived from the plaintext
        assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
        assert c.cmd("RCPT TO:<user@example.test>").startswith(b"250")
        assert c.cmd("DATA").startswith(b"354")
        c.send(stuff(b"Message-ID: <honest@client.example>\r\n\r\nhello\r\n"))
        assert c.reply().startswith(b"250 2.0.0")
    got = wait_for_ids(sink, ["<honest@client.example>"], timeout=20)
    time.sleep(1.0)
    got = wait_for_ids(sink, ["<honest@client.example>"], timeout=1)
    print(
        f"\nSTARTTLS injection (server): MAIL after TLS without EHLO → "
        f"{after_tls.decode().strip()}; RCPT without MAIL → {rcpt.decode().strip()}; at the sink: "
        f"{dict(got)}"
    )
    assert after_tls.startswith(b"503 5.5.1") and rcpt.startswith(b"503 5.5.1")
    assert got == {"<honest@client.example>": 1}


@pytest.mark.parametrize("policy", ["encrypt", "verify"])
def test_next_hop_without_starttls_gets_nothing_under_a_tls_policy(relays, sinks, policy):
    sink = sinks()  # smtp-sink offers no STARTTLS: the same as a man in the middle stripping it
    relay = relays(
        route_to(
            sink.port, extra='[queue]\nretry_schedule = ["1s"]\n', route_extra=f'tls = "{policy}"\n'
        )
    )
    with Raw(relay.port) as c:
        c.greet()
        assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
        assert c.cmd("RCPT TO:<b@example.test>").startswith(b"250")
        assert c.cmd("DATA").startswith(b"354")
        c.send(stuff(b"Message-ID: <secret@client.example>\r\n\r\nconfidential\r\n"))
        assert c.reply().startswith(b"250 2.0.0")
    deadline = time.monotonic() + 15
    while relay.log_text().count("status=deferred") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    log = relay.log_text()
    deferred = [ln for ln in log.splitlines() if "status=deferred" in ln]
    print(
        f"\ndowngrade under tls = {policy!r}: {len(deferred)} attempts deferred, e.g. "
        f"{deferred[0].split('status=')[-1] if deferred else '-'}; messages at the sink: "
        f"{sink.count()}"
    )
    assert len(deferred) >= 2 and all("4.7.4" in ln for ln in deferred)
    assert sink.messages() == [] and sink.count() == 0
    assert "status=bounced" not in log and "status=sent" not in log


class InjectingServer(threading.Thread):
    """A hostile next hop: after "220 go ahead" it sends a fake EHLO answer in the same packet,
    in plaintext, then does TLS and records what the client says over it."""

    def __init__(self, cert, key) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.over_tls: list[bytes] = []
        self.early: bytes = b""
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            conn.settimeout(10)
            f = conn.makefile("rb")
            conn.sendall(b"220 hostile.example ESMTP\r\n")
            assert f.readline().startswith(b"EHLO")
            conn.sendall(b"250-hostile.example\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
            assert f.readline() == b"STARTTLS\r\n"
            conn.sendall(b"220 2.0.0 go ahead\r\n250-injected.example\r\n250 PIPELINING\r\n")
            tls = self.ctx.wrap_socket(conn, server_side=True)
            g = tls.makefile("rb")
            self.over_tls.append(g.readline())  # must be EHLO
            tls.settimeout(0.5)  # a fooled client would not wait for our answer to it
            try:
                self.early = tls.recv(65536)
            except TimeoutError:
                self.early = b""
            tls.settimeout(10)
            tls.sendall(b"250-hostile.example\r\n250 PIPELINING\r\n")
            while True:
                line = g.readline()
                self.over_tls.append(line)
                if not line or line.startswith(b"QUIT"):
                    tls.sendall(b"221 bye\r\n")
                    break
                if line.startswith(b"DATA"):
                    tls.sendall(b"354 go\r\n")
                    while (text := g.readline()) not in (b".\r\n", b""):
                        self.over_tls.append(text)
                    tls.sendall(b"250 2.0.0 queued\r\n")
                elif line.startswith((b"MAIL", b"RCPT", b"RSET")):
                    tls.sendall(b"250 ok\r\n")
            tls.close()
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.listener.close()


@pytest_twisted.ensureDeferred
async def test_our_client_ignores_text_injected_after_starttls(tls_files) -> None:
    ca, cert, key, _ = tls_files
    server = InjectingServer(cert, key)
    server.start()
    env = Envelope("a@example.org", (Recipient("b@example.test"),))
    d = SMTPDeliverer(
        reactor, DeliveryConfig(connect_timeout=5, command_timeout=5), "relay.mailrelay.test"
    )
    try:
        results = await d.deliver(
            env,
            env.recipients,
            Route((NextHop("127.0.0.1", server.port),), tls=TLSPolicy.ENCRYPT),
            lambda: io.BytesIO(b"Subject: tls\r\n\r\nover tls\r\n"),
        )
    finally:
        await d.stop()
    server.join(10)
    print(
        f"\nSTARTTLS injection (client): first line over TLS {server.over_tls[:1]}, sent before "
        f"our EHLO "
        f"answer {server.early!r}, result {results[0][0]}"
    )
    assert server.error is None, server.error
    assert server.over_tls[0].startswith(b"EHLO")
    assert server.early == b"", "the client took the injected plaintext as the answer to its EHLO"
    assert [r.code for r, _ in results] == [250]
    assert b"over tls\r\n" in server.over_tls
