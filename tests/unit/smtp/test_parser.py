"""Table and property tests of the sans-I/O parser: commands, DATA, BDAT, paths, parameters."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.smtp._parser import (
    BadLine,
    Command,
    DataChunk,
    DataEnd,
    DataError,
    LineError,
    Parser,
    PathError,
    decode_xtext,
    parse_params,
    parse_path,
    split_path,
)
from tests.support.smtp.fakes import stuff


def events(parser: Parser) -> list:
    out = []
    while (e := parser.next_event()) is not None:
        out.append(e)
    return out


def run_data(stuffed: bytes, pieces: list[int] | None = None, max_size: int = 10**9, **kw) -> list:
    """Feed ``DATA`` then ``stuffed`` (split at ``pieces``), collect every event after 354."""
    p = Parser(**kw)
    p.feed(b"DATA\r\n")
    assert events(p) == [Command("DATA", "")]
    p.begin_data(max_size)
    out = []
    cuts = [0, *sorted(set(pieces or [])), len(stuffed)]
    for a, b in zip(cuts, cuts[1:], strict=False):
        p.feed(stuffed[a:b])
        out.extend(events(p))
    return out


def body_of(evs: list) -> bytes:
    return b"".join(e.data for e in evs if isinstance(e, DataChunk))


# -- command mode ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wire, expected",
    [
        (b"EHLO client\r\n", [Command("EHLO", "client")]),
        (b"ehlo client\r\n", [Command("EHLO", "client")]),
        (b"MAIL FROM:<a@b> SIZE=10\r\n", [Command("MAIL", "FROM:<a@b> SIZE=10")]),
        (b"NOOP\r\nQUIT\r\n", [Command("NOOP", ""), Command("QUIT", "")]),
        (b"NOOP\r\nQUI", [Command("NOOP", "")]),  # the unfinished line waits
        (b"NOOP\nQUIT\r\n", [BadLine(LineError.BARE_NEWLINE)]),  # LF does not end a line
        (b"NOOP\rQUIT\r\n", [BadLine(LineError.BARE_NEWLINE)]),
        (b"\xff\xfe\r\n", [BadLine(LineError.BAD_ENCODING)]),
        (b"X" * 510 + b"\r\n", [Command("X" * 510, "")]),  # exactly 512 with CRLF
        (b"X" * 511 + b"\r\n", [BadLine(LineError.TOO_LONG)]),
        (b"X" * 5000 + b" QUIT\r\nNOOP\r\n", [BadLine(LineError.TOO_LONG), Command("NOOP", "")]),
    ],
)
def test_command_lines(wire: bytes, expected: list) -> None:
    p = Parser()
    p.feed(wire)
    assert events(p) == expected


def test_overlong_line_fed_in_pieces_is_one_error_and_memory_stays_bounded() -> None:
    p = Parser()
    seen = []
    for _ in range(1000):
        p.feed(b"A" * 997 + b"\r")  # CRs that are not followed by LF: not a line end
        seen.extend(events(p))
        assert p.buffered <= 512
    p.feed(b"\nRCPT TO:<x@y>\r\n")
    seen.extend(events(p))
    assert seen == [BadLine(LineError.TOO_LONG), Command("RCPT", "TO:<x@y>")]


def test_crlf_split_across_feeds_still_ends_an_overlong_line() -> None:
    p = Parser()
    p.feed(b"B" * 600 + b"\r")
    assert events(p) == []
    p.feed(b"\nNOOP\r\n")
    assert events(p) == [BadLine(LineError.TOO_LONG), Command("NOOP", "")]


def test_discard_buffer_drops_pipelined_plaintext() -> None:
    p = Parser()
    p.feed(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n")
    assert p.next_event() == Command("STARTTLS", "")
    assert p.discard_buffer() == len(b"MAIL FROM:<evil@x>\r\n")
    assert events(p) == []


# -- DATA -----------------------------------------------------------------------------------------


def test_data_unstuffs_and_ends_at_crlf_dot_crlf_and_commands_follow() -> None:
    p = Parser()
    p.feed(b"DATA\r\n")
    events(p)
    p.begin_data(10**6)
    p.feed(b"Subject: x\r\n\r\n..one\r\n...two\r\n.three\r\n. \r\n.\r\nQUIT\r\n")
    evs = events(p)
    assert body_of(evs) == b"Subject: x\r\n\r\n.one\r\n..two\r\nthree\r\n \r\n"
    assert evs[-2] == DataEnd(len(body_of(evs)))
    assert evs[-1] == Command("QUIT", "")


def test_empty_message() -> None:
    assert run_data(b".\r\n") == [DataEnd(0)]


def test_dot_line_first_in_message_is_unstuffed() -> None:
    assert body_of(run_data(b"..x\r\n.\r\n")) == b".x\r\n"


@pytest.mark.parametrize("cut", range(1, 12))
def test_end_of_data_split_anywhere(cut: int) -> None:
    wire = b"abc\r\n..d\r\n.\r\n"
    evs = run_data(wire, [cut])
    assert body_of(evs) == b"abc\r\n.d\r\n"
    assert evs[-1] == DataEnd(9)


@given(
    lines=st.lists(
        st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        max_size=40,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=6000), max_size=12),
)
@settings(max_examples=300, deadline=None)
def test_any_message_split_anywhere_comes_out_byte_for_byte(
    lines: list[bytes], cuts: list[int]
) -> None:
    message = b"".join(line + b"\r\n" for line in lines)
    evs = run_data(stuff(message), cuts)
    assert body_of(evs) == message
    assert evs[-1] == DataEnd(len(message))
    assert sum(isinstance(e, DataEnd) for e in evs) == 1


SMUGGLED = (
    b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nsmuggled\r\n"
)


@pytest.mark.parametrize(
    "sequence",
    [
        b"\n.\n",
        b"\r.\r",
        b"\r\n.\r",
        b"\n.\r\n",
        b"\r.\r\n",
        b"\n.\r",
        b"\r\n.\n",
        b"\r\n\n.\r\n",
        b"\r\n.\r\r\n",
        b"\r\n.\n\r\n",
        b"\n..\n",
        b".\n",
    ],
)
@pytest.mark.parametrize("cut", [None, 1, 3])
def test_smuggled_end_of_data_never_makes_a_second_message(
    sequence: bytes, cut: int | None
) -> None:
    """Bare CR/LF end-of-data look-alikes stay inside the one message, which is rejected whole."""
    wire = b"Subject: s\r\n\r\nfirst" + sequence + SMUGGLED + b".\r\nNOOP\r\n"
    pieces = [wire.index(sequence) + cut] if cut else None
    evs = run_data(wire, pieces)
    ends = [e for e in evs if isinstance(e, DataEnd)]
    assert ends == [DataEnd(ends[0].size, DataError.BARE_NEWLINE)]
    # nothing of the smuggled transaction is read as a command; only what follows the real end
    assert [e for e in evs if isinstance(e, Command)] == [Command("NOOP", "")]
    assert b"evil" not in body_of(evs)


def test_text_line_limit_dooms_the_message_and_keeps_memory_bounded() -> None:
    p = Parser()
    p.feed(b"DATA\r\n")
    events(p)
    p.begin_data(10**9)
    out = []
    p.feed(b"ok\r\n")
    for _ in range(2000):
        p.feed(b"y" * 4096)
        out.extend(events(p))
        assert p.buffered < 1100
    p.feed(b"\r\nmore\r\n.\r\nNOOP\r\n")
    out.extend(events(p))
    assert [e for e in out if isinstance(e, DataEnd)] == [DataEnd(4, DataError.LINE_TOO_LONG)]
    assert out[-1] == Command("NOOP", "")
    assert body_of(out) == b"ok\r\n"


@pytest.mark.parametrize("length, error", [(998, None), (999, DataError.LINE_TOO_LONG)])
def test_text_line_limit_is_1000_octets_with_crlf(length: int, error: DataError | None) -> None:
    evs = run_data(b"z" * length + b"\r\n.\r\n")
    assert evs[-1].error is error


def test_size_limit_discards_the_rest_and_reports_too_big() -> None:
    evs = run_data(b"0123456789\r\n" * 100 + b".\r\n", [50, 500], max_size=300)
    assert evs[-1].error is DataError.TOO_BIG
    assert len(body_of(evs)) <= 300


# -- BDAT -----------------------------------------------------------------------------------------


def test_bdat_chunks_are_exact_octet_counts_and_commands_follow() -> None:
    p = Parser()
    p.begin_bdat(5, last=False, max_size=100, total=0, binary=False)
    p.feed(b"ab\r\ncNOOP\r\n")
    assert events(p) == [DataChunk(b"ab\r\nc"), DataEnd(5, None, last=False), Command("NOOP", "")]
    p.begin_bdat(3, last=True, max_size=100, total=5, binary=False)
    p.feed(b"d\r\n")
    assert events(p) == [DataChunk(b"d\r\n"), DataEnd(8, None, last=True)]


def test_bdat_crlf_split_across_chunks_is_not_bare() -> None:
    p = Parser()
    p.begin_bdat(3, last=False, max_size=100, total=0, binary=False)
    p.feed(b"ab\r")
    assert events(p)[-1] == DataEnd(3, None, last=False)
    p.begin_bdat(3, last=True, max_size=100, total=3, binary=False)
    p.feed(b"\ncd")
    assert events(p)[-1] == DataEnd(6, None, last=True)


def test_bdat_bare_lf_rejected_unless_binarymime() -> None:
    for binary, error in [(False, DataError.BARE_NEWLINE), (True, None)]:
        p = Parser()
        p.begin_bdat(6, last=True, max_size=100, total=0, binary=binary)
        p.feed(b"a\nb\r\n.")
        assert events(p)[-1].error is error


# -- paths and parameters -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arg, address, local",
    [
        ("FROM:<a@b.example>", "a@b.example", "a"),
        ("from:<a@b.example>", "a@b.example", "a"),
        ("FROM: <a@b.example>", "a@b.example", "a"),
        ("FROM:<>", "", ""),
        ("FROM:<@relay.example,@other.example:u@x.example>", "u@x.example", "u"),
        ('FROM:<"plain"@x.example>', "plain@x.example", "plain"),
        ('FROM:<"us@er"@x.example>', '"us@er"@x.example', "us@er"),
        ('FROM:<"a>b"@x.example>', '"a>b"@x.example', "a>b"),
        ("FROM:<u@[192.0.2.1]>", "u@[192.0.2.1]", "u"),
        ("FROM:<u@[IPv6:2001:db8::1]>", "u@[IPv6:2001:db8::1]", "u"),
        ("FROM:<user%other@x.example>", "user%other@x.example", "user%other"),
        ("FROM:<Ünïcode@bücher.example>", "Ünïcode@bücher.example", "Ünïcode"),
        (
            "FROM:<u@" + "\u00fc" * 40 + ".example>",
            "u@" + "\u00fc" * 40 + ".example",
            "u",
        ),  # 80 octets, short A-label
    ],
)
def test_good_paths(arg: str, address: str, local: str) -> None:
    inner, rest = split_path(arg, "FROM")
    path = parse_path(inner, allow_null=True, allow_postmaster=False)
    assert (path.address, path.local_part) == (address, local)


@pytest.mark.parametrize(
    "arg, syntax",
    [
        ("FROM:a@b.example", True),  # no brackets
        ("FROM<a@b.example>", True),
        ("FROM:<a@b.example", True),
        ("FROM:<a@b.example>junk", True),
        ("FROM:<not an address>", False),
        ("FROM:<a@b.example.>", False),  # trailing dot
        ("FROM:<a@@b.example>", False),
        ("FROM:<a.@b.example>", False),
        ("FROM:<a@-b.example>", False),
        ("FROM:<a@[999.1.1.1]>", False),
        ("FROM:<a@[not-a-literal]>", False),
        ("FROM:<" + "l" * 65 + "@b.example>", False),
        ("FROM:<a@" + "d" * 64 + ".example>", False),
        ("FROM:<@bad route:u@x.example>", False),
        ("FROM:<postmaster>", False),  # unqualified only for RCPT
        ("FROM:<u@b\u00fccher..example>", False),
        (
            "FROM:<u@"
            + "\u00e4\u00f6\u00fc\u00e9\u00e8\u00ea\u00e1\u00e0\u00e2\u00ed" * 7
            + ".example>",
            False,
        ),
        ("FROM:<u@xn--\u00fc.example>", False),  # not valid IDNA
    ],
)
def test_bad_paths(arg: str, syntax: bool) -> None:
    with pytest.raises(PathError) as e:
        inner, _ = split_path(arg, "FROM")
        parse_path(inner, allow_null=True, allow_postmaster=False)
    assert e.value.syntax is syntax


def test_postmaster_unqualified_and_null_only_where_allowed() -> None:
    assert parse_path("PostMaster", allow_null=False, allow_postmaster=True).address == "postmaster"
    with pytest.raises(PathError):
        parse_path("", allow_null=False, allow_postmaster=True)


def test_params() -> None:
    assert parse_params("SIZE=100 body=8BITMIME  SMTPUTF8") == {
        "SIZE": "100",
        "BODY": "8BITMIME",
        "SMTPUTF8": None,
    }
    for bad in ["SIZE=", "=x", "SIZE=1 SIZE=2", "A=b=c", "-X"]:
        with pytest.raises(PathError):
            parse_params(bad)


def test_xtext() -> None:
    assert decode_xtext("rfc822;a+2Bb@x") == "rfc822;a+b@x"
    assert decode_xtext("+20+7E") == " ~"
    for bad in ["a+2", "a+zz", "a b", "a+0D+0Ab", "a+00", "+09", "+7F", "+C3+A9"]:
        with pytest.raises(PathError):
            decode_xtext(bad)


@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=8))
@settings(max_examples=300, deadline=None)
def test_fuzz_any_bytes_never_raise_and_memory_stays_bounded(data: bytes, cuts: list[int]) -> None:
    p = Parser()
    cuts = [0, *sorted(set(cuts)), len(data)]
    for a, b in zip(cuts, cuts[1:], strict=False):
        p.feed(data[a:b])
        for e in events(p):
            if isinstance(e, Command) and e.verb == "DATA":
                p.begin_data(2000)
        assert p.buffered <= max(1100, b - a + 1100)
