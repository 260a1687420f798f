"""The Received trace header: RFC 5321 4.4 shape, RFC 3848 protocol names, nothing injectable."""

from __future__ import annotations

from mailrelay.envelope import Envelope, Recipient, SessionInfo, TLSInfo
from mailrelay.intake.received import protocol_name, received_header


def test_protocol_names() -> None:
    assert [
        protocol_name(*a)
        for a in [
            (False, False, False),
            (True, False, False),
            (True, True, False),
            (True, False, True),
            (True, True, True),
            (True, True, True, True),
        ]
    ] == ["SMTP", "ESMTP", "ESMTPS", "ESMTPA", "ESMTPSA", "UTF8SMTPSA"]


def test_tls_and_auth_comments_and_hostile_helo() -> None:
    info = SessionInfo(
        "192.0.2.5",
        hostname="mx.example.test",
        helo="evil)\tname(\x00",
        tls=TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384"),
        auth="alice",
    )
    env = Envelope("a@example.org", (Recipient("b@example.test"),), protocol="ESMTPSA")
    header = received_header(info, env, "QID1", 0.0).decode()
    assert header == (
        "Received: from evil??name?? ([192.0.2.5])\r\n"
        "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)\r\n"
        "\t(Authenticated sender: alice)\r\n"
        "\tby mx.example.test (mailrelay) with ESMTPSA id QID1\r\n"
        "\tfor <b@example.test>; Thu, 01 Jan 1970 00:00:00 +0000\r\n"
    )


def test_utf8_recipient_kept_in_an_smtputf8_message_only() -> None:
    info = SessionInfo("192.0.2.5", hostname="mx.example.test", helo="c")
    rcpt = (Recipient("jörg@bücher.example"),)
    utf8 = received_header(info, Envelope("", rcpt, smtputf8=True, protocol="UTF8SMTP"), "Q", 0.0)
    plain = received_header(info, Envelope("", rcpt, protocol="ESMTP"), "Q", 0.0)
    assert "for <jörg@bücher.example>;" in utf8.decode()
    assert b"for <j?rg@b?cher.example>;" in plain


def test_nothing_that_reads_as_a_line_break_or_space_passes_in_a_utf8_header() -> None:
    info = SessionInfo("192.0.2.5", hostname="mx.example.test", helo="c")
    rcpt = (Recipient("a\u2028by\u00a0evil\u3000x\u2029\x85é@example.test"),)
    header = received_header(
        info, Envelope("", rcpt, smtputf8=True, protocol="UTF8SMTP"), "Q", 0.0
    ).decode()
    assert "for <a?by?evil?x??é@example.test>;" in header
