"""Whole sessions fed arbitrary input (hypothesis): no exception escapes, no hang, memory bounded,
and the hashed password file checker."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin

from mailrelay.config import ServerConfig
from mailrelay.smtp._client_wire import ReplyParser
from mailrelay.smtp.auth import HashedPasswordFile, decode_plain, hash_password, verify_password
from tests.support.smtp.fakes import Conn, logged_failures

CONFIG = ServerConfig(
    hostname="mx.example.test",
    local_domains=("example.test",),
    max_message_size=5000,
    trusted_networks=(ipaddress.ip_network("192.0.2.0/24"),),
)

WORDS = [
    b"EHLO x\r\n",
    b"HELO x\r\n",
    b"MAIL FROM:<a@example.org>\r\n",
    b"MAIL FROM:<> SIZE=10 BODY=BINARYMIME\r\n",
    b"RCPT TO:<u@example.test>\r\n",
    b"RCPT TO:<u@x.example> NOTIFY=NEVER\r\n",
    b"DATA\r\n",
    b"BDAT 5\r\n",
    b"BDAT 3 LAST\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"AUTH PLAIN\r\n",
    b"STARTTLS\r\n",
    b".\r\n",
    b"\r\n.\r\n",
    b"\n.\n",
    b"\r",
    b"\n",
    b".",
    b"x" * 600,
    b"Received: x\r\n",
    b"QUIT\r\n",
    b"VRFY u\r\n",
    b"\xff\xfe",
]


@given(
    st.lists(st.one_of(st.sampled_from(WORDS), st.binary(max_size=200)), max_size=60),
    st.lists(st.integers(1, 400), max_size=10),
)
@settings(max_examples=400, deadline=None)
def test_any_session_input_never_raises_and_stays_bounded(
    pieces: list[bytes], cuts: list[int]
) -> None:
    with logged_failures() as errors:
        c = Conn(config=CONFIG)
        data = b"".join(pieces)
        i = 0
        for cut in [*cuts, len(data)]:
            if c.closed:
                break
            c.send(data[i : i + cut])
            i += cut
            assert c.server.session.parser.buffered <= 1100 + cut
        c.clock.advance(700)  # every session ends (timeout) unless it already closed
        assert c.closed
        c.proto.connectionLost(None)
        assert all(w.committed or w.aborted for w in c.sink.writers)
    assert errors == []


# -- the non-ASCII alphabet: other scripts' digits, case mappings and blanks (issue 19 item 2)

NON_ASCII = "²١٤０９\u00a0\u3000\u2028\u200bıſﬆ\u212a"
SLOT = NON_ASCII + "0123456789 LAST,;+=:<>@.successFULLhdrsplain"
TEMPLATES = [
    "EHLO {}",
    "HELO c{}",
    "MAIL FROM:<a@example.org> SIZE={}",
    "MAIL FROM:<a@example.org> BODY={}",
    "MAIL FROM:<a@example.org> RET={} ENVID={}",
    "MAIL FROM:<a@[{}]>",
    "RCPT TO:<u@example.test> NOTIFY={}",
    "RCPT TO:<u@example.test> ORCPT={};u+40example.test",
    "RCPT TO:<u@example.test> ORCPT=rfc822;{}",
    "BDAT {}",
    "BDAT {} LAST",
    "BDAT 4{}LAST",
    "DATA{}",
    "DATA {}",
    "RSET {}",
    "{}QUIT",
    "qu{}t",
    "AUTH {}",
    "AUTH PLAIN {}",
    "STARTTLS {}",
    "NOOP{}",
    "VRFY {}",
    "{}",
    "Subject: {}",
    ".",
]
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])[\x20-\x7e]*")


def _lines(template: str, fills: list[str]) -> bytes:
    return (template.format(*(fills * 2)[: template.count("{}")]) + "\r\n").encode()


@given(
    st.lists(
        st.tuples(
            st.sampled_from(TEMPLATES), st.lists(st.text(SLOT, max_size=6), min_size=2, max_size=2)
        ),
        max_size=30,
    ),
    st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_non_ascii_digits_and_blanks_get_well_formed_replies(
    commands: list[tuple[str, list[str]]], ehlo: bool
) -> None:
    with logged_failures() as errors:
        c = Conn(config=CONFIG, client="192.0.2.7")
        c.send(
            (b"EHLO c\r\n" if ehlo else b"") + b"".join(_lines(t, fills) for t, fills in commands)
        )
        c.clock.advance(700)
        assert c.closed
        c.proto.connectionLost(None)
    assert errors == []
    out = c.transport.value()
    assert out.endswith(b"\r\n")
    code = None  # of the multiline reply in progress
    for line in out.split(b"\r\n")[:-1]:
        m = _REPLY_LINE.fullmatch(line)
        assert m, line
        assert code in (None, m.group(1)), out
        code = m.group(1) if m.group(2) == b"-" else None
    for reply in ReplyParser().feed(
        out
    ):  # what a client reads: error replies carry their enhanced code
        assert reply.code < 400 or (reply.enhanced or "")[:1] == str(reply.code)[0], reply


def test_password_hashes() -> None:
    h = hash_password("pässword", iterations=1000)
    assert h.startswith("$pbkdf2-sha256$1000$")
    assert verify_password("pässword", h) and not verify_password("password", h)
    assert not verify_password("x", "garbage") and not verify_password("x", "$md5$1$a$b")
    assert hash_password("x", 1000) != hash_password("x", 1000)  # salted


def test_plain_decoding() -> None:
    assert decode_plain(b"\0alice\0pw") == ("", "alice", "pw")
    for bad in [b"alice\0pw", b"\0\0pw", b"a\0b\0c\0d", b"\0\xff\0pw"]:
        with pytest.raises(ValueError):
            decode_plain(bad)


def test_password_file_checker_reloads_on_change(tmp_path) -> None:
    path = tmp_path / "passwd"
    path.write_text(f"alice:{hash_password('one', 1000)}\n")
    checker = HashedPasswordFile(str(path))
    results = []
    checker.requestAvatarId(UsernamePassword(b"alice", b"one")).addBoth(results.append)
    checker.requestAvatarId(UsernamePassword(b"alice", b"two")).addBoth(results.append)
    checker.requestAvatarId(UsernamePassword(b"bob", b"one")).addBoth(results.append)
    assert results[0] == "alice"
    assert results[1].check(UnauthorizedLogin) and results[2].check(UnauthorizedLogin)
    import os

    path.write_text(f"# changed\nbob:{hash_password('two', 1000)}\n")
    os.utime(path, (1, 1))
    checker.requestAvatarId(UsernamePassword(b"bob", b"two")).addBoth(results.append)
    assert results[3] == "bob"
    path.write_text("bob:not-a-hash\n")
    with pytest.raises(ValueError, match="passwd:1"):
        HashedPasswordFile(str(path))


# -- look-alike domains (issue 19, item 3) ------------------------------------------------------

LOOK_CONFIG = ServerConfig(
    hostname="mx.example.test", local_domains=("example.test", "ok.test"), trusted_networks=()
)
_DOTS = ["。", "．", "｡"]  # ideographic, fullwidth and halfwidth full stops
_INVISIBLE = [
    "\u200b",
    "\u200c",
    "\u200d",
    "\u00ad",
    "\u2060",
    "\ufeff",
    "\u3000",
    "\u00a0",
    "\u180e",
]


def _variants(c: str) -> list[str]:
    """Spellings of one character that some mapping (NFKC, UTS-46, str.lower) turns into it."""
    if c == ".":
        return _DOTS
    out = [chr(ord(c) + 0xFEE0), chr(ord(c.upper()) + 0xFEE0), c.upper()]  # fullwidth, ASCII upper
    if c == "k":
        out.append("\u212a")  # Kelvin sign
    return out


@st.composite
def look_alikes(draw: st.DrawFn) -> str:
    original = draw(st.sampled_from(["example.test", "ok.test"]))
    name = list(original)
    for i in draw(st.lists(st.integers(0, len(name) - 1), max_size=4)):
        name[i] = draw(st.sampled_from(_variants(original[i])))
    for i in draw(st.lists(st.integers(0, len(name)), max_size=2)):
        name.insert(i, draw(st.sampled_from(_INVISIBLE)))
    return "".join(name)


@given(look_alikes())
@settings(max_examples=300, deadline=None)
def test_a_look_alike_domain_is_refused_or_is_exactly_ours(domain: str) -> None:
    """Accepted only when it differs from our domain in ASCII case alone (and passed on as written);
    anything else is 501 5.1.3 and the session goes on."""
    c = Conn(config=LOOK_CONFIG)
    c.ehlo()
    c.send(
        f"MAIL FROM:<a@example.org> SMTPUTF8\r\nRCPT TO:<user@{domain}>\r\n"
        "RCPT TO:<u@example.test>\r\nDATA\r\n"
    )
    (_, (code, text), second, data) = c.replies()
    assert second[0] == 250 and data[0] == 354
    c.send("Subject: x\r\n\r\nx\r\n.\r\n")
    recipients = [r.address for r in c.sink.committed[0].envelope.recipients]
    if code == 250:
        assert domain.isascii() and domain.lower() in ("example.test", "ok.test"), domain
        assert recipients == [f"user@{domain}", "u@example.test"]
    else:
        assert (code, text[:5]) == (501, "5.1.3"), (domain, code, text)
        assert recipients == ["u@example.test"]


# -- TLS-stalled sessions (issue 19, item 1): however a session goes, its connection ends ---------

_HANDSHAKE = object()  # here the client completes the TLS handshake (if one was started)
_TLS_WORDS = [
    b"EHLO x\r\n",
    b"STARTTLS\r\n",
    b"STARTTLS\r\nEHLO x\r\n",
    b"MAIL FROM:<a@example.org>\r\n",
    b"RCPT TO:<u@example.test>\r\n",
    b"DATA\r\n",
    b"x\r\n",
    b"BDAT 4\r\n",
    b"QUIT\r\n",
    b"BOGUS\r\n",
    b"NOOP\r\n" * 50,
]


@given(
    st.sampled_from(["starttls", "implicit"]),
    st.lists(
        st.one_of(st.sampled_from(_TLS_WORDS), st.binary(max_size=100), st.just(_HANDSHAKE)),
        max_size=40,
    ),
    st.sampled_from(["timeout", "shutdown"]),
)
@settings(max_examples=200, deadline=None)
def test_a_tls_stalled_session_always_ends_its_connection(
    tls: str, steps: list, ending: str
) -> None:
    """The client stalls anywhere: before the handshake, half-way (never completes it), after it;
    it never reads and never answers our close. The connection still ends within a bound."""
    from mailrelay.envelope import Reply
    from mailrelay.smtp.server import CLOSE_LINGER
    from tests.support.smtp.fakes import SEND_BUFFER, stubborn_conn

    with logged_failures() as errors:
        c = stubborn_conn(tls, config=CONFIG)
        for step in steps:
            if c.transport.ended:
                break
            if step is _HANDSHAKE:
                if c.transport.tls_options is not None and not c.transport.handshake_done:
                    c.transport.handshake_done = True
                    c.server.handshakeCompleted()
            else:
                c.send(step)
            assert c.transport.unread <= SEND_BUFFER + 1024
        if ending == "shutdown":
            bye = Reply(421, "4.3.2", "shutting down")
            c.factory.drain(bye)
            c.factory.close_all(bye)
        else:
            c.clock.advance(700)  # past the idle and the DATA timeout
        c.clock.advance(CLOSE_LINGER)
        assert c.transport.ended, "the connection is still held"
        c.proto.connectionLost(None)
        assert all(w.committed or w.aborted for w in c.sink.writers)
    assert errors == []
