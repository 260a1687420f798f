"""A next hop that flaps: down, 421, hanging up mid-transaction, too slow, a TLS handshake that
fails — then well again.

Every message is retried through each bad phase (the relay logs a deferral per attempt), none is
bounced, and all arrive once the hop recovers. Timeouts are set small so "slow" means "slower than
our timeouts", and the retry interval is one second.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.support.peers import SMTPSink, free_port
from tests.support.reliability.helpers import message_ids, route_to, wait_for_ids
from tests.support.smtp.certs import make_certs

pytestmark = pytest.mark.integration

N = 6
CONFIG = """[queue]
retry_schedule = ["1s"]
[delivery]
connect_timeout = "1s"
command_timeout = "1s"
data_timeout = "1s"
connection_idle_time = "0.2s"
"""
_DEFERRED = re.compile(r"status=deferred \((.*)\)")


def deferrals(log: str) -> list[str]:
    return _DEFERRED.findall(log)


def wait_deferrals(relay, before: int, n: int, timeout: float = 20.0) -> list[str]:
    """Wait until ``n`` more deferrals than ``before`` are logged; returns the new ones."""
    deadline = time.monotonic() + timeout
    while True:
        new = deferrals(relay.log_text())[before:]
        if len(new) >= n or time.monotonic() > deadline:
            return new
        time.sleep(0.1)


# (phase, smtp-sink flags or None for "nothing listens", a word every deferral of the phase shows)
PHASES = [
    ("down", None, "connect"),
    ("421 at MAIL", ["-Q", "MAIL"], "421"),
    ("hang up at DATA", ["-q", "DATA"], "lost connection"),
    ("hang up after the final dot", ["-q", "."], "lost connection"),
    ("slower than the timeouts", ["-w", "4"], "timed out"),
]


def test_flapping_next_hop_retries_and_delivers_everything_when_it_recovers(relays):
    port = free_port()
    relay = relays(route_to(port, extra=CONFIG))
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        for i in range(N):
            body = f"Message-ID: <flap{i}@client.example>\r\nSubject: {i}\r\n\r\nbody {i}\r\n"
            client.sendmail("s@example.org", [f"r{i}@example.test"], body.encode())
    seen = 0
    report = []
    flaky: list[SMTPSink] = []
    try:
        for name, flags, word in PHASES:
            sink = SMTPSink(port=port, flags=flags).start() if flags is not None else None
            new = wait_deferrals(relay, seen, N)
            if sink is not None:
                sink.stop()
                flaky.append(sink)
            ours = [d for d in new if word in d.lower()]
            report.append(f"  {name:30} {len(new)} deferrals, e.g. {new[-1] if new else '-'}")
            assert len(ours) >= N, f"{name}: expected {N} deferrals mentioning {word!r}, got {new}"
            seen += len(new)
        good = SMTPSink(port=port).start()
        flaky.append(good)
        want = {f"<flap{i}@client.example>" for i in range(N)}
        got = wait_for_ids(good, want, timeout=30)
        at_flaky = sum(sum(message_ids(s).values()) for s in flaky[:-1])
    finally:
        for s in flaky:
            s.cleanup()
    log = relay.log_text()
    print(
        f"\nflapping next hop: {N} messages, {len(deferrals(log))} deferrals over {len(PHASES)} "
        f"bad phases, "
        f"{sum(got.values())} delivered when it recovered, {at_flaky} taken by the hop that hung "
        f"up "
        f"after the dot (no reply: retried, as RFC 5321 6.1 allows)"
    )
    print("\n".join(report))
    assert got == {m: 1 for m in want}
    assert "status=bounced" not in log and "status=expired" not in log
    assert not [t for t in good.transactions() if t.sender == ""], "a bounce was sent"


class TLSHop(threading.Thread):
    """A next hop offering STARTTLS whose handshake fails (junk after the 220) until ``healed``."""

    def __init__(self, cert: Path, key: Path) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.healed = threading.Event()
        self.stopping = threading.Event()
        self.broken_handshakes = 0
        self.messages: list[bytes] = []  # received over TLS only

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()
        self.listener.close()

    def serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            f = conn.makefile("rb")
            conn.sendall(b"220 tls-hop.example ESMTP\r\n")
            f.readline()
            conn.sendall(b"250-tls-hop.example\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
            if f.readline() != b"STARTTLS\r\n":
                return  # nothing in plaintext here
            conn.sendall(b"220 2.0.0 Ready to start TLS\r\n")
            if not self.healed.is_set():
                self.broken_handshakes += 1
                conn.sendall(
                    b"\x15\x03\x03\x00\x02\x02\x28" + b"not TLS at all\r\n"
                )  # a fatal alert, junk
                return
            tls = self.ctx.wrap_socket(conn, server_side=True)
            g = tls.makefile("rb")
            while line := g.readline():
                if line.startswith((b"EHLO", b"HELO")):
                    tls.sendall(b"250-tls-hop.example\r\n250 PIPELINING\r\n")
                elif line.startswith((b"MAIL", b"RCPT", b"RSET", b"NOOP")):
                    tls.sendall(b"250 2.0.0 ok\r\n")
                elif line.startswith(b"DATA"):
                    tls.sendall(b"354 go ahead\r\n")
                    text = b""
                    while (ln := g.readline()) not in (b".\r\n", b""):
                        text += ln
                    self.messages.append(text)
                    tls.sendall(b"250 2.0.0 queued\r\n")
                elif line.startswith(b"QUIT"):
                    tls.sendall(b"221 2.0.0 bye\r\n")
                    break
                else:
                    tls.sendall(b"500 5.5.2 what\r\n")
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()


def test_tls_handshake_failures_defer_until_the_hop_heals(relays, tmp_path):
    _, cert, key = make_certs(tmp_path, "tls-hop.example")
    hop = TLSHop(cert, key)
    hop.start()
    try:
        relay = relays(route_to(hop.port, extra=CONFIG, route_extra='tls = "encrypt"\n'))
        with smtplib.SMTP("127.0.0.1", relay.port) as client:
            for i in range(N):
                body = f"Message-ID: <tls{i}@client.example>\r\nSubject: {i}\r\n\r\nbody {i}\r\n"
                client.sendmail("s@example.org", [f"r{i}@example.test"], body.encode())
        failed = wait_deferrals(relay, 0, 2 * N)
        hop.healed.set()
        deadline = time.monotonic() + 30
        while len(hop.messages) < N and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        hop.stopping.set()
        hop.join(5)
    ids = Counter(
        next(ln for ln in m.split(b"\r\n") if ln.startswith(b"Message-ID:")) for m in hop.messages
    )
    log = relay.log_text()
    print(
        f"\nTLS handshake failures: {hop.broken_handshakes} broken handshakes, {len(failed)} "
        f"deferrals (e.g. {failed[0] if failed else '-'}); healed → {len(hop.messages)} messages "
        f"over TLS, {len(ids)} distinct, none in plaintext"
    )
    assert len(failed) >= 2 * N and all("4.7.5" in d or "tls" in d.lower() for d in failed), failed[
        :3
    ]
    assert len(ids) == N and set(ids.values()) == {1}
    assert "status=bounced" not in log
