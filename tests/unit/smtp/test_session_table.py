"""The server session at its sans-I/O seam, as tables: bytes in, reply lines out.

No Twisted transport: ``Session`` is driven directly, its replies collected by a fake
``SessionOutput``; the clock is ``task.Clock``, the store a recording sink.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from mailrelay.envelope import SessionInfo
from mailrelay.intake import Intake
from mailrelay.policy import Policy, PolicyChain
from mailrelay.policy.access import RelayAccess
from mailrelay.smtp import _states as S
from mailrelay.smtp.session import Session
from mailrelay.smtp.settings import SessionSettings
from tests.support.smtp.fakes import RecordingSink

HOST = "mx.example.test"
GREETING = f"220 {HOST} ESMTP mailrelay"
EHLO = [
    f"250-{HOST} Hello client.example [192.0.2.7]",
    "250-PIPELINING",
    "250-SIZE 52428800",
    "250-8BITMIME",
    "250-ENHANCEDSTATUSCODES",
    "250-SMTPUTF8",
    "250-DSN",
    "250 CHUNKING",
]
ENVELOPE = b"EHLO client.example\r\nMAIL FROM:<a@client.example>\r\nRCPT TO:<b@example.test>\r\n"
ACCEPTED = ["250 2.1.0 Ok", "250 2.1.5 Ok"]
NEED_HELO = "503 5.5.1 Error: send HELO/EHLO first"
NEED_MAIL = "503 5.5.1 Error: need MAIL command"
BARE_LF = "550 5.6.0 Error: bare <CR> or <LF> in message text; dropped"


class Output:
    """A ``SessionOutput`` that keeps what the session does to its connection."""

    def __init__(self) -> None:
        self.data = b""
        self.closed = False
        self.paused = False
        self.tls_started = False

    def write(self, data: bytes) -> None:
        self.data += data

    def lose_connection(self) -> None:
        self.closed = True

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def start_tls(self) -> None:
        self.tls_started = True

    def lines(self) -> list[str]:
        return self.data.decode().split("\r\n")[:-1]


def run(
    data: bytes, policy: object = None, hopcount_limit: int = 50, **settings: object
) -> tuple[Session, Output, RecordingSink]:
    out, sink = Output(), RecordingSink()
    session = Session(
        SessionSettings(HOST, intake=Intake(hopcount_limit=hopcount_limit), **settings),  # type: ignore[arg-type]  # test kwargs
        SessionInfo("192.0.2.7", 40000, hostname=HOST),
        sink,
        policy if policy is not None else PolicyChain([Policy()]),  # type: ignore[arg-type]
        Clock(),
        out,
    )
    session.start()
    session.data_received(data)
    return session, out, sink


TABLE: list[tuple[str, bytes, list[str]]] = [
    ("the greeting comes first", b"", [GREETING]),
    ("HELO, then QUIT", b"HELO client.example\r\nQUIT\r\n", [f"250 {HOST}", "221 2.0.0 Bye"]),
    ("EHLO lists the extensions", b"EHLO client.example\r\n", EHLO),
    ("HELO needs a name", b"HELO\r\n", ["501 5.5.4 Syntax: HELO/EHLO hostname"]),
    ("MAIL before HELO", b"MAIL FROM:<a@b.example>\r\n", [NEED_HELO]),
    ("RCPT before HELO", b"RCPT TO:<a@b.example>\r\n", [NEED_HELO]),
    ("DATA before HELO", b"DATA\r\n", [NEED_HELO]),
    ("RCPT before MAIL", b"HELO c\r\nRCPT TO:<a@b.example>\r\n", ["250 " + HOST, NEED_MAIL]),
    ("DATA before MAIL", b"HELO c\r\nDATA\r\n", ["250 " + HOST, NEED_MAIL]),
    (
        "a second MAIL",
        b"HELO c\r\nMAIL FROM:<a@b.example>\r\nMAIL FROM:<a@b.example>\r\n",
        ["250 " + HOST, "250 2.1.0 Ok", "503 5.5.1 Error: nested MAIL command"],
    ),
    (
        "DATA with no recipient",
        b"HELO c\r\nMAIL FROM:<a@b.example>\r\nDATA\r\n",
        ["250 " + HOST, "250 2.1.0 Ok", "503 5.5.1 Error: need RCPT command"],
    ),
    (
        "a message, pipelined",
        ENVELOPE + b"DATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n",
        [
            *EHLO,
            *ACCEPTED,
            "354 End data with <CR><LF>.<CR><LF>",
            "250 2.0.0 Ok: queued as Q0001",
            "221 2.0.0 Bye",
        ],
    ),
    (
        "a message in one BDAT chunk",
        ENVELOPE + b"BDAT 7 LAST\r\nhello\r\n",
        [*EHLO, *ACCEPTED, "250 2.0.0 Ok: queued as Q0001"],
    ),
    (
        "BDAT out of sequence: its octets are read, never obeyed",
        b"HELO c\r\nBDAT 6\r\nNOOP\r\nNOOP\r\n",
        ["250 " + HOST, NEED_MAIL, "250 2.0.0 Ok"],
    ),
    (
        "BDAT without a size ends the session",
        b"HELO c\r\nBDAT\r\nNOOP\r\n",
        ["250 " + HOST, "501 5.5.4 Syntax: BDAT size [LAST]"],
    ),
    (
        "parameters need EHLO",
        b"HELO c\r\nMAIL FROM:<a@b.example> SIZE=10\r\n",
        ["250 " + HOST, "555 5.5.4 Error: parameters need EHLO"],
    ),
    (
        "SIZE over the limit",
        b"EHLO client.example\r\nMAIL FROM:<a@b.example> SIZE=52428801\r\n",
        [*EHLO, "552 5.3.4 Message size exceeds fixed maximum message size"],
    ),
    (
        "an unknown parameter",
        b"EHLO client.example\r\nMAIL FROM:<a@b.example> FOO=1\r\n",
        [*EHLO, "555 5.5.4 Unsupported option: FOO"],
    ),
    (
        "a bad NOTIFY",
        ENVELOPE[:-2] + b" NOTIFY=SOMETIMES\r\n",
        [*EHLO, "250 2.1.0 Ok", "501 5.5.4 Bad NOTIFY parameter"],
    ),
    (
        "a non-ASCII address needs SMTPUTF8",
        "EHLO client.example\r\nMAIL FROM:<ä@b.example>\r\n".encode(),
        [*EHLO, "553 5.6.7 Error: non-ASCII address requires SMTPUTF8"],
    ),
    ("an unknown command", b"FOO\r\n", ["500 5.5.2 Error: command not recognized"]),
    (
        "HTTP ends the session",
        b"GET / HTTP/1.1\r\nNOOP\r\n",
        ["502 5.5.1 Error: this is an SMTP server, not an HTTP proxy"],
    ),
    (
        "a bare LF in a command",
        b"NOOP\nNOOP\r\n",
        ["500 5.5.2 Error: bare <CR> or <LF> in command"],
    ),
    (
        "RSET, NOOP, VRFY, EXPN",
        b"RSET\r\nNOOP\r\nVRFY x\r\nVRFY\r\nEXPN x\r\n",
        [
            "250 2.0.0 Ok",
            "250 2.0.0 Ok",
            "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
            "501 5.5.4 Syntax: VRFY address",
            "502 5.5.1 Error: command not implemented",
        ],
    ),
    (
        "HELP names the commands",
        b"HELP\r\n",
        [
            "214 2.0.0 Commands: AUTH BDAT DATA EHLO EXPN HELO HELP MAIL NOOP QUIT RCPT RSET"
            " STARTTLS VRFY"
        ],
    ),
    (
        "AUTH when not enabled",
        b"EHLO client.example\r\nAUTH PLAIN\r\n",
        [*EHLO, "503 5.5.1 Error: authentication not enabled"],
    ),
    ("STARTTLS when not offered", b"STARTTLS\r\n", ["502 5.5.1 Error: command not implemented"]),
    (
        "a bare LF in the text rejects the message",
        ENVELOPE + b"DATA\r\nline\nmore\r\n.\r\n",
        [*EHLO, *ACCEPTED, "354 End data with <CR><LF>.<CR><LF>", BARE_LF],
    ),
    (
        "LF.LF does not end the data",
        ENVELOPE + b"DATA\r\nx\n.\nMAIL FROM:<evil@example>\r\n.\r\n",
        [*EHLO, *ACCEPTED, "354 End data with <CR><LF>.<CR><LF>", BARE_LF],
    ),
]


@pytest.mark.parametrize(("data", "replies"), [row[1:] for row in TABLE], ids=[r[0] for r in TABLE])
def test_session_answers(data: bytes, replies: list[str]) -> None:
    _, out, _ = run(data)
    assert out.lines() == ([GREETING] if replies[:1] != [GREETING] else []) + replies


def test_the_message_is_stored_behind_our_received_header() -> None:
    _, _, sink = run(ENVELOPE + b"DATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\n")
    (writer,) = sink.committed
    assert writer.data.startswith(
        b"Received: from client.example ([192.0.2.7])\r\n\tby " + HOST.encode()
    )
    assert writer.data.endswith(b"\r\nSubject: hi\r\n\r\nbody\r\n")


def test_text_that_would_extend_our_header_is_set_apart() -> None:
    _, _, sink = run(ENVELOPE + b"DATA\r\n by trusted.example\r\n.\r\n")
    assert b"\r\n\r\n by trusted.example\r\n" in sink.committed[0].data


def test_too_many_received_headers_is_a_loop() -> None:
    hops = b"Received: from a\r\nReceived: from b\r\n"
    _, out, sink = run(ENVELOPE + b"DATA\r\n" + hops + b"\r\nx\r\n.\r\n", hopcount_limit=3)
    assert out.lines()[-1] == "554 5.4.6 Error: too many hops (mail loop?)"
    assert not sink.committed and sink.writers[0].aborted


def test_relay_access_refuses_a_foreign_domain() -> None:
    access = RelayAccess((), ["example.test"], [])
    _, out, _ = run(
        b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@elsewhere.example>\r\n",
        policy=PolicyChain([access]),
    )
    assert out.lines()[-1] == "554 5.7.1 <x@elsewhere.example>: Relay access denied"


def test_quit_closes_the_connection_and_the_session() -> None:
    session, out, _ = run(b"QUIT\r\nNOOP\r\n")
    assert out.closed and session.state is S.CLOSED and out.lines()[-1] == "221 2.0.0 Bye"


def test_every_command_of_the_table_has_its_handler() -> None:
    for (state, verb), name in S.COMMANDS.items():
        assert state in (S.GREETED, S.READY, S.MAIL), (state, verb)
        assert callable(getattr(Session, name)), name


def test_a_move_the_table_does_not_list_is_refused() -> None:
    session, out, _ = run(b"")
    assert session.state is S.GREETED
    with pytest.raises(S.TransitionError):
        session._move(S.AUTH)
    assert session.state is S.GREETED
    for state, targets in S.TRANSITIONS.items():
        assert S.CLOSED in targets, state  # any state may close
