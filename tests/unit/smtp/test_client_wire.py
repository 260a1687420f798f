"""The client's sans-I/O pieces: reply parsing (tables), dot-stuffing (properties over chunks)."""

from __future__ import annotations

import io
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.envelope import Reply
from mailrelay.smtp._client_body import CHUNK_SIZE, bdat_frames
from mailrelay.smtp._client_wire import (
    DotStuffer,
    ReplyError,
    ReplyParser,
    normalise_crlf,
    parse_ehlo,
)
from tests.support.smtp.client import unstuff


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (b"250 ok\r\n", [Reply(250, None, "ok")]),
        (b"250 2.1.0 Sender ok\r\n", [Reply(250, "2.1.0", "Sender ok")]),
        (
            b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n",
            [Reply(250, None, "mx.test\nPIPELINING\nSIZE 1000")],
        ),
        (b"550-5.1.1 no\r\n550 5.1.1 such user\r\n", [Reply(550, "5.1.1", "no\nsuch user")]),
        (b"250 5.1.1 class mismatch\r\n", [Reply(250, None, "5.1.1 class mismatch")]),
        (b"354\r\n", [Reply(354, None, "")]),
        (b"220 a\n", [Reply(220, None, "a")]),  # a bare LF ending is tolerated from servers
        (b"250 a\r\n251 b\r\n", [Reply(250, None, "a"), Reply(251, None, "b")]),
        (b"421 4.3.2 bye\r\n", [Reply(421, "4.3.2", "bye")]),
    ],
)
def test_reply_table(wire: bytes, expected: list[Reply]) -> None:
    assert list(ReplyParser().feed(wire)) == expected


@given(st.lists(st.integers(min_value=0, max_value=60), max_size=10))
def test_reply_split_anywhere(cuts: list[int]) -> None:
    wire = (
        b"250-mx.test greets\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 1000\r\n550 5.7.1 no\r\n"
    )
    parser, out, prev = ReplyParser(), [], 0
    for cut in sorted(set(cuts)) + [len(wire)]:
        out += list(parser.feed(wire[prev:cut]))
        prev = max(prev, cut)
    assert out == list(ReplyParser().feed(wire))
    assert [r.code for r in out] == [250, 550]


@pytest.mark.parametrize(
    "wire",
    [
        b"hello\r\n",
        b"25\r\n",
        b"2500 x\r\n",
        b"250x\r\n",
        b"999 x\r\n",
        b"250-a\r\n251 b\r\n",
        b"250 " + b"x" * 5000 + b"\r\n",
    ],
)
def test_reply_garbage(wire: bytes) -> None:
    with pytest.raises(ReplyError):
        list(ReplyParser().feed(wire))


def test_replies_before_garbage_come_out_first() -> None:
    replies = ReplyParser().feed(b"220 go ahead\r\nthis is not SMTP\r\n")
    assert next(replies) == Reply(220, None, "go ahead")  # a STARTTLS caller stops here
    with pytest.raises(ReplyError):
        next(replies)


def test_reply_parser_reset_drops_buffer() -> None:
    p = ReplyParser()
    assert list(p.feed(b"220 go ahead\r\n250 inj")) == [Reply(220, None, "go ahead")]
    p.reset()
    assert list(p.feed(b"250 ok\r\n")) == [Reply(250, None, "ok")]


def test_parse_ehlo() -> None:
    reply = next(
        ReplyParser().feed(
            b"250-mx.test\r\n250-SIZE 1024\r\n250-pipelining\r\n250 AUTH PLAIN LOGIN\r\n"
        )
    )
    assert parse_ehlo(reply) == {"SIZE": "1024", "PIPELINING": "", "AUTH": "PLAIN LOGIN"}


def test_parse_ehlo_old_auth_spelling() -> None:
    reply = next(ReplyParser().feed(b"250-mx.test\r\n250-AUTH=LOGIN PLAIN\r\n250 8BITMIME\r\n"))
    assert parse_ehlo(reply) == {"AUTH": "LOGIN PLAIN", "8BITMIME": ""}


def stuff(body: bytes, cuts: list[int]) -> bytes:
    s, out, prev = DotStuffer(), [], 0
    for cut in sorted(set(c % (len(body) + 1) for c in cuts)) + [len(body)]:
        out.append(s.feed(body[prev:cut]))
        prev = max(prev, cut)
    out.append(s.finish())
    return b"".join(out)


crlf_lines = st.lists(
    st.sampled_from([b"", b".", b"..", b".x", b"x.", b"a", b"hello .", b"\x00\xff"]), max_size=12
)


@given(crlf_lines, st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_dot_stuffing_round_trips_for_any_chunking(lines: list[bytes], cuts: list[int]) -> None:
    body = b"".join(ln + b"\r\n" for ln in lines)
    assert unstuff(stuff(body, cuts)) == body


@given(
    st.binary(max_size=200).map(lambda b: b.replace(b"\x00", b".")),
    st.lists(st.integers(0, 200), max_size=12),
)
def test_any_bytes_come_out_crlf_and_stuffed(body: bytes, cuts: list[int]) -> None:
    out = stuff(body, cuts)
    expected = re.sub(rb"\r\n|\r|\n", b"\r\n", body)
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert unstuff(out) == expected
    assert out.count(b"\r\n.\r\n") + (out == b".\r\n") == 1  # one end of data, at the end


def test_dot_at_every_chunk_boundary() -> None:
    line = b"." + b"x" * 14 + b"\r\n"  # 17 bytes; chunk of 17 makes every chunk start with a dot
    body = line * 50
    out = stuff(body, list(range(0, len(body), len(line))))
    assert out.count(b"\r\n..x") == 49 and out.startswith(b"..x")
    assert unstuff(out) == body


def test_empty_body() -> None:
    assert stuff(b"", []) == b".\r\n"


def test_normalise_crlf_for_bdat() -> None:
    data, pending = normalise_crlf(b"a\nb\r", False)
    assert (data, pending) == (b"a\r\nb", True)
    data, pending = normalise_crlf(b"\nc", pending)
    assert (data, pending) == (b"\r\nc", False)


@pytest.mark.parametrize(
    ("body", "binary", "frames"),
    [
        (b"", False, [(b"BDAT 0 LAST\r\n", True)]),
        (b"a\nb", False, [(b"BDAT 4 LAST\r\na\r\nb", True)]),
        (b"a\r", False, [(b"BDAT 3 LAST\r\na\r\n", True)]),  # a lone CR at the end
        (b"a\nb", True, [(b"BDAT 3 LAST\r\na\nb", True)]),
    ],
)
def test_bdat_frames_say_their_size_and_which_is_last(body, binary, frames):
    assert list(bdat_frames(io.BytesIO(body), binary)) == frames


def test_bdat_frames_of_a_long_text_join_to_the_text_with_crlf_endings():
    text = b"line\n" * (CHUNK_SIZE // 3)
    frames = list(bdat_frames(io.BytesIO(text), False))
    assert len(frames) > 1 and [last for _, last in frames] == [False] * (len(frames) - 1) + [True]
    payload = b""
    for frame, last in frames:
        head, _, data = frame.partition(b"\r\n")
        assert head == b"BDAT %d%s" % (len(data), b" LAST" if last else b"")
        payload += data
    assert payload == text.replace(b"\n", b"\r\n")
