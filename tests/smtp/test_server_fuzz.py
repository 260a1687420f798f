"""Whole sessions fed arbitrary input (hypothesis): no exception escapes, no hang, memory bounded,
and the hashed password file checker."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.logger import globalLogPublisher

from mailrelay.config import ServerConfig
from mailrelay.smtp.auth import HashedPasswordFile, decode_plain, hash_password, verify_password
from tests.smtp.fakes import Conn

CONFIG = ServerConfig(hostname="mx.example.test", local_domains=("example.test",), max_message_size=5000,
                      trusted_networks=(ipaddress.ip_network("192.0.2.0/24"),))

WORDS = [b"EHLO x\r\n", b"HELO x\r\n", b"MAIL FROM:<a@example.org>\r\n", b"MAIL FROM:<> SIZE=10 BODY=BINARYMIME\r\n",
         b"RCPT TO:<u@example.test>\r\n", b"RCPT TO:<u@x.example> NOTIFY=NEVER\r\n", b"DATA\r\n", b"BDAT 5\r\n",
         b"BDAT 3 LAST\r\n", b"RSET\r\n", b"NOOP\r\n", b"AUTH PLAIN\r\n", b"STARTTLS\r\n", b".\r\n", b"\r\n.\r\n",
         b"\n.\n", b"\r", b"\n", b".", b"x" * 600, b"Received: x\r\n", b"QUIT\r\n", b"VRFY u\r\n", b"\xff\xfe"]


@given(st.lists(st.one_of(st.sampled_from(WORDS), st.binary(max_size=200)), max_size=60),
       st.lists(st.integers(1, 400), max_size=10))
@settings(max_examples=400, deadline=None)
def test_any_session_input_never_raises_and_stays_bounded(pieces: list[bytes], cuts: list[int]) -> None:
    errors = []

    def observer(event):
        if event.get("log_failure") is not None:
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    try:
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
    finally:
        globalLogPublisher.removeObserver(observer)
    assert errors == []


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


# -- TLS-stalled sessions (issue 19, item 1): however a session goes, its connection ends ---------

_HANDSHAKE = object()  # here the client completes the TLS handshake (if one was started)
_TLS_WORDS = [b"EHLO x\r\n", b"STARTTLS\r\n", b"STARTTLS\r\nEHLO x\r\n", b"MAIL FROM:<a@example.org>\r\n",
              b"RCPT TO:<u@example.test>\r\n", b"DATA\r\n", b"x\r\n", b"BDAT 4\r\n", b"QUIT\r\n", b"BOGUS\r\n",
              b"NOOP\r\n" * 50]


@given(st.sampled_from(["starttls", "implicit"]),
       st.lists(st.one_of(st.sampled_from(_TLS_WORDS), st.binary(max_size=100), st.just(_HANDSHAKE)), max_size=40),
       st.sampled_from(["timeout", "shutdown"]))
@settings(max_examples=200, deadline=None)
def test_a_tls_stalled_session_always_ends_its_connection(tls: str, steps: list, ending: str) -> None:
    """The client stalls anywhere: before the handshake, half-way (never completes it), after it;
    it never reads and never answers our close. The connection still ends within a bound."""
    from mailrelay.envelope import Reply
    from mailrelay.smtp.server import CLOSE_LINGER
    from tests.smtp.lifecycle_fakes import SEND_BUFFER, stubborn_conn

    errors = []

    def observer(event):
        if event.get("log_failure") is not None:
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    try:
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
    finally:
        globalLogPublisher.removeObserver(observer)
    assert errors == []
