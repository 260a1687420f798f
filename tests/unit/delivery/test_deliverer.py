"""SMTPDeliverer in memory: hop order, what moves to the next hop, per-recipient results."""

from __future__ import annotations

import io

from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from mailrelay.config import DeliveryConfig
from mailrelay.delivery import SMTPDeliverer
from mailrelay.envelope import Envelope, NextHop, Recipient, Reply, Route, TLSPolicy
from tests.support.delivery.harness import ENV, Harness

EHLO = b"250-mx.test\r\n250 PIPELINING\r\n"


def test_happy_path_remote_and_order() -> None:
    h = Harness(NextHop("127.0.0.1", 2526))
    host, port, _, timeout, bind = h.reactor.tcpClients[0]
    assert (host, port, timeout, bind) == ("127.0.0.1", 2526, 30, None)
    h.accept(0)
    h.reply(b"220 mx\r\n")
    h.reply(EHLO)
    h.reply(b"250 ok\r\n250 ok\r\n550 5.1.1 nobody\r\n354 go\r\n")
    assert h.sent().endswith(b"body\r\n.\r\n")
    h.reply(b"250 2.0.0 queued\r\n")
    remote = "127.0.0.1[127.0.0.1]:2526"
    assert h.result == [
        [(Reply(250, "2.0.0", "queued"), remote), (Reply(550, "5.1.1", "nobody"), remote)]
    ]
    assert h.bodies[0].closed
    assert h.sent() == b""  # kept in the connection cache ...
    h.reactor.advance(2)
    assert h.sent() == b"QUIT\r\n"  # ... until idle for connection_idle_time


def test_refused_then_second_hop() -> None:
    h = Harness(NextHop("127.0.0.1", 2526), NextHop("127.0.0.2", 2527, name="mx2.test"))
    h.refuse(0)
    assert h.reactor.tcpClients[1][:2] == ("127.0.0.2", 2527)
    h.accept(1)
    h.reply(b"220 mx\r\n" + EHLO)
    h.reply(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    h.reply(b"250 done\r\n")
    assert [remote for _, remote in h.result[0]] == ["mx2.test[127.0.0.2]:2527"] * 2  # type: ignore[union-attr]


def test_all_hops_refused_is_temporary_for_everyone() -> None:
    h = Harness(NextHop("127.0.0.1", 2526), NextHop("::1", 2527))
    h.refuse(0)
    h.refuse(1)
    (r1, remote), (r2, _) = h.result[0]  # type: ignore[misc]
    assert r1 == r2 == Reply(451, "4.4.1", "connect to ::1:2527 failed: Connection refused")
    assert remote == "::1[::1]:2527"


def test_connect_timeout_then_greeting_timeout() -> None:
    h = Harness(NextHop("127.0.0.1", 1), NextHop("127.0.0.2", 2))
    host, port, factory, timeout, _ = h.reactor.tcpClients[0]
    factory.clientConnectionFailed(h.reactor.connectors[0], Failure(error.TimeoutError()))
    h.accept(1)
    h.reactor.advance(299)
    assert h.result == []
    h.reactor.advance(1)  # no greeting in 300 s (the command timeout)
    (reply, remote), _ = h.result[0]  # type: ignore[misc]
    assert reply.code == 451 and "timed out" in reply.text and remote == "127.0.0.2[127.0.0.2]:2"


def test_421_greeting_moves_on_and_last_reply_wins() -> None:
    h = Harness(NextHop("127.0.0.1", 1), NextHop("127.0.0.2", 2))
    h.accept(0)
    h.reply(b"421 4.3.2 too busy\r\n")
    h.accept(1)
    h.reply(b"220 mx\r\n" + EHLO)
    h.reply(b"451 4.3.0 try later\r\n503 no\r\n503 no\r\n503 no\r\n")  # MAIL 4xx → next hop
    assert h.result[0] == [(Reply(451, "4.3.0", "try later"), "127.0.0.2[127.0.0.2]:2")] * 2


def test_mail_5xx_is_final_and_no_next_hop() -> None:
    h = Harness(NextHop("127.0.0.1", 1), NextHop("127.0.0.2", 2))
    h.accept(0)
    h.reply(b"220 mx\r\n" + EHLO)
    h.reply(b"553 5.7.1 sender refused\r\n503 no\r\n503 no\r\n503 no\r\n")
    assert h.result[0] == [(Reply(553, "5.7.1", "sender refused"), "127.0.0.1[127.0.0.1]:1")] * 2
    assert len(h.reactor.tcpClients) == 1


def test_5xx_greeting_everywhere_is_temporary() -> None:
    h = Harness(NextHop("127.0.0.1", 1))
    h.accept(0)
    h.reply(b"554 5.3.2 no service\r\n")
    (reply, _), _ = h.result[0]  # type: ignore[misc]
    assert reply.code == 451 and "554 5.3.2 no service" in reply.text


def test_lost_after_data_is_temporary_but_rcpt_rejections_stay() -> None:
    h = Harness(NextHop("127.0.0.1", 1), NextHop("127.0.0.2", 2))
    h.accept(0)
    h.reply(b"220 mx\r\n" + EHLO)
    h.reply(b"250 ok\r\n550 5.1.1 no\r\n250 ok\r\n354 go\r\n")
    h.protocol.connectionLost(Failure(error.ConnectionLost()))
    [(r1, _), (r2, _)] = h.result[0]  # type: ignore[misc]
    assert r1 == Reply(550, "5.1.1", "no")
    assert r2.code == 451 and r2.enhanced == "4.4.2" and "DATA-END" in r2.text
    assert len(h.reactor.tcpClients) == 1  # never the next hop once MAIL was accepted


def test_lmtp_lost_between_the_replies_after_the_dot_is_no_second_delivery() -> None:
    """b was delivered before the connection broke: its 250 stands (a retry would deliver it
    twice); c, whose reply never came, is tried again."""
    h = Harness(NextHop("127.0.0.1", 24), lmtp=True)
    h.accept(0)
    h.reply(b"220 mda LMTP\r\n" + EHLO)
    h.reply(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    h.reply(b"250 2.0.0 <b@y.test> delivered\r\n")
    h.lose()
    [(r1, _), (r2, _)] = h.result[0]  # type: ignore[misc]
    assert r1 == Reply(250, "2.0.0", "<b@y.test> delivered")
    assert r2.code == 451 and r2.enhanced == "4.4.2"


def test_binarymime_goes_byte_for_byte_with_bdat_to_a_hop_that_offers_it() -> None:
    """What a route that says binarymime = true promises: the text as it was, never dot-stuffed
    nor its line endings changed."""
    h = Harness(NextHop("127.0.0.1", 25), start=False)
    h.body = b"Subject: b\r\n\r\n\x00bare\nlf\r.\r\n.\r\n"
    h.deliver(Envelope("a@x.test", (Recipient("b@y.test"),), body="BINARYMIME"))
    h.accept(0)
    h.reply(b"220 mx\r\n250-mx\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 BINARYMIME\r\n")
    sent = h.sent()
    assert b"MAIL FROM:<a@x.test> BODY=BINARYMIME\r\nRCPT TO:<b@y.test>\r\n" in sent
    h.reply(b"250 ok\r\n250 ok\r\n")
    sent += h.sent()
    assert sent.endswith(b"BDAT %d LAST\r\n" % len(h.body) + h.body)
    h.reply(b"250 2.0.0 queued\r\n")
    assert [r.code for r, _ in h.result[0]] == [250]  # type: ignore[union-attr]


def test_binarymime_never_to_lmtp_which_we_send_with_dot_stuffed_data() -> None:
    h = Harness(NextHop("127.0.0.1", 24), lmtp=True, start=False)
    h.deliver(Envelope("a@x.test", (Recipient("b@y.test"),), body="BINARYMIME"))
    h.accept(0)
    h.reply(b"220 mda LMTP\r\n250-mda\r\n250-CHUNKING\r\n250 BINARYMIME\r\n")
    [(reply, _)] = h.result[0]  # type: ignore[misc]
    assert (reply.code, reply.enhanced) == (554, "5.6.3")
    assert b"MAIL" not in h.sent()


def test_a_hop_offering_dsn_takes_the_notify_request_and_the_answer_says_so() -> None:
    h = Harness(NextHop("127.0.0.1", 25), start=False)
    h.deliver(Envelope("a@x.test", (Recipient("b@y.test", ("SUCCESS",)), Recipient("c@y.test"))))
    h.accept(0)
    h.reply(b"220 mx\r\n250-mx\r\n250 DSN\r\n")
    h.reply(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n")
    assert b"RCPT TO:<b@y.test> NOTIFY=SUCCESS\r\n" in h.sent()
    remote = "127.0.0.1[127.0.0.1]:25"
    assert h.result[0] == [(Reply(250, None, "ok"), remote, True), (Reply(250, None, "ok"), remote)]


def test_source_address_bound() -> None:
    h = Harness(NextHop("127.0.0.1", 1), source="127.0.0.9")
    assert h.reactor.tcpClients[0][4] == ("127.0.0.9", 0)


def test_no_hops() -> None:
    h = Harness()
    assert h.result[0][0][0].code == 451  # type: ignore[index]


def _deliver_on(h: Harness, final: bytes = b"250 2.0.0 ok\r\n") -> None:
    h.reply(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    h.reply(final)


def test_connection_reused_with_rset() -> None:
    h = Harness(NextHop("127.0.0.1", 25))
    h.accept(0)
    h.reply(b"220 mx\r\n" + EHLO)
    _deliver_on(h)
    h.sent()
    h.deliver()
    assert len(h.reactor.tcpClients) == 1  # no new connection
    assert h.sent().startswith(b"RSET\r\nMAIL FROM:<a@x.test>")
    h.reply(b"250 reset\r\n")
    _deliver_on(h)
    assert [r.code for r, _ in h.result[0]] == [250, 250]  # type: ignore[union-attr]


def test_reuse_limit_closes_with_quit() -> None:
    h = Harness(NextHop("127.0.0.1", 25), config=DeliveryConfig(connection_reuse_limit=2))
    h.accept(0)
    h.reply(b"220 mx\r\n" + EHLO)
    _deliver_on(h)
    h.deliver()
    h.reply(b"250 reset\r\n")
    _deliver_on(h)
    assert h.sent().endswith(b".\r\nQUIT\r\n")  # two messages: spent, not cached
    h.deliver()
    assert len(h.reactor.tcpClients) == 2


def test_idle_connection_closed_by_peer_is_not_reused() -> None:
    h = Harness(NextHop("127.0.0.1", 25))
    h.accept(0)
    h.reply(b"220 mx\r\n" + EHLO)
    _deliver_on(h)
    h.reply(b"421 4.4.2 idle too long\r\n")
    h.lose()
    h.deliver()
    assert len(h.reactor.tcpClients) == 2


def test_cached_connection_dead_at_rset_retries_fresh() -> None:
    h = Harness(NextHop("127.0.0.1", 25))
    h.accept(0)
    h.reply(b"220 mx\r\n" + EHLO)
    _deliver_on(h)
    h.deliver()
    h.lose()  # gone before any reply to RSET
    assert len(h.reactor.tcpClients) == 2
    h.accept(1)
    h.reply(b"220 mx\r\n" + EHLO)
    assert b"RSET" not in h.sent()
    _deliver_on(h)
    assert [r.code for r, _ in h.result[0]] == [250, 250]  # type: ignore[union-attr]


def _stopping_with_a_cached_session(h: Harness) -> list[object]:
    """One delivery on a session kept for reuse, then the deliverer's stop: QUIT sent and answered
    221; → where the stop's result lands."""
    h.accept(0)
    h.reply(b"220 mx\r\n" + EHLO)
    _deliver_on(h)
    h.sent()
    done: list[object] = []
    h.deliverer.stop().addCallback(done.append)
    assert h.sent() == b"QUIT\r\n"
    h.reply(b"221 bye\r\n")
    return done


def test_stop_quits_cached() -> None:
    h = Harness(NextHop("127.0.0.1", 25))
    done = _stopping_with_a_cached_session(h)
    h.lose()
    assert done == [None]


def test_size_limit_below_message_is_permanent_and_nothing_sent() -> None:
    h = Harness(NextHop("127.0.0.1", 25), NextHop("127.0.0.2", 25))
    h.accept(0)
    h.reply(b"220 mx\r\n250-mx\r\n250 SIZE 10\r\n")
    assert h.sent() == b"EHLO relay.test\r\nQUIT\r\n"
    (reply, _), _ = h.result[0]  # type: ignore[misc]
    assert (reply.code, reply.enhanced) == (
        552,
        "5.3.4",
    ) and "exceeds the size limit 10" in reply.text
    assert len(h.reactor.tcpClients) == 1


def test_smtputf8_to_peer_without_it() -> None:
    h = Harness(NextHop("127.0.0.1", 25), start=False)
    h.deliver(Envelope("ä@x.test", (Recipient("b@y.test"),), smtputf8=True))
    h.accept(0)
    h.reply(b"220 mx\r\n" + EHLO)
    assert h.result[0] == [
        (
            Reply(
                553,
                "5.6.7",
                "127.0.0.1[127.0.0.1]:25 does not support SMTPUTF8, which this message needs",
            ),
            "127.0.0.1[127.0.0.1]:25",
        )
    ]


def test_what_each_hop_offered_is_remembered_for_refusing_at_data() -> None:
    h = Harness(NextHop("127.0.0.1", 25), start=False)
    h.deliver(Envelope("ä@x.test", (Recipient("b@y.test"),), smtputf8=True))
    h.accept(0)
    h.reply(b"220 mx\r\n250-mx\r\n250 SIZE 1000\r\n")
    offer = h.deliverer.capabilities.offer(NextHop("127.0.0.1", 25))
    assert offer is not None and (offer.smtputf8, offer.size_limit) == (False, 1000)


def test_an_smtputf8_message_that_does_not_need_it_goes_without_it() -> None:
    """All-ASCII addresses and header section (RFC 6531 3.2): no reason to fail at a hop without
    SMTPUTF8; a UTF-8 header still needs it."""
    env = Envelope("a@x.test", (Recipient("b@y.test"),), smtputf8=True)
    h = Harness(NextHop("127.0.0.1", 25), start=False)
    h.deliver(env)
    h.accept(0)
    h.reply(b"220 mx\r\n" + EHLO)
    assert h.sent().startswith(b"EHLO relay.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")
    h2 = Harness(NextHop("127.0.0.1", 25), start=False)
    h2.body = "Subject: Grüße\r\n\r\nbody\r\n".encode()
    h2.deliver(env)
    h2.accept(0)
    h2.reply(b"220 mx\r\n" + EHLO)
    assert [r.enhanced for r, _ in h2.result[0]] == ["5.6.7"]  # type: ignore[union-attr]


def test_smtputf8_sent_when_offered() -> None:
    h = Harness(NextHop("127.0.0.1", 25), start=False)
    h.deliver(Envelope("ä@x.test", (Recipient("b@y.test"),), smtputf8=True, body="8BITMIME"))
    h.accept(0)
    h.reply(b"220 mx\r\n250-mx\r\n250-SMTPUTF8\r\n250 8BITMIME\r\n")
    assert h.sent() == "EHLO relay.test\r\nMAIL FROM:<ä@x.test> BODY=8BITMIME SMTPUTF8\r\n".encode()


def test_encrypt_without_starttls_offered_moves_on() -> None:
    h = Harness(NextHop("127.0.0.1", 25), tls=TLSPolicy.ENCRYPT)
    h.accept(0)
    h.reply(b"220 mx\r\n" + EHLO)  # STARTTLS stripped
    (reply, _), _ = h.result[0]  # type: ignore[misc]
    assert (reply.code, reply.enhanced) == (451, "4.7.4")
    assert b"MAIL" not in h.sent()


def test_may_without_starttls_goes_plaintext() -> None:
    h = Harness(NextHop("127.0.0.1", 25), tls=TLSPolicy.MAY)
    h.accept(0)
    h.reply(b"220 mx\r\n" + EHLO)
    assert b"MAIL FROM" in h.sent()


STARTTLS_EHLO = b"250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n"


def _in_tls_handshake(h: Harness) -> Harness:
    """The hop offers STARTTLS and says 220 to it: ``h`` is in the TLS handshake from there."""
    h.accept(0)
    h.reply(b"220 mx\r\n" + STARTTLS_EHLO)
    h.reply(b"220 go ahead\r\n")
    return h


def test_starttls_then_ehlo_again_and_injected_text_ignored() -> None:
    h = Harness(NextHop("127.0.0.1", 25, name="mx.example.test"), tls=TLSPolicy.ENCRYPT)
    h.accept(0)
    h.reply(b"220 mx\r\n" + STARTTLS_EHLO)
    assert h.sent() == b"EHLO relay.test\r\nSTARTTLS\r\n"
    h.reply(b"220 2.0.0 go ahead\r\n250-injected\r\n250 PIPELINING\r\n")  # plaintext injection
    assert len(h.tls_started) == 1
    assert h.sent() == b"EHLO relay.test\r\n"  # and the injected 250 was not taken as its reply
    h.reply(b"250-mx\r\n250 PIPELINING\r\n")
    assert h.sent().startswith(b"MAIL FROM:")


def test_tls_failure_under_may_retries_hop_in_plaintext() -> None:
    h = _in_tls_handshake(Harness(NextHop("127.0.0.1", 25), tls=TLSPolicy.MAY))
    h.lose()  # handshake failed
    assert h.reactor.tcpClients[1][:2] == ("127.0.0.1", 25)
    h.accept(1)
    h.reply(b"220 mx\r\n" + STARTTLS_EHLO)
    assert b"STARTTLS" not in h.sent()


def test_tls_failure_under_verify_is_temporary_next_hop() -> None:
    h = _in_tls_handshake(
        Harness(NextHop("127.0.0.1", 25, name="mx.example.test"), tls=TLSPolicy.VERIFY)
    )
    h.lose()
    (reply, _), _ = h.result[0]  # type: ignore[misc]
    assert (reply.code, reply.enhanced) == (451, "4.7.5") and "TLS handshake" in reply.text
    assert len(h.reactor.tcpClients) == 1


def test_auth_refused_over_plaintext() -> None:
    h = Harness(NextHop("127.0.0.1", 25), tls=TLSPolicy.NONE, auth=("u", "p"))
    h.accept(0)
    h.reply(b"220 mx\r\n250-mx\r\n250 AUTH PLAIN LOGIN\r\n")
    assert b"AUTH" not in h.sent()
    (reply, _), _ = h.result[0]  # type: ignore[misc]
    assert reply.enhanced == "4.7.0" and "unencrypted" in reply.text


def test_auth_plain_when_plaintext_allowed() -> None:
    h = Harness(
        NextHop("127.0.0.1", 25), tls=TLSPolicy.NONE, auth=("user", "pw"), allow_plaintext_auth=True
    )
    h.accept(0)
    h.reply(b"220 mx\r\n250-mx\r\n250 AUTH PLAIN LOGIN\r\n")
    assert h.sent() == b"EHLO relay.test\r\nAUTH PLAIN AHVzZXIAcHc=\r\n"
    h.reply(b"235 2.7.0 ok\r\n")
    assert h.sent().startswith(b"MAIL FROM:")


def test_auth_login_and_failure() -> None:
    h = Harness(
        NextHop("127.0.0.1", 25), tls=TLSPolicy.NONE, auth=("user", "pw"), allow_plaintext_auth=True
    )
    h.accept(0)
    h.reply(b"220 mx\r\n250-mx\r\n250 AUTH LOGIN\r\n")
    assert h.sent().endswith(b"AUTH LOGIN\r\n")
    h.reply(b"334 VXNlcm5hbWU6\r\n")
    assert h.sent() == b"dXNlcg==\r\n"
    h.reply(b"334 UGFzc3dvcmQ6\r\n")
    assert h.sent() == b"cHc=\r\n"
    h.reply(b"535 5.7.8 bad credentials\r\n")
    (reply, _), _ = h.result[0]  # type: ignore[misc]
    assert (
        reply.code == 451
        and reply.enhanced == "4.7.8"
        and "535 5.7.8 bad credentials" in reply.text
    )


def test_bdat_for_large_message_when_chunking_offered() -> None:
    h = Harness(NextHop("127.0.0.1", 25), start=False)
    h.body = b"Subject: big\r\n\r\n" + b".x\r\n" * 300000  # 1.2 MB: above the BDAT threshold
    h.deliver()
    h.accept(0)
    h.reply(b"220 mx\r\n250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
    out = h.sent()
    assert b"DATA" not in out and out.endswith(b"RCPT TO:<c@y.test>\r\n")
    h.reply(b"250 ok\r\n250 ok\r\n250 ok\r\n")
    chunks: list[tuple[bytes, bytes]] = []
    while not chunks or not chunks[-1][0].endswith(b" LAST"):
        data = h.sent()
        assert data, "the client stopped sending before BDAT LAST"
        while data:
            header, _, rest = data.partition(b"\r\n")
            n = int(header.split()[1])
            chunks.append((header, rest[:n]))
            data = rest[n:]
            h.reply(b"250 2.0.0 chunk\r\n")  # replies trickle back: at most a few BDATs in flight
    assert b"".join(c for _, c in chunks) == h.body  # as is: no dot-stuffing in BDAT
    assert all(not hd.endswith(b"LAST") for hd, _ in chunks[:-1]) and len(chunks) > 10
    assert [r.code for r, _ in h.result[0]] == [250, 250]  # type: ignore[union-attr]


def test_an_odd_2xx_to_a_bdat_chunk_is_no_delivery() -> None:
    """A 221 to one chunk among 250s is a peer out of step: a temporary failure, never sent."""
    h = Harness(NextHop("127.0.0.1", 25), start=False)
    h.body = b"Subject: big\r\n\r\n" + b"x\r\n" * 400000
    h.deliver()
    h.accept(0)
    h.reply(b"220 mx\r\n250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
    h.sent()
    h.reply(b"250 ok\r\n250 ok\r\n250 ok\r\n")
    answered = 0
    while not h.result:
        data = h.sent()
        assert data, "the client stopped before an answer"
        while data:
            header, _, rest = data.partition(b"\r\n")
            data = rest[int(header.split()[1]) :]
            h.reply(b"221 2.0.0 bye\r\n" if answered == 1 else b"250 2.0.0 chunk\r\n")
            answered += 1
    assert [(r.code, r.enhanced) for r, _ in h.result[0]] == [(451, "4.5.0")] * 2  # type: ignore[union-attr]


def test_8bit_message_to_peer_without_8bitmime_goes_as_is() -> None:
    from twisted.logger import globalLogPublisher

    logged: list[dict[str, object]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        h = Harness(NextHop("127.0.0.1", 25), start=False)
        h.body = "Subject: é\r\n\r\nnaïve\r\n".encode()
        h.deliver(Envelope("a@x.test", (Recipient("b@y.test"),), body="8BITMIME"))
        h.accept(0)
        h.reply(b"220 mx\r\n" + EHLO)
        assert h.sent().endswith(
            b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"
        )  # no BODY=
        h.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        assert h.sent() == h.body + b".\r\n"
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert any("8BITMIME" in str(e.get("log_format", "")) for e in logged)


def test_provides_ideliverer() -> None:
    from zope.interface.verify import verifyObject

    from mailrelay.interfaces import IDeliverer

    assert verifyObject(
        IDeliverer, SMTPDeliverer(MemoryReactorClock(), DeliveryConfig(), "relay.test")
    )


def test_cache_shared_by_routes_naming_the_same_host() -> None:
    h = Harness(NextHop("127.0.0.1", 25, preference=10))
    h.accept(0)
    h.reply(b"220 mx\r\n" + EHLO)
    _deliver_on(h)
    h.route = Route((NextHop("127.0.0.2", 25), NextHop("127.0.0.1", 25, preference=20)))
    h.deliver()
    h.refuse(1)  # the first hop of the new route is down; the second is the cached connection
    assert len(h.reactor.tcpClients) == 2
    assert h.sent().endswith(
        b"RSET\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n"
    )


def test_reuse_time_limit() -> None:
    config = DeliveryConfig(connection_idle_time=1000, connection_reuse_time=10)
    h = Harness(NextHop("127.0.0.1", 25), config=config)
    h.accept(0)
    h.reply(b"220 mx\r\n" + EHLO)
    _deliver_on(h)
    h.sent()
    h.reactor.advance(5)
    h.deliver()  # young enough: reused
    assert len(h.reactor.tcpClients) == 1
    h.reply(b"250 reset\r\n")
    _deliver_on(h)
    h.sent()
    h.reactor.advance(6)  # 11 s old: not reused, closed with QUIT
    h.deliver()
    assert h.sent() == b"QUIT\r\n"
    assert len(h.reactor.tcpClients) == 2


def test_idle_time_zero_turns_the_cache_off() -> None:
    h = Harness(NextHop("127.0.0.1", 25), config=DeliveryConfig(connection_idle_time=0))
    h.accept(0)
    h.reply(b"220 mx\r\n" + EHLO)
    _deliver_on(h)
    assert h.sent().endswith(b"QUIT\r\n")


def test_unreadable_ca_bundle_is_a_temporary_failure_not_a_plaintext_delivery() -> None:
    h = Harness(
        NextHop("127.0.0.1", 25, name="mx.test"),
        tls=TLSPolicy.VERIFY,
        config=DeliveryConfig(tls_ca_file="/nonexistent/ca.pem"),
    )
    h.accept(0)
    h.reply(b"220 mx\r\n" + STARTTLS_EHLO)
    (reply, _), _ = h.result[0]  # type: ignore[misc]
    assert (reply.code, reply.enhanced) == (451, "4.7.5") and "cannot set up TLS" in reply.text
    assert h.sent() == b"EHLO relay.test\r\nQUIT\r\n"  # no STARTTLS, no MAIL


def test_body_that_cannot_be_opened_is_a_local_temporary_failure() -> None:
    h = Harness(NextHop("127.0.0.1", 25), start=False)

    def broken() -> io.BytesIO:
        raise FileNotFoundError("spool file gone")

    h.deliverer.deliver(ENV, ENV.recipients, h.route, broken).addBoth(h.result.append)
    h.accept(0)
    h.reply(b"220 mx\r\n" + EHLO)
    [(r1, _), (r2, _)] = h.result[0]  # type: ignore[misc]
    assert r1 == r2 and (r1.code, r1.enhanced) == (451, "4.3.0") and "spool file gone" in r1.text
    h.sent()
    h.deliver()  # the session was not leaked: the next message reuses it
    assert len(h.reactor.tcpClients) == 1
    assert h.sent().startswith(b"RSET\r\nMAIL FROM:<a@x.test>")


def test_a_next_hop_stalled_in_the_tls_handshake_is_dropped_at_the_command_timeout() -> None:
    """Issue 19, item 1 on our side: the hop says 220 to STARTTLS and then never completes the
    handshake; our EHLO waits in the TLS layer, and the connection is aborted at the timeout."""
    h = _in_tls_handshake(
        Harness(NextHop("127.0.0.1", 25, name="mx.example.test"), tls=TLSPolicy.VERIFY)
    )
    assert len(h.tls_started) == 1
    assert h.transport is not None
    h.reactor.advance(h.deliverer.timeouts.command)
    assert h.transport.disconnected  # aborted, not a polite close a stalled TLS layer would hold
    h.lose()
    (reply, _), _ = h.result[0]  # type: ignore[misc]
    assert (reply.code, reply.enhanced) == (451, "4.7.5")


def test_stop_is_bounded_when_a_cached_hop_never_takes_our_close() -> None:
    """After QUIT, a hop that neither closes nor answers our TLS close cannot hold the stop."""
    h = Harness(NextHop("127.0.0.1", 25))
    done = _stopping_with_a_cached_session(h)  # and then nothing: no close, no close_notify
    assert h.transport is not None and not h.transport.disconnected and done == []
    h.reactor.advance(h.deliverer.timeouts.quit)
    assert h.transport.disconnected
    h.lose()
    assert done == [None]
