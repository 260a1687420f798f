"""In-memory tests of the ESMTP server: every rule of the session, over a StringTransport."""

from __future__ import annotations

import ipaddress

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from mailrelay.config import ServerConfig
from mailrelay.envelope import Recipient, Reply
from mailrelay.errors import TemporaryFailure
from mailrelay.listener import reconfigure, server_factory
from tests.support.smtp.fakes import Conn, DeferredPolicy, RecordingSink, stuff

MSG = b"Subject: hello\r\n\r\nline one\r\n.dot line\r\n"


def transaction(
    c: Conn, rcpts=("user@example.test",), message: bytes = MSG, sender="a@example.org"
) -> None:
    c.send(f"MAIL FROM:<{sender}>\r\n")
    for r in rcpts:
        c.send(f"RCPT TO:<{r}>\r\n")
    c.send("DATA\r\n")
    c.send(stuff(message))


def test_greeting_and_ehlo_extensions() -> None:
    c = Conn()
    out = c.output().decode()
    assert out == "220 mx.example.test ESMTP mailrelay\r\n"
    c.send("EHLO client.example.org\r\n")
    lines = c.output().decode().split("\r\n")
    assert lines[0] == "250-mx.example.test Hello client.example.org [192.0.2.10]"
    keywords = {line[4:] for line in lines[1:] if line}
    assert {
        "PIPELINING",
        "SIZE 52428800",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "DSN",
    } <= keywords


def test_helo_is_plain_smtp_without_parameters() -> None:
    c = Conn()
    c.replies()
    c.send("HELO client.example.org\r\n")
    assert c.replies() == [(250, "mx.example.test")]
    c.send("MAIL FROM:<a@example.org> SIZE=10\r\n")
    assert c.codes() == [555]
    transaction(c)
    assert c.codes()[-1] == 250
    assert c.sink.committed[0].envelope.protocol == "SMTP"


def test_full_transaction_streams_received_header_then_body() -> None:
    clock = Clock()
    clock.advance(1_800_000_000)  # 2027-01-15 08:00:00 UTC
    c = Conn(clock=clock)
    c.ehlo()
    transaction(c)
    assert c.replies() == [
        (250, "2.1.0 Ok"),
        (250, "2.1.5 Ok"),
        (354, "End data with <CR><LF>.<CR><LF>"),
        (250, "2.0.0 Ok: queued as Q0001"),
    ]
    (w,) = c.sink.committed
    assert w.data == (
        b"Received: from client.example.org ([192.0.2.10])\r\n"
        b"\tby mx.example.test (mailrelay) with ESMTP id Q0001\r\n"
        b"\tfor <user@example.test>; Fri, 15 Jan 2027 08:00:00 +0000\r\n" + MSG
    )
    env = w.envelope
    assert (env.sender, env.recipients, env.helo, env.client_address, env.received_at) == (
        "a@example.org",
        (Recipient("user@example.test"),),
        "client.example.org",
        "192.0.2.10",
        1_800_000_000,
    )


def test_received_header_for_several_recipients_and_ipv6() -> None:
    c = Conn(client="::1", config=ServerConfig(hostname="mx.example.test"))  # ::1 is trusted
    c.ehlo()
    transaction(c, rcpts=("a@x.example", "b@y.example"))
    data = c.sink.committed[0].data
    assert data.startswith(
        b"Received: from client.example.org ([IPv6:::1])\r\n\tby mx.example.test (mailrelay) "
        b"with ESMTP id Q0001;\r\n\tThu, 01 Jan 1970 00:00:00 +0000\r\n"
    )


def test_250_only_after_commit_fires() -> None:
    sink = RecordingSink(auto_commit=False)
    c = Conn(sink=sink)
    c.ehlo()
    transaction(c)
    c.send("NOOP\r\n")  # pipelined behind the final dot: must wait its turn
    assert c.codes() == [250, 250, 354]
    (w,) = sink.writers
    assert w.data.endswith(MSG) and not w.committed
    w.fire()
    assert c.replies() == [(250, "2.0.0 Ok: queued as Q0001"), (250, "2.0.0 Ok")]


def test_commit_temporary_failure_gives_its_reply_and_session_goes_on() -> None:
    sink = RecordingSink(auto_commit=False)
    c = Conn(sink=sink)
    c.ehlo()
    transaction(c)
    c.replies()
    sink.writers[0].commit_d.errback(
        TemporaryFailure(Reply(452, "4.3.1", "Insufficient system storage"))
    )
    assert c.replies() == [(452, "4.3.1 Insufficient system storage")]
    assert sink.writers[0].aborted
    sink.auto_commit = True
    transaction(c)
    assert c.codes()[-1] == 250


def test_commit_crash_is_451_not_a_lost_session() -> None:
    sink = RecordingSink(auto_commit=False)
    c = Conn(sink=sink)
    c.ehlo()
    transaction(c)
    c.replies()
    sink.writers[0].commit_d.errback(OSError("disk on fire"))
    assert c.codes() == [451]
    c.send("NOOP\r\n")
    assert c.codes() == [250]


@pytest.mark.parametrize(
    "commands, codes",
    [
        (["MAIL FROM:<a@example.org>"], [503]),  # before EHLO
        (["EHLO c", "RCPT TO:<u@example.test>"], [250, 503]),  # before MAIL
        (["EHLO c", "DATA"], [250, 503]),
        (["EHLO c", "MAIL FROM:<a@example.org>", "DATA"], [250, 250, 503]),
        (["EHLO c", "MAIL FROM:<a@example.org>", "MAIL FROM:<a@example.org>"], [250, 250, 503]),
        (
            ["EHLO c", "MAIL FROM:<a@example.org>", "RCPT TO:<x@elsewhere.example>", "DATA"],
            [250, 250, 554, 554],
        ),
        (
            ["EHLO c", "MAIL FROM:<a@example.org>", "RSET", "RCPT TO:<u@example.test>"],
            [250, 250, 250, 503],
        ),
        (
            ["EHLO c", "MAIL FROM:<a@example.org>", "EHLO c", "RCPT TO:<u@example.test>"],
            [250, 250, 250, 503],
        ),
        (["FROB"], [500]),
        (["X" * 2000, "NOOP"], [500, 250]),
        (["EHLO"], [501]),
        (["EHLO c", "MAIL FROM:<not an address>"], [250, 501]),
        (["EHLO c", "MAIL FROM:a@example.org"], [250, 501]),
        (["EHLO c", "MAIL FROM:<a@example.org> FOO=1"], [250, 555]),
        (["EHLO c", "MAIL FROM:<a@example.org> SIZE=52428801"], [250, 552]),
        (["EHLO c", "MAIL FROM:<a@example.org> SIZE=52428800"], [250, 250]),
        (["EHLO c", "MAIL FROM:<a@example.org> BODY=9BIT"], [250, 501]),
        (["EHLO c", "MAIL FROM:<a@example.org>", "RCPT TO:<>"], [250, 250, 501]),
        (["EHLO c", "MAIL FROM:<a@example.org>", "RCPT TO:<Postmaster>"], [250, 250, 250]),
        (["VRFY someone", "EXPN list", "HELP", "NOOP", "RSET"], [252, 502, 214, 250, 250]),
        (["DATA extra"], [503]),
        (["EHLO c", "RSET x"], [250, 501]),
    ],
)
def test_sequence_and_syntax_rules(commands: list[str], codes: list[int]) -> None:
    c = Conn()
    c.replies()
    c.send("".join(cmd + "\r\n" for cmd in commands))
    assert c.codes() == codes
    assert not c.closed


def test_enhanced_codes_on_errors() -> None:
    c = Conn()
    c.replies()
    c.send("MAIL FROM:<a@example.org>\r\nFROB\r\n" + "Y" * 600 + "\r\n")
    assert [text[:5] for _, text in c.replies()] == ["5.5.1", "5.5.2", "5.5.2"]


def test_oversize_message_is_discarded_552_and_session_goes_on() -> None:
    config = ServerConfig(
        hostname="mx.example.test", local_domains=("example.test",), max_message_size=4096
    )
    c = Conn(config=config)
    c.ehlo()
    transaction(
        c,
        message=b"Subject: big\r\n\r\n" + b"z" * 100 + b"\r\n" * 100 + (b"q" * 500 + b"\r\n") * 20,
    )
    assert c.replies()[-1] == (552, "5.3.4 Error: message size exceeds fixed limit")
    (w,) = c.sink.writers
    assert w.aborted and not w.committed
    assert len(w.data) < 4096 + 300  # the text stopped flowing once over the limit
    transaction(c)
    assert c.codes()[-1] == 250
    assert len(c.sink.committed) == 1


@pytest.mark.parametrize(
    "message, reply",
    [
        (b"Subject: x\r\n\r\nbare\nlf\r\n", (550, "5.6.0")),
        (b"Subject: x\r\n\r\nbare\rcr\r\n", (550, "5.6.0")),
        (b"Subject: x\r\n\r\n" + b"w" * 1200 + b"\r\n", (550, "5.6.0")),
    ],
)
def test_bad_text_is_dropped_with_5_6_0(message: bytes, reply: tuple[int, str]) -> None:
    c = Conn()
    c.ehlo()
    transaction(c, message=message)
    code, text = c.replies()[-1]
    assert (code, text[:5]) == reply
    assert not c.sink.committed and c.sink.writers[0].aborted
    c.send("NOOP\r\n")
    assert c.codes() == [250]


def test_smuggling_attempt_is_one_rejected_message_not_two() -> None:
    c = Conn()
    c.ehlo()
    c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\nDATA\r\n")
    c.send(
        b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<user@example.test>\r\n"
        b"DATA\r\nsmuggled\r\n.\r\n"
    )
    assert c.codes() == [250, 250, 354, 550]
    assert len(c.sink.writers) == 1 and not c.sink.committed


def test_client_vanishing_mid_data_aborts_the_writer() -> None:
    c = Conn()
    c.ehlo()
    c.send(
        "MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\nDATA\r\nSubject: x\r\n\r\npart"
    )
    c.proto.connectionLost(None)
    (w,) = c.sink.writers
    assert w.aborted and not w.committed


def test_pipelined_commands_with_deferred_policy_answer_in_order() -> None:
    policy = DeferredPolicy()
    c = Conn(policy=policy)
    c.replies()
    c.send(
        b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n"
        b"RCPT TO:<r1@example.test>\r\nRCPT TO:<bad@example.test>\r\n"
        b"RCPT TO:<r3@example.test>\r\nDATA\r\n"
    )
    answers = [None, None, None, Reply(550, "5.1.1", "no such user"), None, None]
    expected = [250, 250, 250, 550, 250, 354]
    for i, answer in enumerate(answers):
        assert c.codes() == [], "nothing may be answered before its policy"
        assert len(policy.pending) == 1, "one command at a time"
        policy.answer(answer)
        got = c.codes()
        assert got == [expected[i]]
    c.send(stuff(MSG) + b"QUIT\r\n")
    assert policy.answer() == "end_of_data"
    assert c.codes() == [250, 221]
    assert [r.address for r in c.sink.committed[0].envelope.recipients] == [
        "r1@example.test",
        "r3@example.test",
    ]


def test_buffered_input_is_bounded_while_a_policy_thinks() -> None:
    policy = DeferredPolicy()
    c = Conn(policy=policy)
    paused = []
    c.transport.pauseProducing = lambda: paused.append(True)  # type: ignore[method-assign]
    c.transport.resumeProducing = lambda: paused.append(False)  # type: ignore[method-assign]
    c.send("EHLO c\r\n")
    for _ in range(300):
        c.send(b"NOOP\r\n" * 200)
    assert paused == [True]
    policy.answer()
    assert paused == [True, False]
    assert c.codes().count(250) == 1 + 300 * 200


def test_policy_objections_at_each_stage() -> None:
    policy = DeferredPolicy()
    c = Conn(policy=policy)
    c.replies()
    c.send("EHLO c\r\n")
    policy.answer(Reply(550, "5.7.1", "go away"))
    c.send("EHLO c\r\n")
    policy.answer()
    c.send("MAIL FROM:<a@example.org>\r\n")
    policy.answer(Reply(553, "5.7.1", "sender refused"))
    c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n")
    policy.answer()
    policy.answer()
    policy.answer(Reply(554, "5.7.1", "no data for you"))
    assert c.codes() == [550, 250, 553, 250, 250, 554]
    assert not c.sink.writers
    c.send("DATA\r\n")
    policy.answer()
    c.send(stuff(MSG))
    policy.answer(Reply(554, "5.7.1", "content refused"))
    assert c.codes() == [354, 554]
    assert c.sink.writers[0].aborted and not c.sink.committed


def test_policy_that_crashes_gives_451_and_the_session_survives() -> None:
    policy = DeferredPolicy()
    c = Conn(policy=policy)
    c.replies()
    c.send("EHLO c\r\n")
    policy.pending.pop(0)[2].errback(RuntimeError("ldap exploded"))
    c.send("EHLO c\r\n")
    policy.answer()
    assert c.codes() == [451, 250]


def test_too_many_recipients_452() -> None:
    config = ServerConfig(
        hostname="mx.example.test", local_domains=("example.test",), max_recipients=3
    )
    c = Conn(config=config)
    c.ehlo()
    c.send(
        "MAIL FROM:<a@example.org>\r\n"
        + "".join(f"RCPT TO:<u{i}@example.test>\r\n" for i in range(5))
    )
    replies = c.replies()
    assert [code for code, _ in replies] == [250, 250, 250, 250, 452, 452]
    assert replies[-1][1].startswith("4.5.3")


def test_too_many_errors_421_and_close() -> None:
    config = ServerConfig(hostname="mx.example.test", max_errors=3)
    c = Conn(config=config)
    c.replies()
    c.send("FROB\r\nFROB\r\n")
    assert not c.closed
    c.send("FROB\r\nNOOP\r\n")
    assert c.codes() == [500, 500, 500, 421]
    assert c.closed


def test_http_verbs_get_502_and_close() -> None:
    c = Conn()
    c.replies()
    c.send("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert c.codes() == [502]
    assert c.closed


def test_idle_timeout_and_data_timeout() -> None:
    config = ServerConfig(
        hostname="mx.example.test",
        local_domains=("example.test",),
        idle_timeout=300,
        data_timeout=60,
    )
    c = Conn(config=config)
    c.ehlo()
    c.clock.advance(299)
    c.send("NOOP\r\n")  # activity re-arms the timer
    c.clock.advance(299)
    assert not c.closed
    c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<u@example.test>\r\nDATA\r\npartial\r\n")
    c.replies()
    c.clock.advance(61)
    assert c.replies() == [(421, "4.4.2 Error: timeout exceeded")]
    assert c.closed
    assert c.sink.writers[0].aborted


def test_no_timeout_while_the_server_itself_is_slow() -> None:
    policy = DeferredPolicy()
    c = Conn(policy=policy)
    c.send("EHLO c\r\n")
    c.clock.advance(1000)
    assert not c.closed
    policy.answer()
    c.clock.advance(299)  # the client has its full timeout from our answer on
    assert not c.closed
    c.clock.advance(2)
    assert c.closed


def test_connection_limits_total_and_per_ip() -> None:
    config = ServerConfig(hostname="mx.example.test", max_connections=3, max_connections_per_ip=2)
    sink, clock = RecordingSink(), Clock()
    from mailrelay.policy import build_policy

    factory = server_factory(config, sink, build_policy(config), clock)
    a1 = Conn(factory=factory, client="192.0.2.1")
    Conn(factory=factory, client="192.0.2.1")
    a3 = Conn(factory=factory, client="192.0.2.1")
    assert (
        a3.replies() == [(421, "4.7.0 Error: too many connections from your address")] and a3.closed
    )
    Conn(factory=factory, client="192.0.2.2")
    b2 = Conn(factory=factory, client="192.0.2.3")
    assert b2.codes() == [421] and b2.closed
    a1.proto.connectionLost(None)
    again = Conn(factory=factory, client="192.0.2.3")
    assert again.codes() == [220]


def test_tcp_nodelay_is_set() -> None:
    from twisted.internet.testing import StringTransport

    calls = []
    StringTransport.setTcpNoDelay = lambda self, on: calls.append(on)  # type: ignore[attr-defined]
    try:
        Conn()
    finally:
        del StringTransport.setTcpNoDelay  # type: ignore[attr-defined]
    assert calls == [True]


TRUSTING = ServerConfig(
    hostname="mx.example.test", trusted_networks=(ipaddress.ip_network("192.0.2.0/24"),)
)


def test_smtputf8_addresses_need_the_parameter() -> None:
    c = Conn(config=TRUSTING)
    c.ehlo()
    c.send("MAIL FROM:<jörg@bücher.example>\r\n")
    assert c.replies() == [(553, "5.6.7 Error: non-ASCII address requires SMTPUTF8")]
    c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<jörg@bücher.example>\r\nRSET\r\n")
    assert c.codes() == [250, 553, 250]
    c.send("MAIL FROM:<jörg@bücher.example> SMTPUTF8\r\nRCPT TO:<ünï@bücher.example>\r\nDATA\r\n")
    c.send(stuff(MSG))
    assert c.codes() == [250, 250, 354, 250]
    env = c.sink.committed[0].envelope
    assert env.smtputf8 and env.sender == "jörg@bücher.example" and env.protocol == "UTF8SMTP"


def test_dsn_parameters_are_stored_with_the_envelope() -> None:
    c = Conn(config=TRUSTING)
    c.ehlo()
    c.send(
        "MAIL FROM:<a@example.org> RET=HDRS ENVID=id+2B1 BODY=8BITMIME SIZE=100\r\n"
        "RCPT TO:<b@x.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+40x.example\r\n"
        "RCPT TO:<c@x.example> NOTIFY=NEVER\r\n"
        "RCPT TO:<d@x.example> NOTIFY=NEVER,SUCCESS\r\n"
        "RCPT TO:<d@x.example> ORCPT=rfc822\r\n"
        "DATA\r\n"
    )
    c.send(stuff(MSG))
    assert c.codes() == [250, 250, 250, 501, 501, 354, 250]
    env = c.sink.committed[0].envelope
    assert (env.ret, env.envid, env.body, env.size) == ("HDRS", "id+1", "8BITMIME", 100)
    assert env.recipients == (
        Recipient("b@x.example", ("SUCCESS", "FAILURE"), "rfc822;b@x.example"),
        Recipient("c@x.example", ("NEVER",)),
    )


@pytest.mark.parametrize(
    "command",
    [
        "MAIL FROM:<a@example.org> ENVID=a+0D+0AX-Injected:+20yes",
        "MAIL FROM:<a@example.org> ENVID=a+00b",
        "RCPT TO:<b@x.example> ORCPT=rfc822;b+0D+0AX-Injected:+20yes",
        "RCPT TO:<b@x.example> ORCPT=rfc822;b+7F@x",
        "RCPT TO:<b@x.example> ORCPT=rfc822;b+C3+A9@x",
        "RCPT TO:<b@x.example> ORCPT=rfc\u0085822;b@x",
    ],
)
def test_envid_and_orcpt_must_encode_printable_ascii(command: str) -> None:
    """They go into the header fields of reports (RFC 3461 4.2, 4.4): a CR, LF or NUL is refused."""
    c = Conn(config=TRUSTING)
    c.ehlo()
    if command.startswith("RCPT"):
        c.send("MAIL FROM:<a@example.org>\r\n")
        assert c.codes() == [250]
    c.send(command + "\r\n")
    ((code, text),) = c.replies()
    assert code == 501 and text.startswith("5.5.4 Bad ")
    c.send("NOOP\r\n")
    assert c.codes() == [250]


def test_postmaster_is_accepted_from_anyone_and_qualified() -> None:
    c = Conn()
    c.ehlo()
    transaction(c, rcpts=("postmaster",))
    assert c.codes()[-1] == 250
    assert c.sink.committed[0].envelope.recipients[0].address == "postmaster@mx.example.test"


def test_session_info_exposed_to_policies() -> None:
    seen = {}

    class Spy(DeferredPolicy):
        def rcpt(self, session, sender, recipient, params):
            seen.update(attrs.asdict(session))
            return None

        def helo(self, session, name):
            return None

        def mail(self, session, sender, params):
            return defer.succeed(None)

    c = Conn(policy=Spy())
    c.ehlo()
    c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<u@example.test>\r\n")
    assert c.codes() == [250, 250]
    assert (
        seen["client_address"] == "192.0.2.10"
        and seen["helo"] == "client.example.org"
        and seen["esmtp"]
    )


def test_client_leaving_while_data_policy_thinks_opens_no_writer() -> None:
    policy = DeferredPolicy()
    c = Conn(policy=policy)
    c.send("EHLO c\r\n")
    policy.answer()
    c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\nDATA\r\n")
    policy.answer()
    policy.answer()
    c.proto.connectionLost(None)
    assert policy.answer() == "data"
    assert c.sink.writers == []


def test_a_bug_in_a_handler_costs_the_session_not_the_server() -> None:
    c = Conn()
    c.ehlo()
    c.server.session._noop = lambda arg: 1 / 0  # type: ignore[method-assign]
    c.send("NOOP\r\n")
    assert c.codes() == [451] and c.closed


def test_one_log_line_per_accepted_message_and_per_connection() -> None:
    from twisted.logger import formatEvent, globalLogPublisher

    lines: list[str] = []

    def observer(event):
        if event.get("log_namespace", "").startswith("mailrelay.smtp"):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    try:
        c = Conn()
        c.ehlo()
        transaction(c)
        c.proto.connectionLost(None)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert lines == [
        "Q0001: client=[192.0.2.10] helo=client.example.org from=<a@example.org>"
        f" size={len(MSG)} nrcpt=1 proto=ESMTP",
        "disconnect from [192.0.2.10]:40000 helo=client.example.org messages=1 errors=0",
    ]


def test_one_byte_at_a_time_cannot_hold_a_session_open() -> None:
    c = Conn()
    c.ehlo()
    for i in range(400):  # "NOOP" never completed: bytes arrive, no command does
        c.send(b"N" if i == 0 else b"O")
        c.clock.advance(1)
    assert c.closed
    assert c.replies()[-1] == (421, "4.4.2 Error: timeout exceeded")


class RecordingObserver:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def __getattr__(self, name):
        return lambda *args: self.events.append((name, *args))


def test_observer_hears_connections_rejections_and_accepted_messages() -> None:
    from mailrelay.config import ServerConfig as SC

    obs = RecordingObserver()
    config = SC(
        hostname="mx.example.test", local_domains=("example.test",), max_connections_per_ip=1
    )
    c = Conn(config=config, observer=obs)
    c.ehlo()
    c.send(
        "FROB\r\n"
        + "Z" * 700
        + "\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<x@elsewhere.example>\r\n"
    )
    transaction(c, sender="b@example.org")  # nested MAIL: 503; its RCPT and DATA join the first
    c.send("RSET\r\n")
    transaction(c)
    Conn(factory=c.factory)  # a second connection from the same address: refused
    c.proto.connectionLost(None)
    names = [e[0] for e in obs.events]
    assert names[0] == "connection_opened" and names[-1] == "connection_closed"
    rejected = [(e[1], e[2].code) for e in obs.events if e[0] == "command_rejected"]
    assert rejected == [("UNKNOWN", 500), ("UNKNOWN", 500), ("RCPT", 554), ("MAIL", 503)]
    accepted = [e for e in obs.events if e[0] == "message_accepted"]
    assert [(e[3], e[4]) for e in accepted] == [("Q0001", len(MSG)), ("Q0002", len(MSG))]
    assert accepted[0][2].sender == "a@example.org"
    assert ("connection_refused", "192.0.2.10") in [e[:2] for e in obs.events]


def test_drain_closes_idle_sessions_now_and_busy_ones_after_their_transaction() -> None:
    sink = RecordingSink(auto_commit=False)
    idle = Conn(sink=sink)
    busy = Conn(factory=idle.factory, client="192.0.2.11")
    idle.ehlo()
    busy.ehlo()
    busy.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\nDATA\r\n")
    busy.send(stuff(MSG) + b"MAIL FROM:<next@example.org>\r\n")  # the next one is pipelined already
    busy.replies()
    bye = Reply(421, "4.3.2", "mx.example.test Service shutting down")
    done = idle.factory.drain(bye)
    assert idle.replies() == [(421, "4.3.2 mx.example.test Service shutting down")] and idle.closed
    idle.proto.connectionLost(None)
    assert not busy.closed and not done.called
    sink.writers[0].fire()  # the message in hand is committed and answered, then the session ends
    assert busy.codes() == [250, 421] and busy.closed
    busy.proto.connectionLost(None)
    assert done.called


def test_close_all_aborts_a_message_in_progress() -> None:
    c = Conn()
    c.ehlo()
    c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\nDATA\r\nSubject: x\r\n")
    c.factory.close_all(Reply(421, "4.3.2", "bye"))
    assert c.closed and c.sink.writers[0].aborted


def test_over_the_recipient_limit_452_is_no_error_and_data_delivers_to_the_accepted() -> None:
    """150 pipelined RCPTs: 100 x 250 and 50 x 452 4.5.3 (RFC 5321 4.5.3.1.10), not 421 errors."""
    c = Conn(
        config=ServerConfig(
            hostname="mx.example.test", max_errors=20, local_domains=("example.test",)
        )
    )
    c.ehlo()
    c.send(
        "MAIL FROM:<a@example.org>\r\n"
        + "".join(f"RCPT TO:<u{i}@example.test>\r\n" for i in range(150))
        + "DATA\r\n"
    )
    codes = c.codes()
    assert codes == [250] + [250] * 100 + [452] * 50 + [354] and not c.closed
    c.send("Subject: x\r\n\r\nhi\r\n.\r\n")
    assert c.codes() == [250]
    assert len(c.sink.committed[0].envelope.recipients) == 100


def test_rcpts_far_past_the_limit_count_as_errors_after_the_overshoot_limit() -> None:
    """A client that never takes 452 4.5.3 for an answer (Postfix's recipient overshoot limit):
    the first ``recipient_overshoot_limit`` extra RCPTs are free, each further one an error."""
    c = Conn(
        config=ServerConfig(
            hostname="mx.example.test",
            max_errors=3,
            max_recipients=2,
            recipient_overshoot_limit=4,
            local_domains=("example.test",),
        )
    )
    c.ehlo()
    c.send(
        "MAIL FROM:<a@example.org>\r\n"
        + "".join(f"RCPT TO:<u{i}@example.test>\r\n" for i in range(8))
    )
    assert c.codes() == [250, 250, 250] + [452] * 6 and not c.closed  # 2 over the free 4: 2 errors
    c.send("RCPT TO:<u8@example.test>\r\n")
    assert c.codes() == [452, 421] and c.closed


def test_a_policy_asking_to_try_later_is_no_client_error() -> None:
    """Greylisting-like 4xx answers are not the client's mistakes; a 5xx refusal still counts."""
    from mailrelay.policy import Policy, PolicyChain

    class Later(Policy):
        def rcpt(self, session, sender, recipient, params):
            if recipient.startswith("later"):
                return Reply(450, "4.7.1", "try again later")
            if recipient.startswith("no"):
                return Reply(550, "5.1.1", "no such user")
            return None

    c = Conn(
        config=ServerConfig(hostname="mx.example.test", max_errors=3), policy=PolicyChain([Later()])
    )
    c.ehlo()
    c.send(
        "MAIL FROM:<a@example.org>\r\n"
        + "".join(f"RCPT TO:<later{i}@example.test>\r\n" for i in range(10))
        + "RCPT TO:<ok@example.test>\r\n"
    )
    assert c.codes() == [250] + [450] * 10 + [250] and not c.closed
    c.send(
        "RCPT TO:<no1@example.test>\r\nRCPT TO:<no2@example.test>\r\nRCPT TO:<no3@example.test>\r\n"
    )
    assert c.codes() == [550, 550, 550, 421] and c.closed


def test_trusted_networks_are_exempt_from_the_per_ip_cap_unless_configured() -> None:
    """As Postfix exempts mynetworks (smtpd_client_event_limit_exceptions); the total cap holds."""
    from mailrelay.policy import build_policy

    nets = (ipaddress.ip_network("192.0.2.0/24"),)
    config = ServerConfig(
        hostname="mx.example.test",
        trusted_networks=nets,
        max_connections=10,
        max_connections_per_ip=2,
    )
    factory = server_factory(config, RecordingSink(), build_policy(config), Clock())
    trusted = [Conn(factory=factory, client="192.0.2.1") for _ in range(4)]
    assert [c.codes() for c in trusted] == [[220]] * 4
    stranger = [Conn(factory=factory, client="198.51.100.1") for _ in range(3)]
    assert [c.codes() for c in stranger[:2]] == [[220], [220]]
    assert stranger[2].replies() == [(421, "4.7.0 Error: too many connections from your address")]
    reconfigure(factory, attrs.evolve(config, limit_trusted_clients=True))  # SIGHUP: capped again
    assert Conn(factory=factory, client="192.0.2.1").replies() == [
        (421, "4.7.0 Error: too many connections from your address")
    ]


def test_trusted_clients_are_greeted_without_the_greet_delay_unless_configured() -> None:
    nets = (ipaddress.ip_network("192.0.2.0/24"),)
    config = ServerConfig(hostname="mx.example.test", trusted_networks=nets, greet_delay=2.0)
    assert Conn(config=config, client="192.0.2.7").codes() == [220]
    assert Conn(config=config, client="198.51.100.7").codes() == []
    limited = Conn(config=attrs.evolve(config, limit_trusted_clients=True), client="192.0.2.7")
    assert limited.codes() == []
    limited.clock.advance(2)
    assert limited.codes() == [220]
