"""The ESMTP client protocol in memory: scripted server replies, StringTransport, task.Clock."""

from __future__ import annotations

import io
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailrelay.envelope import Envelope, Recipient, Reply
from mailrelay.smtp.client import ClientFailure, ClientState, ClientTimeouts, SMTPClientProtocol
from tests.support.smtp.client import EHLO_LOCK, Conn, unstuff


def test_greeting_ehlo_extensions() -> None:
    c = Conn()
    assert c.client.extensions == {"PIPELINING": "", "SIZE": "100000", "8BITMIME": ""}
    assert c.client.size_limit == 100000
    assert isinstance(c.ready[0], Reply)


def test_multiline_greeting_and_helo_fallback() -> None:
    c = Conn(ehlo=None)
    c.reply(b"220-mx.test\r\n220-more text\r\n")
    assert c.sent() == b""
    c.reply(b"220 ready\r\n")
    assert c.sent() == b"EHLO client.test\r\n"
    c.reply(b"502 5.5.2 what?\r\n")
    assert c.sent() == b"HELO client.test\r\n"
    c.reply(b"250 hello\r\n")
    assert c.client.state is ClientState.READY and c.client.extensions == {}
    c.send()
    assert c.sent() == b"MAIL FROM:<a@x.test>\r\n"  # lock-step, no SIZE without the extension


def test_421_greeting_fails_ready() -> None:
    c = Conn(ehlo=None)
    c.reply(b"421 4.3.2 busy\r\n")
    assert isinstance(c.ready[0], Failure)
    f = c.ready[0].value
    assert (
        isinstance(f, ClientFailure)
        and f.stage == "greeting"
        and f.reply == Reply(421, "4.3.2", "busy")
    )
    assert c.sent() == b"QUIT\r\n"


def test_pipelined_transaction_one_write() -> None:
    c = Conn()
    body = b"Subject: x\r\n\r\nhi\r\n"
    out = c.send(body)
    assert c.transport.value() == (
        b"MAIL FROM:<a@x.test> SIZE=%d\r\n"
        b"RCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nRCPT TO:<d@y.test>\r\n"
        b"DATA\r\n" % len(body)
    )
    c.sent()
    c.reply(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n250 2.1.5 ok\r\n354 go\r\n")
    assert c.sent() == body + b".\r\n"
    c.reply(b"250 2.0.0 queued as X\r\n")
    queued = Reply(250, "2.0.0", "queued as X")
    assert out == [[queued, Reply(550, "5.1.1", "no such user"), queued]]
    assert c.client.state is ClientState.READY


def test_lockstep_without_pipelining() -> None:
    c = Conn(ehlo=EHLO_LOCK)
    out = c.send()
    assert c.sent().startswith(b"MAIL FROM:<a@x.test> SIZE=")
    c.reply(b"250 ok\r\n")
    assert c.sent() == b"RCPT TO:<b@y.test>\r\n"
    c.reply(b"450 4.2.0 later\r\n")
    assert c.sent() == b"RCPT TO:<c@y.test>\r\n"
    c.reply(b"250 ok\r\n")
    assert c.sent() == b"RCPT TO:<d@y.test>\r\n"
    c.reply(b"250 ok\r\n")
    assert c.sent() == b"DATA\r\n"
    c.reply(b"354 go\r\n")
    c.sent()
    c.reply(b"250 done\r\n")
    assert out == [
        [Reply(450, "4.2.0", "later"), Reply(250, None, "done"), Reply(250, None, "done")]
    ]


def test_lockstep_all_rcpt_rejected_skips_data() -> None:
    c = Conn(ehlo=EHLO_LOCK)
    out = c.send(env=Envelope("", (Recipient("b@y.test"),)))
    assert c.sent().startswith(b"MAIL FROM:<>")
    c.reply(b"250 ok\r\n")
    c.sent()
    c.reply(b"550 5.1.1 unknown\r\n")
    assert c.sent() == b""
    assert out == [[Reply(550, "5.1.1", "unknown")]]
    assert c.client.usable


def test_pipelined_all_rejected_data_refused() -> None:
    c = Conn()
    out = c.send()
    c.sent()
    c.reply(b"250 ok\r\n" + b"550 5.1.1 no\r\n" * 3 + b"554 5.5.1 no valid recipients\r\n")
    assert out == [[Reply(550, "5.1.1", "no")] * 3]
    assert c.sent() == b""


def test_pipelined_354_with_no_recipients_ends_empty_message() -> None:
    c = Conn()
    out = c.send()
    c.sent()
    c.reply(b"250 ok\r\n" + b"550 5.1.1 no\r\n" * 3 + b"354 go on\r\n")
    assert c.sent() == b".\r\n"
    c.reply(b"554 no recipients\r\n")
    assert out == [[Reply(550, "5.1.1", "no")] * 3]


@pytest.mark.parametrize("code", [b"451 4.3.0 later", b"554 5.6.0 bad message"])
def test_data_refused_applies_to_accepted(code: bytes) -> None:
    c = Conn()
    out = c.send()
    c.sent()
    c.reply(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n250 ok\r\n" + code + b"\r\n")
    reply = next(c.client._parser.feed(code + b"\r\n"))
    assert out == [[reply, Reply(550, "5.1.1", "no"), reply]]
    assert c.sent() == b""  # no body after a refused DATA


@pytest.mark.parametrize("code", [b"452 4.3.1 disk full", b"552 5.3.4 too big"])
def test_final_reply_4xx_5xx(code: bytes) -> None:
    c = Conn()
    out = c.send()
    c.sent()
    c.reply(b"250 ok\r\n" * 4 + b"354 go\r\n")
    c.sent()
    c.reply(code + b"\r\n")
    assert [r.code for r in out[0]] == [int(code[:3])] * 3  # type: ignore[union-attr]


@pytest.mark.parametrize("final", [b"220 ok", b"221 bye", b"251 ok", b"235 ok"])
def test_an_odd_2xx_to_the_final_dot_is_no_delivery(final: bytes) -> None:
    """Only 250 ends a message: any other 2xx there is a peer out of step, a temporary failure
    (retried), never a delivery taken for granted; the connection is not used again."""
    c = Conn()
    out = c.send()
    c.sent()
    c.reply(
        b"250 ok\r\n"
        + b"251 2.1.5 will forward\r\n"
        + b"252 2.1.5 cannot verify\r\n"
        + b"250 ok\r\n"
        + b"354 go\r\n"
    )
    c.sent()
    c.reply(final + b"\r\n")
    assert [(r.code, r.enhanced) for r in out[0]] == [(451, "4.5.0")] * 3  # type: ignore[union-attr]
    assert not c.client.usable


def test_mail_rejected_fails_with_stage_mail() -> None:
    c = Conn()
    out = c.send()
    c.sent()
    c.reply(
        b"451 4.7.1 greylisted\r\n" + b"503 5.5.1 need MAIL\r\n" * 3 + b"503 5.5.1 need RCPT\r\n"
    )
    f = out[0]
    assert isinstance(f, Failure) and f.value.stage == "mail" and f.value.reply.code == 451
    assert c.client.usable  # the session survives a refused MAIL


def test_timeouts_follow_the_clock() -> None:
    t = ClientTimeouts(greeting=7, command=5, data_init=3, final=11)
    c = Conn(timeouts=t)
    out = c.send()
    c.sent()
    c.reply(b"250 ok\r\n")
    c.clock.advance(4.9)
    assert out == []
    c.clock.advance(0.2)
    assert c.transport.disconnecting or c.transport.disconnected or c.client._failure is not None
    c.lose()
    f = out[0]
    assert isinstance(f, Failure) and f.value.stage == "rcpt" and "timeout" in f.value.reason


def test_final_dot_timeout() -> None:
    c = Conn(timeouts=ClientTimeouts(command=5, final=11))
    out = c.send()
    c.reply(b"250 ok\r\n" * 4 + b"354 go\r\n")
    c.clock.advance(10)
    assert out == []
    c.clock.advance(2)
    c.lose()
    f = out[0]
    assert isinstance(f, Failure) and f.value.stage == "data-end"
    assert [r.code for r in f.value.replies] == [
        250,
        250,
        250,
    ]  # RCPT accepted, message fate unknown


def test_greeting_timeout() -> None:
    c = Conn(ehlo=None, timeouts=ClientTimeouts(greeting=3))
    c.clock.advance(3)
    f = c.ready[0]
    assert isinstance(f, Failure) and f.value.stage == "greeting" and f.value.network


def test_connection_lost_mid_rcpt_keeps_known_replies() -> None:
    c = Conn(ehlo=EHLO_LOCK)
    out = c.send()
    c.reply(b"250 ok\r\n")
    c.reply(b"550 5.1.1 no\r\n")
    c.lose()
    f = out[0]
    assert isinstance(f, Failure) and f.value.replies == [Reply(550, "5.1.1", "no"), None, None]


def test_unsolicited_421_closes() -> None:
    c = Conn()
    c.reply(b"421 4.4.2 idle timeout\r\n")
    assert c.transport.disconnecting or c.client._failure is not None


def test_garbage_reply_aborts() -> None:
    c = Conn()
    out = c.send()
    c.reply(b"HTTP/1.1 400 Bad\r\n")
    c.lose()
    assert isinstance(out[0], Failure) and "protocol error" in out[0].value.reason


def test_reset_pipelined_before_mail() -> None:
    c = Conn()
    out = c.send(reset=True)
    assert c.sent().startswith(b"RSET\r\nMAIL FROM:")
    c.reply(b"250 ok\r\n" * 5 + b"354 go\r\n")
    c.sent()
    c.reply(b"250 ok\r\n")
    assert len(out[0]) == 3  # type: ignore[arg-type]


def test_quit() -> None:
    c = Conn()
    c.client.quit()
    assert c.sent() == b"QUIT\r\n"
    c.reply(b"221 bye\r\n")
    assert c.transport.disconnecting


def test_dsn_and_body_params_when_offered() -> None:
    c = Conn(ehlo=b"250-mx\r\n250-DSN\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n")
    env = Envelope(
        "a@x.test",
        (Recipient("b@y.test", ("SUCCESS", "FAILURE"), "rfc822;b+1@y.test"),),
        body="8BITMIME",
        smtputf8=True,
        ret="HDRS",
        envid="id=1",
    )
    c.send(env=env)
    sent = c.sent()
    assert sent.startswith(b"MAIL FROM:<a@x.test> BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=id+3D1\r\n")
    c.reply(b"250 ok\r\n")
    assert c.sent() == b"RCPT TO:<b@y.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2B1@y.test\r\n"


def test_dsn_params_dropped_when_not_offered() -> None:
    c = Conn(ehlo=EHLO_LOCK)
    env = Envelope("a@x.test", (Recipient("b@y.test", ("NEVER",)),), ret="FULL")
    c.send(env=env)
    assert b"RET" not in c.sent()
    c.reply(b"250 ok\r\n")
    assert c.sent() == b"RCPT TO:<b@y.test>\r\n"


class Chunked(io.BytesIO):
    """A body file whose reads return the given sizes, as a spool file may."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        super().__init__(data)
        self.sizes = list(sizes)

    def read(self, n: int | None = -1) -> bytes:
        if self.sizes:
            n = self.sizes.pop(0)
        return super().read(n)


def _run_body(body_file: io.BytesIO) -> bytes:
    c = Conn()
    out = c.send(body_file)
    c.sent()
    c.reply(b"250 ok\r\n" * 4 + b"354 go\r\n")
    while c.transport.producer is not None:  # the pull producer, driven as a socket would
        c.transport.producer.resumeProducing()
    data = c.sent()
    c.reply(b"250 done\r\n")
    assert out and isinstance(out[0], list)
    return data


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from([b"", b".", b"..", b".x", b"x", b"a.b"]), max_size=30),
    st.lists(st.integers(min_value=1, max_value=70000), min_size=1, max_size=6),
)
def test_body_any_chunking_unstuffs_to_exact_body(lines: list[bytes], sizes: list[int]) -> None:
    body = b"".join(ln + b"\r\n" for ln in lines)
    assert unstuff(_run_body(Chunked(body, sizes))) == body


def test_large_body_streams_through_producer_with_dots_at_boundaries() -> None:
    chunk = 64 * 1024
    part = b"x" * (chunk - 2) + b"\r\n"
    body = (b"." + part[1:]) * 5  # every 64 KiB read starts with a dot
    data = _run_body(io.BytesIO(body))
    assert len(re.findall(rb"(?:^|\r\n)\.\.x", data)) == 5
    assert unstuff(data) == body


def test_data_block_timeout() -> None:
    c = Conn(timeouts=ClientTimeouts(data_block=9))
    out = c.send(io.BytesIO(b"x" * 200000 + b"\r\n"))
    c.reply(b"250 ok\r\n" * 4 + b"354 go\r\n")
    assert c.transport.producer is not None  # first chunk written, the socket never drains
    c.clock.advance(9)
    c.lose()
    assert isinstance(out[0], Failure) and "timeout sending" in out[0].value.reason


def test_text_after_starttls_220_is_ignored() -> None:
    c = Conn(ehlo=b"250-mx\r\n250 STARTTLS\r\n")
    got: list[object] = []
    c.client.command(
        b"STARTTLS\r\n", "starttls", on_reply=lambda r: c.client.start_tls(object())
    ).addBoth(got.append)
    c.transport.startTLS = lambda options: None  # type: ignore[attr-defined]
    c.reply(b"220 go ahead\r\n250-mx\r\n250 AUTH PLAIN\r\nnot even SMTP\r\n")
    assert got == [Reply(220, None, "go ahead")] and c.client._failure is None
    assert c.client._parser._buffer == b"" and not c.client._waiting


def test_refused_rset_with_354_aborts_rather_than_ending_a_message() -> None:
    c = Conn()
    out = c.send(reset=True)
    c.sent()
    c.reply(b"502 5.5.1 no RSET here\r\n250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert c.sent() == b""  # no "." that would deliver an empty message
    assert c.transport.disconnecting or c.client._failure is not None
    c.lose()
    assert isinstance(out[0], Failure) and out[0].value.stage == "rset"


def test_state_machine_refuses_illegal_transitions() -> None:
    c = Conn(ehlo=None)
    assert c.client.state is ClientState.GREETING
    with pytest.raises(RuntimeError):
        c.client.set_state(ClientState.READY)  # not before EHLO
    c.lose()
    assert c.client.state is ClientState.CLOSED
    c.client.set_state(ClientState.READY)  # a closed session stays closed, quietly
    assert c.client.state is ClientState.CLOSED


def test_send_before_ready_fails_cleanly() -> None:
    c = Conn(ehlo=None)
    out = c.send()
    assert isinstance(out[0], Failure) and "not ready" in out[0].value.reason


def test_large_body_is_read_only_as_the_transport_drains() -> None:
    from mailrelay.smtp._client_body import CHUNK_SIZE

    body = io.BytesIO((b"y" * 78 + b"\r\n") * 50000)  # 4 MB
    c = Conn()
    c.send(body)
    c.reply(b"250 ok\r\n" * 4 + b"354 go\r\n")
    assert body.tell() <= 2 * CHUNK_SIZE  # the first chunk and a peek, nothing more yet
    producer = c.transport.producer
    assert producer is not None
    before = body.tell()
    producer.resumeProducing()  # the socket wants data: the chunk already in hand goes out
    assert body.tell() == before
    producer.resumeProducing()  # drained again: one more chunk is read, no more
    assert body.tell() - before == CHUNK_SIZE
    assert len(c.transport.value()) < 3 * CHUNK_SIZE


def test_tcp_nodelay_set_on_connect() -> None:
    class TCPTransport(StringTransport):
        nodelay = False

        def setTcpNoDelay(self, enabled: bool) -> None:
            self.nodelay = enabled

    t = TCPTransport()
    SMTPClientProtocol("client.test", task.Clock()).makeConnection(t)
    assert t.nodelay is True  # the final dot must not wait for a delayed ACK (Nagle)


def test_a_peer_that_never_takes_our_close_is_dropped_after_the_quit_timeout() -> None:
    """After QUIT we close; a TLS close waits for the peer's close_notify, which a stalled next hop
    never sends: the connection is dropped at the quit timeout, not held forever (issue 19, 1)."""
    c = Conn()
    closed: list[object] = []
    c.client.quit().addBoth(closed.append)
    c.sent()
    c.reply(b"221 bye\r\n")
    assert c.transport.disconnecting and not closed  # asked to close; the peer does nothing
    c.clock.advance(c.client.timeouts.quit)
    assert c.transport.disconnected  # aborted
    c.lose()
    assert closed == [None]
