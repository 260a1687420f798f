"""Mail in, mail out: a real ``twistd -n mailrelay`` between Python clients and Postfix's
smtp-sink."""

from __future__ import annotations

import smtplib
import socket
import subprocess
import time

import pytest

from tests.support.peers import SMTPSink, free_port, require
from tests.support.relay import RelayProcess

pytestmark = pytest.mark.integration


def route_to(port: int, domains: str = '["*"]', extra: str = "") -> str:
    return (
        f'{extra}\n[[routes]]\ntype = "static"\ndomains = {domains}\nhosts = ["127.0.0.1:{port}"]\n'
    )


def message(i: int) -> bytes:
    """A message whose body has dot lines (stuffing) and a long-ish line, unique by Message-ID."""
    return (
        f"From: sender@example.org\r\nTo: rcpt@example.test\r\nSubject: test {i}\r\n"
        f"Message-ID: <m{i}@example.org>\r\n\r\n"
        f"Hello {i}.\r\n.\r\n..two dots\r\n. space\r\n" + "x" * 900 + "\r\nlast line\r\n"
    ).encode()


@pytest.fixture
def relay_factory():
    relays: list[RelayProcess] = []

    def make(body: str, **kw) -> RelayProcess:
        relay = RelayProcess(body, **kw)
        relays.append(relay)
        return relay.start()

    yield make
    for relay in relays:
        relay.cleanup()


def split_received(data: bytes) -> tuple[bytes, bytes]:
    """Our Received header (first, folded) and the rest of the message."""
    assert data.startswith(b"Received: "), data[:200]
    end = 0
    while True:
        nl = data.index(b"\r\n", end) + 2
        end = nl
        if data[nl : nl + 1] not in (b" ", b"\t"):
            return data[:end], data[end:]


def pipelined_send(port: int, messages: list[tuple[str, list[str], bytes]]) -> list[bytes]:
    """One session, each transaction's MAIL, RCPTs and DATA sent in one write (RFC 2920)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    f = s.makefile("rb")

    def reply() -> bytes:
        lines = []
        while True:
            line = f.readline()
            assert line, "connection closed"
            lines.append(line)
            if line[3:4] == b" ":
                return b"".join(lines)

    assert reply().startswith(b"220")
    s.sendall(b"EHLO client.example.org\r\n")
    assert b"PIPELINING" in reply()
    finals = []
    for sender, rcpts, data in messages:
        batch = f"MAIL FROM:<{sender}>\r\n".encode()
        batch += b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts)
        s.sendall(batch + b"DATA\r\n")
        for _ in range(1 + len(rcpts)):
            assert reply().startswith(b"250")
        assert reply().startswith(b"354")
        stuffed = b"".join(
            b"." + line if line.startswith(b".") else line
            for line in data.splitlines(keepends=True)
        )
        s.sendall(stuffed + b".\r\n")
        finals.append(reply())
    s.sendall(b"QUIT\r\n")
    assert reply().startswith(b"221")
    s.close()
    return finals


def test_fifty_messages_arrive_byte_for_byte_with_our_received_header(smtp_sink, relay_factory):
    relay = relay_factory(route_to(smtp_sink.port))
    sent = {}
    rcpts = ["a@example.test", "b@example.test", "c@other.test"]
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.example.org") as client:
        for i in range(40):
            data = message(i)
            sent[f"<m{i}@example.org>"] = data
            client.sendmail("sender@example.org", rcpts, data)
    batch = [("sender@example.org", rcpts, message(i)) for i in range(40, 50)]
    finals = pipelined_send(relay.port, batch)
    assert all(f.startswith(b"250 2.0.0") for f in finals), finals
    sent.update({f"<m{i}@example.org>": message(i) for i in range(40, 50)})

    smtp_sink.wait_for(50)
    got = {}
    for t in smtp_sink.transactions():
        received, rest = split_received(t.data)
        assert b"by relay.mailrelay.test" in received
        assert t.sender == "sender@example.org"
        assert sorted(t.recipients) == sorted(rcpts)
        msgid = next(line for line in rest.split(b"\r\n") if line.startswith(b"Message-ID: "))
        got[msgid.split(b": ", 1)[1].decode()] = rest
    assert got == sent
    # delivered mail leaves the queue
    deadline = time.monotonic() + 10
    while relay.queue_files() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in relay.queue_files() if not p.name.endswith(".sock")]


def test_next_hop_down_at_first_is_retried_and_delivered(relay_factory):
    port = free_port()
    relay = relay_factory(route_to(port, extra='[queue]\nretry_schedule = ["1s"]\n'))
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.sendmail("sender@example.org", ["rcpt@example.test"], message(1))
    time.sleep(1.5)  # at least one attempt fails: nothing listens yet
    sink = SMTPSink(port=port).start()
    try:
        (raw,) = sink.wait_for(1, timeout=20)
        assert split_received(sink.transactions()[0].data)[1] == message(1)
    finally:
        sink.stop()


def test_message_survives_sigkill_between_250_and_delivery(relay_factory):
    # The first next hop never answers DATA: the message is in flight when the relay is killed.
    stuck = SMTPSink(flags=["-w", "60"], dump=False).start()
    good = SMTPSink().start()
    try:
        relay = relay_factory(route_to(stuck.port))
        with smtplib.SMTP("127.0.0.1", relay.port) as client:
            client.sendmail("sender@example.org", ["rcpt@example.test"], message(7))
        relay.kill()
        # Same spool, same port, the next hop now works.
        again = RelayProcess(route_to(good.port), port=relay.port, directory=relay.dir)
        again.start()
        try:
            good.wait_for(1, timeout=20)
            assert split_received(good.transactions()[0].data)[1] == message(7)
        finally:
            again.stop()
    finally:
        stuck.stop()
        good.stop()


def test_untrusted_client_cannot_relay_but_may_send_to_local_domains(smtp_sink, relay_factory):
    body = (
        '[server]\ntrusted_networks = ["192.0.2.0/24"]\nlocal_domains = ["example.test"]\n'
        + route_to(smtp_sink.port)
    )
    relay = relay_factory(body)
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        client.ehlo("client.example.org")
        client.mail("sender@example.org")
        code, text = client.rcpt("victim@elsewhere.example")
        assert (code, text[:5]) == (554, b"5.7.1")
        code, text = client.rcpt("user%elsewhere.example@example.test")
        assert code == 554, "the %-hack must not relay"
        assert client.rcpt("user@example.test")[0] == 250
        code, _ = client.data(message(3))
        assert code == 250
    (raw,) = smtp_sink.wait_for(1)
    assert smtp_sink.transactions()[0].recipients == ["user@example.test"]


def test_bad_input_gets_clear_replies_and_the_session_survives(smtp_sink, relay_factory):
    relay = relay_factory(route_to(smtp_sink.port, extra="[server]\nmax_message_size = 4096\n"))
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        assert client.docmd("MAIL FROM:<a@example.org>")[0] == 503  # before EHLO
        client.ehlo("client.example.org")
        assert client.docmd("RCPT TO:<b@example.test>")[0] == 503  # before MAIL
        assert client.docmd("X" * 2000)[0] == 500  # overlong line
        assert client.docmd("MAIL FROM:<not an address>")[0] == 501
        assert client.docmd("FROB")[0] == 500
        client.mail("a@example.org")
        client.rcpt("b@example.test")
        code, text = client.data(
            b"Subject: big\r\n\r\n" + b"y" * 998 + b"\r\n" * 1 + (b"z" * 100 + b"\r\n") * 100
        )
        assert (code, text[:5]) == (552, b"5.3.4")
        assert client.noop()[0] == 250
        # the session still works for a good message
        client.sendmail("a@example.org", ["b@example.test"], message(9))
    smtp_sink.wait_for(1)
    assert split_received(smtp_sink.transactions()[0].data)[1] == message(9)


def test_duplicate_recipients_reach_the_next_hop_once(smtp_sink, relay_factory):
    """Each RCPT gets its 250; the queued envelope, and so the next hop, has the mailbox once."""
    relay = relay_factory(route_to(smtp_sink.port))
    rcpts = ["dup@local.test", "dup@local.test", "dup@LOCAL.TEST", "other@local.test"]
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.example.org") as client:
        assert client.sendmail("sender@example.org", rcpts, message(7)) == {}
    smtp_sink.wait_for(1)
    assert [t.recipients for t in smtp_sink.transactions()] == [
        ["dup@local.test", "other@local.test"]
    ]


def test_trusted_clients_are_not_held_to_the_per_ip_cap(smtp_sink, relay_factory):
    """Postfix exempts mynetworks from its client limits: 127.0.0.1 (trusted by default) keeps 20
    sessions open at once under max_connections_per_ip = 10, and smtp-source -s 50 gets all
    through."""
    relay = relay_factory("[server]\nmax_connections_per_ip = 10\n" + route_to(smtp_sink.port))
    held = [socket.create_connection(("127.0.0.1", relay.port), timeout=10) for _ in range(20)]
    try:
        greetings = [s.makefile("rb").readline() for s in held]
        assert all(g.startswith(b"220 ") for g in greetings), greetings
    finally:
        for s in held:
            s.close()
    subprocess.run(
        [
            require("smtp-source"),
            "-s",
            "50",
            "-m",
            "100",
            "-l",
            "300",
            "-N",
            "-f",
            "s@example.org",
            "-t",
            "r@example.test",
            f"127.0.0.1:{relay.port}",
        ],
        check=True,
        timeout=60,
        stdout=subprocess.DEVNULL,
    )
    smtp_sink.wait_for(100)
