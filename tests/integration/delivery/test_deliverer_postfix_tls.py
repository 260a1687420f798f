"""STARTTLS to a real Postfix (private instance) with a test CA: verify, encrypt, wrong name, wrong
CA."""

from __future__ import annotations

import io
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from mailrelay.config import DeliveryConfig
from mailrelay.delivery import SMTPDeliverer
from mailrelay.envelope import Envelope, NextHop, Recipient, Reply, Route, TLSPolicy
from tests.support.delivery.certs import CertificateAuthority
from tests.support.delivery.messages import dotted_message
from tests.support.delivery.postfix import PostfixRelay
from tests.support.peers import SMTPSink

pytestmark = pytest.mark.integration

NAME = "mx.mailrelay.test"


class Peers:
    def __init__(self, directory: Path, ca: Path, sink: SMTPSink, postfix: PostfixRelay) -> None:
        self.dir, self.ca, self.sink, self.postfix = directory, ca, sink, postfix


@pytest.fixture(scope="module")
def peers() -> Iterator[Peers]:
    directory = Path(tempfile.mkdtemp(prefix="mailrelay-tls-"))
    directory.chmod(0o755)
    ca, key, chain = CertificateAuthority().write(directory, NAME)
    sink = SMTPSink().start()
    postfix = PostfixRelay(sink.port, name="postfix.mailrelay.test", tls_key=key, tls_chain=chain)
    try:
        postfix.start()
        yield Peers(directory, ca, sink, postfix)
    finally:
        postfix.cleanup()
        sink.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


async def deliver(
    peers: Peers,
    hop: NextHop,
    policy: TLSPolicy,
    body: bytes,
    ca: Path | None = None,
    tag: str = "x",
) -> tuple[list[tuple[Reply, str | None]], str]:
    d = SMTPDeliverer(
        reactor,
        DeliveryConfig(connect_timeout=5, tls_ca_file=str(ca or peers.ca)),
        "relay.mailrelay.test",
    )
    env = Envelope(f"{tag}@example.org", (Recipient("rcpt@example.test"),))
    try:
        results = await d.deliver(
            env, env.recipients, Route((hop,), tls=policy), lambda: io.BytesIO(body)
        )
        cached = d.pool.take(d._key(hop, Route((hop,), tls=policy)))
        tls = cached.tls if cached is not None else ""
        if cached is not None:
            d.pool.put(d._key(hop, Route((hop,), tls=policy)), cached)
        return results, tls
    finally:
        await d.stop()


def arrived(peers: Peers, tag: str, body: bytes, timeout: float = 20.0) -> list[bytes]:
    """The messages from ``tag@example.org`` the sink got through Postfix.

    Postfix delivers on its own time and smtp-sink writes its dump file as the data comes (its
    counters can run ahead of the file), so wait until the message ends with ``body`` — or time
    out and return what is there, for the assertion to show.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = [t.data for t in peers.sink.transactions() if t.sender == f"{tag}@example.org"]
        if any(d.endswith(body) for d in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest_twisted.ensureDeferred
async def test_verify_with_right_name_delivers_over_tls(peers: Peers) -> None:
    body = (
        b"From: verify@example.org\r\nTo: rcpt@example.test\r\nDate: Wed, 25 Nov 2026 09:00:00 "
        b"+0000\r\nMessage-ID: <verify@example.org>\r\nSubject: verified\r\n\r\n.secret "
        b"line\r\n..two\r\n"
    )
    results, tls = await deliver(
        peers,
        NextHop("127.0.0.1", peers.postfix.port, name=NAME),
        TLSPolicy.VERIFY,
        body,
        tag="verify",
    )
    assert [r.code for r, _ in results] == [250], results
    assert tls.startswith("TLSv1.")
    [data] = arrived(peers, "verify", body)
    assert data.endswith(body)  # Postfix only prepends its Received header
    assert b"with ESMTPS" in data.split(b"\r\n\t", 2)[1]
    assert "TLS connection established from" in peers.postfix.log()


@pytest_twisted.ensureDeferred
async def test_verify_with_wrong_name_fails_temporarily(peers: Peers) -> None:
    results, _ = await deliver(
        peers,
        NextHop("127.0.0.1", peers.postfix.port, name="wrong.mailrelay.test"),
        TLSPolicy.VERIFY,
        b"Subject: no\r\n\r\nno\r\n",
        tag="wrongname",
    )
    [(reply, remote)] = results
    assert (reply.code, reply.enhanced) == (451, "4.7.5") and "TLS handshake" in reply.text
    assert remote == f"wrong.mailrelay.test[127.0.0.1]:{peers.postfix.port}"


@pytest_twisted.ensureDeferred
async def test_verify_against_another_ca_fails(peers: Peers) -> None:
    other = peers.dir / "other-ca.pem"
    other.write_bytes(CertificateAuthority("another CA").ca_pem)
    results, _ = await deliver(
        peers,
        NextHop("127.0.0.1", peers.postfix.port, name=NAME),
        TLSPolicy.VERIFY,
        b"Subject: no\r\n\r\nno\r\n",
        ca=other,
        tag="otherca",
    )
    assert [(r.code, r.enhanced) for r, _ in results] == [(451, "4.7.5")]


@pytest_twisted.ensureDeferred
async def test_encrypt_without_verification_delivers(peers: Peers) -> None:
    other = peers.dir / "other-ca2.pem"
    other.write_bytes(CertificateAuthority("unrelated").ca_pem)
    body = b"Subject: encrypted\r\n\r\nhello\r\n"
    results, tls = await deliver(
        peers,
        NextHop("127.0.0.1", peers.postfix.port, name="any.name.test"),
        TLSPolicy.ENCRYPT,
        body,
        ca=other,
        tag="encrypt",
    )
    assert [r.code for r, _ in results] == [250]
    assert tls.startswith("TLSv1.")


@pytest_twisted.ensureDeferred
async def test_may_uses_starttls_and_bdat_for_a_large_message(peers: Peers) -> None:
    body = dotted_message(
        "big@example.org", 80
    )  # 1.3 MB, a dot line at every 16 KiB: sent with BDAT
    hop = NextHop("127.0.0.1", peers.postfix.port, name="not.checked.test")
    d = SMTPDeliverer(reactor, DeliveryConfig(connect_timeout=5), "relay.mailrelay.test")
    env = Envelope("big@example.org", (Recipient("rcpt@example.test"),))
    route = Route((hop,), tls=TLSPolicy.MAY)
    try:
        results = await d.deliver(env, env.recipients, route, lambda: io.BytesIO(body))
        session = d.pool.take(d._key(hop, route))
        assert session is not None and session.tls.startswith("TLSv1.")
        assert "CHUNKING" in session.client.extensions
        session.client.quit()
    finally:
        await d.stop()
    assert [r.code for r, _ in results] == [250]
    [data] = arrived(peers, "big", body)
    assert data.endswith(body)


@pytest_twisted.ensureDeferred
async def test_data_streamed_over_tls(peers: Peers) -> None:
    body = dotted_message(
        "stream@example.org", 40
    )  # 656 KiB: DATA (below the BDAT threshold), 11 chunks
    results, tls = await deliver(
        peers,
        NextHop("127.0.0.1", peers.postfix.port, name=NAME),
        TLSPolicy.VERIFY,
        body,
        tag="stream",
    )
    assert [r.code for r, _ in results] == [250] and tls.startswith("TLSv1.")
    [data] = arrived(peers, "stream", body)
    assert data.endswith(body)
