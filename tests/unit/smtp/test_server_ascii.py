"""Protocol numbers, keywords and blanks are ASCII (RFC 5234): other scripts' digits, case mappings
and blanks get a clear 5xx, never a traceback, a closed session or a reading as the ASCII form."""

from __future__ import annotations

import re

import pytest

from mailrelay.envelope import Recipient
from tests.support.smtp.extensions import CONFIG, auth_conn, b64, bdat_conn, ehlo_keywords
from tests.support.smtp.fakes import Conn, logged_failures, stuff

MSG = b"Subject: hi\r\n\r\nbody\r\n"
_REPLY_LINE = re.compile(rb"[2-5][0-9][0-9][ -][\x20-\x7e]*")


@pytest.fixture
def failures():
    """Every logged traceback: none may come from client input."""
    with logged_failures() as seen:
        yield seen


def ascii_replies(c: Conn) -> list[tuple[int, str]]:
    """The replies since the last call, each line checked to be printable ASCII SMTP."""
    out = c.output()
    assert out.endswith(b"\r\n") or not out
    assert all(_REPLY_LINE.fullmatch(line) for line in out.split(b"\r\n")[:-1]), out
    return [(int(line[:3]), line[4:].decode()) for line in out.split(b"\r\n") if line[3:4] == b" "]


def alive(c: Conn) -> None:
    c.send("NOOP\r\n")
    assert ascii_replies(c) == [(250, "2.0.0 Ok")] and not c.closed


@pytest.mark.parametrize(
    "param",
    [
        "SIZE=²",
        "SIZE=١٠",
        "SIZE=１０",
        "SIZE=1٠",
        "SIZE=𝟙",
        "BODY=8bıtmıme",
        "BODY=８BITMIME",
        "RET=hdrſ",
        "RET=ＦＵＬＬ",
        "ENVID=a+C3+A9",
        "ENVID=a+0D+0Ab",
        "ENVID=a+٤1",
        "ENVID=ａ",
    ],
)
def test_malformed_mail_parameter_is_501_5_5_4(param: str, failures: list) -> None:
    c = Conn(config=CONFIG)
    c.ehlo()
    c.send(f"MAIL FROM:<a@example.org> {param}\r\n")
    (reply,) = ascii_replies(c)
    assert reply[0] == 501 and reply[1].startswith("5.5.4 ")
    alive(c)
    assert failures == []


@pytest.mark.parametrize(
    "param",
    [
        "NOTIFY=ſuccess",
        "NOTIFY=FAILURE,ＤＥＬＡＹ",
        "NOTIFY=NEVER\u3000",
        "ORCPT=rfc822\u200b;b+40x.example",
        "ORCPT=ｒｆｃ822;b+40x.example",
        "ORCPT=rfc\u0130;b@x.example",
        "ORCPT=rfc822;b+C3+A9@x.example",
        "ORCPT=rfc822;b+0D+0A@x.example",
        "ORCPT=rfc822;b+٤0x.example",
    ],
)
def test_malformed_rcpt_parameter_is_501_5_5_4(param: str, failures: list) -> None:
    c = Conn(config=CONFIG, client="10.0.0.1")
    c.ehlo()
    c.send(f"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@x.example> {param}\r\n")
    assert ascii_replies(c)[1][0] == 501
    c.send("RCPT TO:<b@x.example> NOTIFY=success ORCPT=rfc822;b+40x.example\r\nDATA\r\n")
    c.send(stuff(MSG))
    assert [code for code, _ in ascii_replies(c)] == [250, 354, 250]
    assert c.sink.committed[0].envelope.recipients == (
        Recipient("b@x.example", ("SUCCESS",), "rfc822;b@x.example"),
    )
    assert failures == []


@pytest.mark.parametrize(
    "command",
    [
        "BDAT ١٤ LAST",
        "BDAT １４ LAST",
        "BDAT ¹4 LAST",
        "BDAT 14 LAſT",
        "BDAT 14\u3000LAST",
        "BDAT 14\u00a0",
    ],
)
def test_bdat_size_and_last_are_ascii(command: str, failures: list) -> None:
    c = bdat_conn()
    c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\n")
    c.send(
        command.encode() + b"\r\n" + b"Subject: x\r\n\r\n"
    )  # 14 octets a middlebox would not count
    replies = ascii_replies(c)
    assert replies[-1] == (501, "5.5.4 Syntax: BDAT size [LAST]") and c.closed
    assert not c.sink.committed and failures == []


@pytest.mark.parametrize(
    "verb", ["quıt", "ﬆarttls", "rſet", "NOOP\u3000", "ＮＯＯＰ", "dAtA\u0130"]
)
def test_verbs_are_ascii_keywords(verb: str) -> None:
    c = Conn(config=CONFIG)
    c.ehlo()
    c.send(f"{verb}\r\n")
    assert ascii_replies(c) == [(500, "5.5.2 Error: command not recognized")]
    alive(c)


@pytest.mark.parametrize("blank", ["\u3000", "\u00a0", "\u2028", "\u200b", "\x1c", "\x0b"])
def test_only_ascii_blanks_around_arguments(blank: str) -> None:
    c = Conn(config=CONFIG)
    c.replies()
    c.send(f"EHLO client.example{blank}\r\nHELO {blank}client.example\r\n")
    assert [code for code, _ in ascii_replies(c)] == [501, 501]
    c.ehlo()
    c.send(
        f"RSET {blank}\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@example.test>\r\nDATA {blank}\r\n"
    )
    assert [code for code, _ in ascii_replies(c)] == [501, 250, 250, 501]
    c.send("DATA \t\r\n")
    assert [code for code, _ in ascii_replies(c)] == [354]


def test_replies_echo_client_text_as_printable_ascii() -> None:
    c = Conn(config=CONFIG)
    c.replies()
    c.send("EHLO bücher.example\r\nMAIL FROM:<a@example.org> X²=1\r\nMAIL FROM:<a@[١.٢.٣.٤]>\r\n")
    replies = ascii_replies(c)
    assert [code for code, _ in replies] == [250, 501, 501]
    assert "X\\xb2=1" in replies[1][1]


@pytest.mark.parametrize(
    "command",
    [
        "AUTH plaın {plain}",
        "AUTH ＰＬＡＩＮ {plain}",
        "AUTH \u3000PLAIN {plain}",
        "AUTH PLAIN {plain}\u3000",
        "AUTH PLAIN {plain}\u00a0",
        "AUTH PLAIN ＡＧＦ",
        "AUTH PLAIN {plain}\x1c",
    ],
)
def test_auth_mechanism_and_response_are_ascii(command: str, failures: list) -> None:
    c = auth_conn()
    ehlo_keywords(c)
    c.send(command.format(plain=b64("\0alice\0s3cret")) + "\r\n")
    (reply,) = ascii_replies(c)
    assert reply[0] in (501, 504) and c.server.session.info.auth is None
    alive(c)
    assert failures == []


@pytest.mark.parametrize("blank", ["\u3000", "\u2028", "\x1c"])
def test_auth_login_responses_are_ascii(blank: str) -> None:
    c = auth_conn()
    ehlo_keywords(c)
    c.send("AUTH LOGIN\r\n" + b64("alice") + blank + "\r\n")
    assert ascii_replies(c)[-1] == (501, "5.5.2 Cannot decode response")
    alive(c)
