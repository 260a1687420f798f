"""In-memory tests of the extensions: STARTTLS, AUTH, CHUNKING/BDAT, hop count, pregreet, and that
the client cannot write into our Received header."""

from __future__ import annotations

import email

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer

from mailrelay.config import ServerConfig
from mailrelay.envelope import TLSInfo
from tests.support.smtp.extensions import CONFIG, auth_conn, b64, bdat_conn, ehlo_keywords
from tests.support.smtp.fakes import Conn, DeferredPolicy, TLSStringTransport, stuff

MSG = b"Subject: hello\r\n\r\nbody\r\n"
TLS_OPTIONS = object()  # stands in for CertificateOptions: the transport only records it


def tls_conn(**kw) -> Conn:
    c = Conn(config=CONFIG, transport_class=TLSStringTransport, tls_options=TLS_OPTIONS, **kw)
    c.factory.settings = __import__("attrs").evolve(c.factory.settings, starttls=True)
    c.server.session.settings = c.factory.settings
    return c


# -- STARTTLS -------------------------------------------------------------------------------------


def test_starttls_discards_pipelined_plaintext_and_resets_state() -> None:
    c = tls_conn()
    assert "STARTTLS" in ehlo_keywords(c)
    c.send("MAIL FROM:<a@example.org>\r\nRSET\r\n")
    c.replies()
    c.send("STARTTLS\r\nMAIL FROM:<injected@example.org>\r\nRCPT TO:<user@example.test>\r\n")
    assert c.replies() == [(220, "2.0.0 Ready to start TLS")]
    assert c.transport.tls_options is TLS_OPTIONS
    c.server.handshakeCompleted()  # no real TLS here: tls_info finds no version, records None
    c.send("MAIL FROM:<a@example.org>\r\n")  # state reset: EHLO required again
    assert c.codes() == [503]
    keywords = ehlo_keywords(c)
    assert "STARTTLS" not in keywords
    c.send("STARTTLS\r\n")
    assert c.replies() == [(503, "5.5.1 Error: TLS already active")]


def test_starttls_not_offered_without_certificate() -> None:
    c = Conn(config=CONFIG)
    assert "STARTTLS" not in ehlo_keywords(c)
    c.send("STARTTLS\r\n")
    assert c.codes() == [502]


def test_received_header_names_tls_and_esmtps() -> None:
    c = tls_conn()
    ehlo_keywords(c)
    c.send("STARTTLS\r\n")
    c.server.session.tls_established(TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256"))
    ehlo_keywords(c)
    c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\nDATA\r\n")
    c.send(stuff(MSG))
    assert c.codes()[-1] == 250
    w = c.sink.committed[0]
    assert w.envelope.protocol == "ESMTPS"
    assert b"(using TLSv1.3 with cipher TLS_AES_128_GCM_SHA256)" in w.data.split(b"\r\n\r\n")[0]


# -- AUTH -----------------------------------------------------------------------------------------


def test_auth_plain_then_relay_anywhere_with_esmtpa_header() -> None:
    c = auth_conn()
    assert "AUTH PLAIN LOGIN" in ehlo_keywords(c)
    c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<x@elsewhere.example>\r\nRSET\r\n")
    assert c.codes() == [250, 554, 250]  # not yet authenticated: no relaying
    c.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n")
    assert c.replies() == [(235, "2.7.0 Authentication successful")]
    assert "AUTH PLAIN LOGIN" not in ehlo_keywords(c)
    c.send("AUTH PLAIN\r\n")
    assert c.codes() == [503]
    c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<x@elsewhere.example>\r\nDATA\r\n")
    c.send(stuff(MSG))
    assert c.codes() == [250, 250, 354, 250]
    w = c.sink.committed[0]
    assert (w.envelope.auth, w.envelope.protocol) == ("alice", "ESMTPSA")
    assert w.envelope.trusted  # recorded with the message: it hears of every failure
    assert b"(Authenticated sender: alice)" in w.data


def test_whether_the_client_was_trusted_is_recorded_with_the_message() -> None:
    for client, trusted in (("192.0.2.9", False), ("10.1.2.3", True)):
        c = Conn(config=CONFIG, client=client)
        c.send(
            b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\nDATA\r\n"
            + stuff(MSG)
        )
        assert c.sink.committed[0].envelope.trusted is trusted


def test_auth_login_and_plain_without_initial_response() -> None:
    c = auth_conn()
    ehlo_keywords(c)
    c.send("AUTH LOGIN\r\n")
    assert c.replies() == [(334, b64("Username:"))]
    c.send(b64("alice") + "\r\n")
    assert c.replies() == [(334, b64("Password:"))]
    c.send(b64("s3cret") + "\r\n")
    assert c.codes() == [235]
    c2 = auth_conn()
    ehlo_keywords(c2)
    c2.send("AUTH PLAIN\r\n")
    assert c2.replies() == [(334, "")]
    c2.send(b64("\0alice\0s3cret") + "\r\n")
    assert c2.codes() == [235]


def test_auth_three_failures_421_and_close() -> None:
    c = auth_conn()
    ehlo_keywords(c)
    c.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'wrong')}\r\n")
    c.send("AUTH LOGIN\r\n*\r\n")  # aborted: not a failure of credentials
    c.send("AUTH PLAIN !!notbase64\r\n")
    c.send(f"AUTH PLAIN {b64(chr(0) + 'mallory' + chr(0) + 's3cret')}\r\n")
    assert not c.closed
    c.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'guess')}\r\n")
    assert c.replies() == [
        (535, "5.7.8 Authentication credentials invalid"),
        (334, b64("Username:")),
        (501, "5.7.0 Authentication aborted"),
        (501, "5.5.2 Cannot decode response"),
        (535, "5.7.8 Authentication credentials invalid"),
        (535, "5.7.8 Authentication credentials invalid"),
        (421, "4.7.0 Error: too many authentication failures"),
    ]
    assert c.closed


def test_auth_only_over_tls_unless_allowed() -> None:
    c = auth_conn(tls=False)
    assert not any(k.startswith("AUTH") for k in ehlo_keywords(c))
    c.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n")
    assert c.replies() == [
        (538, "5.7.11 Encryption required for requested authentication mechanism")
    ]
    c = auth_conn(tls=False, plaintext=True)
    assert "AUTH PLAIN LOGIN" in ehlo_keywords(c)
    c.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n")
    assert c.codes() == [235]


def test_auth_other_checks() -> None:
    c = auth_conn()
    c.send("AUTH PLAIN x\r\n")
    ehlo_keywords(c)
    c.send("AUTH CRAM-MD5\r\n")
    c.send(
        f"AUTH PLAIN {b64('bob' + chr(0) + 'alice' + chr(0) + 's3cret')}\r\n"
    )  # authzid ≠ authcid
    c.send("MAIL FROM:<a@example.org>\r\nAUTH PLAIN\r\n")
    assert c.codes() == [504, 501, 250, 503]
    no_auth = Conn(config=CONFIG)
    no_auth.ehlo()
    no_auth.send("AUTH PLAIN\r\n")
    assert no_auth.codes() == [503]


def test_submission_requires_auth_before_mail() -> None:
    c = auth_conn(submission=True)
    ehlo_keywords(c)
    c.send("MAIL FROM:<a@example.org>\r\n")
    assert c.replies() == [(530, "5.7.0 Authentication required")]
    c.send(
        f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\nMAIL FROM:<a@example.org>\r\n"
    )
    assert c.codes() == [235, 250]


def test_checker_crash_is_temporary_not_a_failure_count() -> None:
    class Broken:
        credentialInterfaces = ()

        def requestAvatarId(self, creds):
            return defer.fail(RuntimeError("ldap down"))

    import attrs

    c = Conn(config=CONFIG, checker=Broken())
    c.server.session.settings = attrs.evolve(c.factory.settings, auth_mechanisms=("PLAIN",))
    c.server.session.tls_established(None)
    ehlo_keywords(c)
    c.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n")
    assert c.codes() == [454]
    assert c.server.session.auth_failures == 0


# -- CHUNKING -------------------------------------------------------------------------------------


def test_binarymime_neither_offered_nor_taken_unless_every_route_carries_it() -> None:
    """Else a forged sender's BINARYMIME message, which no next hop takes, bounces to its victim."""
    c = Conn(config=CONFIG)
    kw = ehlo_keywords(c)
    assert "CHUNKING" in kw and "BINARYMIME" not in kw
    c.send(
        b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\nMAIL FROM:<a@example.org> BODY=8BITMIME\r\n"
    )
    (code, text), ok = c.replies()
    assert (code, text[:5]) == (555, "5.5.4") and ok[0] == 250


def test_bdat_pipelined_chunks_make_one_message() -> None:
    c = bdat_conn()
    c.send(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\nBDAT 10\r\nSubject: h"
        b"BDAT 9\r\ni\r\n\r\nbodyBDAT 2 LAST\r\n\r\nNOOP\r\n"
    )
    assert c.replies() == [
        (250, "2.1.0 Ok"),
        (250, "2.1.5 Ok"),
        (250, "2.0.0 Ok: 10 octets received"),
        (250, "2.0.0 Ok: 19 octets received"),
        (250, "2.0.0 Ok: queued as Q0001"),
        (250, "2.0.0 Ok"),
    ]
    (w,) = c.sink.committed
    assert w.data.split(b"\r\n", 3)[3] == b"Subject: hi\r\n\r\nbody\r\n"


def test_bdat_binarymime_keeps_bare_lf_and_dots_data_refused() -> None:
    c = bdat_conn()
    payload = b"Subject: b\r\n\r\n\x00\n.\n\r.\r\n"
    c.send(b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\nRCPT TO:<user@example.test>\r\nDATA\r\n")
    c.send(f"BDAT {len(payload)} LAST\r\n".encode() + payload)
    assert c.codes() == [250, 250, 503, 250]
    assert c.sink.committed[0].data.endswith(payload)
    assert c.sink.committed[0].envelope.body == "BINARYMIME"


def test_bdat_bare_lf_without_binarymime_rejected() -> None:
    c = bdat_conn()
    payload = b"Subject: b\r\n\r\nbare\nlf\r\n"
    c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\n")
    c.send(f"BDAT {len(payload)} LAST\r\n".encode() + payload + b"NOOP\r\n")
    assert c.codes() == [250, 250, 550, 250]
    assert not c.sink.committed


def test_bdat_out_of_sequence_still_consumes_its_octets() -> None:
    c = bdat_conn()
    smuggle = b"MAIL FROM:<evil@x.example>\r\n"
    c.send(f"BDAT {len(smuggle)}\r\n".encode() + smuggle + b"NOOP\r\n")
    c.send(b"MAIL FROM:<a@example.org>\r\n" + f"BDAT {len(smuggle)} LAST\r\n".encode() + smuggle)
    assert c.codes() == [503, 250, 250, 503]


def test_bdat_size_exceeded_all_later_chunks_refused_then_session_goes_on() -> None:
    import attrs

    c = bdat_conn()
    c.server.session.settings = attrs.evolve(c.server.session.settings, max_message_size=20)
    c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\n")
    c.send(b"BDAT 30\r\n" + b"x" * 28 + b"\r\n" + b"BDAT 5\r\nabc\r\nBDAT 0 LAST\r\n")
    assert c.codes() == [250, 250, 552, 552, 552]
    assert c.sink.writers[0].aborted
    c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\nBDAT 6 LAST\r\nok\r\n\r\n")
    assert c.codes() == [250, 250, 250]


def test_bdat_rset_between_chunks_aborts_and_bad_syntax_closes() -> None:
    c = bdat_conn()
    c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\nBDAT 3\r\nabcRSET\r\n")
    assert c.codes() == [250, 250, 250, 250]
    assert c.sink.writers[0].aborted
    c.send(b"BDAT ten\r\n")
    assert c.codes() == [501] and c.closed


def test_bdat_waits_for_deferred_data_policy_before_reading() -> None:
    policy = DeferredPolicy()
    c = Conn(config=CONFIG, policy=policy)
    c.send("EHLO c\r\n")
    policy.answer()
    c.send(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\n"
        b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n"
    )
    policy.answer()
    policy.answer()
    assert policy.answer() == "data"
    assert policy.answer() == "end_of_data"
    assert c.codes() == [220, 250, 250, 250, 250, 250]  # QUIT\r\n was message text
    assert c.sink.committed[0].data.endswith(b"QUIT\r\n")


# -- hop count, pregreet --------------------------------------------------------------------------


def hops(n: int, name: bytes = b"Received") -> bytes:
    return b"".join(name + b": from x by y; Thu, 1 Jan 1970 00:00:00 +0000\r\n" for _ in range(n))


def send_by(c: Conn, how: str, message: bytes) -> tuple[int, str]:
    """Send ``message`` in one transaction by DATA or by BDAT (in two chunks cut mid-header); the
    reply to its end."""
    c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\n")
    if how == "DATA":
        c.send("DATA\r\n")
        c.send(stuff(message))
    else:
        cut = len(message) // 2
        c.send(f"BDAT {cut}\r\n".encode() + message[:cut])
        c.send(f"BDAT {len(message) - cut} LAST\r\n".encode() + message[cut:])
    return c.replies()[-1]


# Postfix (hopcount_limit = 50) counts the Received header it adds itself: a real Postfix 3.7 takes
# a message that arrives with 48 and refuses one with 49. Delivered-To headers it does not count.
@pytest.mark.parametrize("how", ["DATA", "BDAT"])
@pytest.mark.parametrize(
    ("received", "body", "code"),
    [
        (48, MSG, 250),
        (49, MSG, 554),
        (48, b"\r\nbody\r\n", 250),
        (49, b"\r\nbody\r\n", 554),
        (49, b"", 554),
        (49, b"Subject: x\r\n", 554),
        (200, MSG, 554),
    ],
)
def test_hop_count_matches_postfix(how: str, received: int, body: bytes, code: int) -> None:
    c = Conn(config=CONFIG)
    c.ehlo()
    reply = send_by(c, how, hops(received) + body)
    assert reply[0] == code
    if code == 554:
        assert reply == (554, "5.4.6 Error: too many hops (mail loop?)") and not c.sink.committed
    else:
        assert len(c.sink.committed) == 1


@pytest.mark.parametrize("how", ["DATA", "BDAT"])
def test_hop_count_limit_is_configurable_and_counts_only_received(how: str) -> None:
    config = ServerConfig(
        hostname="mx.example.test", local_domains=("example.test",), hopcount_limit=5
    )
    c = Conn(config=config)
    c.ehlo()
    assert send_by(c, how, hops(3) + hops(40, b"Delivered-To") + MSG)[0] == 250
    assert (
        send_by(c, how, hops(2) + hops(2, b"received ") + MSG)[0] == 554
    )  # any case, space before ':'
    assert send_by(c, how, hops(3) + MSG)[0] == 250  # the session goes on
    assert len(c.sink.committed) == 2


def test_received_in_body_does_not_count() -> None:
    c = Conn(config=CONFIG)
    c.ehlo()
    c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\nDATA\r\n")
    c.send(stuff(MSG + b"Received: quoted\r\n" * 80))
    assert c.codes()[-1] == 250


def test_talking_before_the_greeting_is_rejected() -> None:
    config = ServerConfig(hostname="mx.example.test", greet_delay=2.0)
    c = Conn(config=config)
    assert c.output() == b""
    c.send("EHLO eager.example\r\n")
    c.clock.advance(2)
    assert c.replies() == [(554, "5.5.0 Error: talking before the greeting")]
    assert c.closed
    polite = Conn(config=config)
    polite.clock.advance(2)
    assert polite.codes() == [220]
    polite.send("EHLO polite.example\r\n")
    assert polite.codes() == [250]


def test_auth_failures_are_counted_per_address_across_sessions() -> None:
    from mailrelay.policy.limits import RateCounter

    first = auth_conn()
    throttle = RateCounter(first.clock, limit=4, window=600)
    first.factory.auth_failures = throttle
    sessions = []
    for _ in range(2):  # each session: 2 wrong passwords, then it gives up (below 3 per session)
        c = auth_conn(clock=first.clock, factory=first.factory)
        c.server.session.settings = first.server.session.settings
        ehlo_keywords(c)
        c.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'x')}\r\n" * 2 + "QUIT\r\n")
        sessions.append(c.codes())
    assert sessions == [[535, 535, 221], [535, 535, 221]]
    c = auth_conn(clock=first.clock, factory=first.factory)
    c.server.session.settings = first.server.session.settings
    ehlo_keywords(c)
    c.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n")  # even the right one
    assert c.replies() == [(421, "4.7.0 Error: too many authentication failures from your address")]
    assert c.closed
    first.clock.advance(601)
    c = auth_conn(clock=first.clock, factory=first.factory)
    c.server.session.settings = first.server.session.settings
    ehlo_keywords(c)
    c.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 's3cret')}\r\n")
    assert c.codes() == [235]


# -- our Received header ends where we end it ---------------------------------------------------

FORGED = (
    b" by trusted-gateway.example (Postfix) with ESMTPS id X;\r\n"
    b"\tThu, 1 Jan 1970 00:00:00 +0000\r\n"
)


def trace_and_rest(data: bytes) -> tuple[bytes, bytes]:
    """Our Received header as a parser of header fields reads it (with every line that continues
    it, CRLF-terminated), and what follows it."""
    end = data.index(b"\r\n") + 2
    while data[end : end + 1] in (b" ", b"\t"):
        end = data.index(b"\r\n", end) + 2
    return data[:end], data[end:]


@pytest.mark.parametrize("how", ["DATA", "BDAT"])
@pytest.mark.parametrize("first", [b" ", b"\t"])
def test_text_beginning_with_whitespace_cannot_continue_our_received_header(
    how: str, first: bytes
) -> None:
    c = Conn(config=CONFIG)
    c.ehlo()
    message = first + FORGED[1:] + hops(60) + MSG  # no header section: its Received lines are body
    assert send_by(c, how, message)[0] == 250
    data = c.sink.committed[0].data
    trace, rest = trace_and_rest(data)
    assert (
        trace.startswith(b"Received: from client.example.org ([192.0.2.10])")
        and b"trusted-gateway" not in trace
    )
    assert trace.endswith(b" +0000\r\n")
    assert (
        rest == b"\r\n" + message
    )  # an empty line, then the client's text unchanged, as Postfix does
    assert email.message_from_bytes(data)["Received"].count("by ") == 1


def test_bdat_whose_first_octet_comes_after_an_empty_chunk_is_body_too() -> None:
    c = Conn(config=CONFIG)
    c.ehlo()
    c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\nBDAT 0\r\nBDAT 1\r\n\t")
    c.send(f"BDAT {len(FORGED) - 1} LAST\r\n".encode() + FORGED[1:])
    assert c.codes()[-3:] == [250, 250, 250]
    trace, rest = trace_and_rest(c.sink.committed[0].data)
    assert b"trusted-gateway" not in trace and rest == b"\r\n\t" + FORGED[1:]


@pytest.mark.parametrize("how", ["DATA", "BDAT"])
@pytest.mark.parametrize("message", [MSG, b"\r\nbody only\r\n", b"Subject: x\r\n", b""])
def test_other_text_follows_our_received_header_unchanged(how: str, message: bytes) -> None:
    c = Conn(config=CONFIG)
    c.ehlo()
    if how == "BDAT" and not message:
        c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\nBDAT 0 LAST\r\n")
        assert c.codes()[-1] == 250
    else:
        assert send_by(c, how, message)[0] == 250
    trace, rest = trace_and_rest(c.sink.committed[0].data)
    assert trace.endswith(b" +0000\r\n") and rest == message


@given(st.binary(max_size=300), st.lists(st.integers(0, 120), max_size=5))
@settings(max_examples=300, deadline=None)
def test_whatever_the_text_and_its_chunks_our_received_header_ends_where_we_end_it(
    text: bytes, cuts: list[int]
) -> None:
    c = Conn(config=CONFIG, binarymime=True)
    c.ehlo()
    c.send(b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\nRCPT TO:<user@example.test>\r\n")
    chunks, i = [], 0
    for cut in cuts:
        chunks.append(text[i : i + cut])
        i += cut
    for chunk in chunks:
        c.send(b"BDAT %d\r\n" % len(chunk) + chunk)
    c.send(b"BDAT %d LAST\r\n" % len(text[i:]) + text[i:])
    assert c.codes()[-1] == 250
    (w,) = c.sink.committed
    trace, rest = trace_and_rest(w.data)
    assert trace == w.chunks[0]  # all of our header, nothing of the client's
    assert rest == (b"\r\n" + text if text[:1] in (b" ", b"\t") else text)
