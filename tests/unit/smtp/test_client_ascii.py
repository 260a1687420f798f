"""The client reads reply codes, enhanced codes and EHLO keywords as ASCII (RFC 5321 4.2, RFC 5234):
other scripts' digits, case mappings and blanks from a peer are never read as the ASCII form."""

from __future__ import annotations

import pytest

from mailrelay.envelope import NextHop, Reply, TLSPolicy
from mailrelay.smtp._client_wire import ReplyError, ReplyParser, parse_ehlo
from tests.support.delivery.harness import Harness
from tests.support.smtp.client import Conn


@pytest.mark.parametrize("code", ["２５０", "25٠", "²50", "2५0", "25\u00a0", "\u200b250"])
def test_reply_code_is_three_ascii_digits(code: str) -> None:
    with pytest.raises(ReplyError):
        list(ReplyParser().feed(f"{code} ok\r\n".encode()))


@pytest.mark.parametrize(
    "text", ["2.٠.٠ queued", "2.１.0 queued", "2.0.²  queued", "2.0.0\u3000queued"]
)
def test_enhanced_code_is_ascii_digits(text: str) -> None:
    (reply,) = ReplyParser().feed(f"250 {text}\r\n".encode())
    assert reply == Reply(250, None, text)


@pytest.mark.parametrize(
    "line, keyword",
    [
        ("ſIZE 1000", "ſIZE"),
        ("pıpelınıng", "PıPELıNıNG"),
        ("ﬆarttls", "ﬆARTTLS"),
        ("PIPELINING\u3000", "PIPELINING\u3000"),
        ("\u00a0CHUNKING", "\u00a0CHUNKING"),
        ("8BITMIME\u2028", "8BITMIME\u2028"),
    ],
)
def test_ehlo_keywords_are_ascii(line: str, keyword: str) -> None:
    (reply,) = ReplyParser().feed(f"250-mx.test\r\n250 {line}\r\n".encode())
    assert list(parse_ehlo(reply)) == [keyword]


@pytest.mark.parametrize("value", ["١٠", "²", "１０", "1٠", "10\u3000", "-1", "1_0", "0"])
def test_ehlo_size_is_ascii_digits_or_no_limit(value: str) -> None:
    c = Conn(ehlo=f"250-mx.test\r\n250 SIZE {value}\r\n".encode())
    assert c.client.size_limit is None
    h = Harness(
        NextHop("127.0.0.1", 25), tls=TLSPolicy.NONE
    )  # a 20-octet message, a peer's "SIZE 10"
    h.accept(0)
    h.reply(f"220 mx\r\n250-mx\r\n250 SIZE {value}\r\n".encode())
    assert h.sent() == b"EHLO relay.test\r\nMAIL FROM:<a@x.test> SIZE=20\r\n"
    assert h.result == []


@pytest.mark.parametrize("mechanisms", ["plaın loğin", "ＰＬＡＩＮ", "PLAIN\u3000LOGIN"])
def test_auth_mechanisms_offered_are_ascii(mechanisms: str) -> None:
    h = Harness(
        NextHop("127.0.0.1", 25), tls=TLSPolicy.NONE, auth=("user", "pw"), allow_plaintext_auth=True
    )
    h.accept(0)
    h.reply(f"220 mx\r\n250-mx\r\n250 AUTH {mechanisms}\r\n".encode())
    assert b"AUTH" not in h.sent()
    (reply, _), _ = h.result[0]  # type: ignore[misc]
    assert reply.code == 451 and "no AUTH mechanism we use" in reply.text
