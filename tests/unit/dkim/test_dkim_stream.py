"""DKIM signing as the message streams past: for any message cut anywhere, the signature is the one
dkimpy makes of the whole message (octet for octet) and dkimpy verifies it; a changed body or
header breaks it; what the signer keeps stays bounded however long the message is."""

from __future__ import annotations

import hashlib
import io
import random
import re
import tracemalloc
import types
from collections.abc import Iterator

import dkim
import pytest
from dkim.canonicalization import Relaxed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from mailrelay.config import QueueConfig
from mailrelay.dkim import HEADER_LIMIT, DKIMSigner, SigningSink, domain_key
from mailrelay.dkim.body import RelaxedBodyHash
from mailrelay.envelope import Envelope, Recipient, Reply
from mailrelay.interfaces import IPrependingWriter
from mailrelay.queue.body import PrefixedBody, prefixed
from mailrelay.queue.manager import QueueManager
from mailrelay.testing import FakeRouter, MemoryQueueStore, RecordingDeliverer, route_to
from tests.support.dkim import SyncPool, SyncReactor, dns_answering, pem_key

NOW = 1_700_000_000  # in the past: dkimpy rejects a t= in the future
PIECES = [
    b" ",
    b"\t",
    b"\r",
    b"\n",
    b"\r\n",
    b"a",
    b"b c",
    b"  ",
    b"\r\n\r\n",
    b" \r\n",
    b".",
    b"\xe9",
]


@pytest.fixture(scope="module")
def keys() -> dict[str, tuple[bytes, bytes]]:
    """PEM and key record: example.org signs with RSA, other.example with Ed25519."""
    return {"example.org": pem_key("rsa"), "other.example": pem_key("ed25519")}


@pytest.fixture(scope="module")
def signer(keys: dict[str, tuple[bytes, bytes]]) -> DKIMSigner:
    return DKIMSigner({d: domain_key(d, "s1", pem) for d, (pem, _) in keys.items()})


@pytest.fixture(scope="module")
def dnsfunc(keys: dict[str, tuple[bytes, bytes]]):  # type: ignore[no-untyped-def]
    return dns_answering({f"s1._domainkey.{d}.".encode(): r for d, (_, r) in keys.items()})


def envelope(sender: str = "bounce@unsigned.test") -> Envelope:
    return Envelope(sender, (Recipient("rcpt@example.test"),))


def cut(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    """``data`` in pieces of the given sizes, over and over, the last one what is left."""
    i, n = 0, 0
    while i < len(data):
        size = sizes[n % len(sizes)] if sizes else len(data)
        yield data[i : i + size]
        i, n = i + size, n + 1


def streamed(signer: DKIMSigner, message: bytes, sizes: list[int], env: Envelope) -> bytes | None:
    stream = signer.start(env)
    assert stream is not None
    for piece in cut(message, sizes):
        stream.feed(piece)
    return stream.signature(NOW)


def dkimpy_signature(message: bytes, signer: DKIMSigner, domain: str) -> bytes:
    """What dkimpy signs for the whole message in memory, at the same time."""
    key = signer.keys[domain]
    clock = types.SimpleNamespace(time=lambda: NOW)
    real, dkim.time = dkim.time, clock  # dkimpy reads time.time() for t=; only its own module
    try:
        signature: bytes = dkim.sign(
            message,
            key.selector.encode(),
            key.domain.encode(),
            key.private_key,
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=key.algorithm,
            linesep=b"\r\n",
        )
    finally:
        dkim.time = real
    return signature


def dkimpy_body(body: bytes) -> bytes:
    """dkimpy's canonical body: lines as it splits them (CRLF or a bare LF), then relaxed."""
    return Relaxed.canonicalize_body(b"\r\n".join(re.split(b"\r?\n", body)))


# -- the body hash ---------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40), st.lists(st.integers(1, 7), max_size=5))
def test_the_body_hash_fed_in_any_pieces_is_that_of_dkimpys_relaxed_body(pieces, sizes):
    body = b"".join(pieces)
    digest = RelaxedBodyHash()
    for piece in cut(body, sizes):
        digest.update(piece)
    assert digest.digest() == hashlib.sha256(dkimpy_body(body)).digest()


@pytest.mark.parametrize(
    "body",
    [
        b"x" + b" \t" * 10_000 + b"y\r\n",  # one long whitespace run inside a line
        b"x" + b" " * 20_000 + b"\r\n",  # ... at its end (dkimpy's regex is quadratic there)
        b"x\r\n" + b"\r\n" * 200_000 + b"y\r\n",  # many empty lines that do not end the body
        b"x\r\n" + b" \r\n" * 200_000,  # many blank lines that do
        b"x" * 600_000,  # one long line without a line break
        b"\r" * 100_000 + b"\r\n",  # a line of CRs
    ],
    ids=["wsp-run", "trailing-wsp", "empty-lines", "blank-end", "long-line", "crs"],
)
def test_long_runs_cut_anywhere_hash_as_dkimpy_and_keep_nothing_of_them(body):
    digest = RelaxedBodyHash()
    for piece in cut(body, [4093, 1, 2, 6007]):
        digest.update(piece)
        assert len(digest._carry) <= 2  # the only octets it keeps
    assert digest.digest() == hashlib.sha256(dkimpy_body(body)).digest()


# -- the signature -----------------------------------------------------------------------------

HEADERS = st.lists(
    st.sampled_from(
        [
            b"To: rcpt@example.test\r\n",
            b"Subject: a  long\r\n\tfolded   subject \r\n",
            b"Received: by relay\r\n",
            b"Message-ID: <x@example>\r\n",
            b"cc:  someone@example.test\r\n",
            b"X-Other: not signed\r\n",
            b"Date: Tue, 8 Dec 2026 00:00:00 +0000\r\n",
        ]
    ),
    max_size=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    HEADERS,
    st.sampled_from(["A <a@example.org>", "b@other.example"]),
    st.lists(st.sampled_from(PIECES), max_size=30),
    st.lists(st.integers(1, 9), max_size=4),
)
def test_the_streamed_signature_is_dkimpys_for_the_whole_message_and_verifies(
    signer, dnsfunc, headers, author, body, sizes
):
    """RSA (example.org) and Ed25519 (other.example), the From domain choosing the key."""
    header = b"".join(headers[:2]) + f"From: {author}\r\n".encode() + b"".join(headers[2:])
    message = header + b"\r\n" + b"".join(body)
    signature = streamed(signer, message, sizes, envelope())
    assert signature is not None
    assert signature == dkimpy_signature(message, signer, author.split("@")[1].rstrip(">"))
    assert dkim.verify(signature + message, dnsfunc=dnsfunc)


@pytest.mark.parametrize("domain", ["example.org", "other.example"])
def test_a_changed_body_or_signed_header_no_longer_verifies(domain, signer, dnsfunc):
    message = (
        f"From: a@{domain}\r\nSubject: hello\r\nX-Unsigned: 1\r\n\r\nbody  line\r\n\r\n".encode()
    )
    signed = streamed(signer, message, [5], envelope())
    assert signed is not None
    assert (b"a=rsa-sha256" if domain == "example.org" else b"a=ed25519-sha256") in signed
    assert dkim.verify(signed + message, dnsfunc=dnsfunc)
    # relaxed canonicalization: whitespace changes and empty lines at the end are allowed
    assert dkim.verify(
        signed + message.replace(b"body  line", b"body line") + b"\r\n", dnsfunc=dnsfunc
    )
    assert dkim.verify(
        signed + message.replace(b"X-Unsigned: 1", b"X-Unsigned: 2"), dnsfunc=dnsfunc
    )
    for changed in (
        message.replace(b"body  line", b"body lime"),
        message + b"more\r\n",
        message.replace(b"Subject: hello", b"Subject: hullo"),
        message.replace(b"\r\n\r\n", b"\r\nFrom: evil@example.test\r\n\r\n", 1),  # From is frozen
    ):
        assert not dkim.verify(signed + changed, dnsfunc=dnsfunc)


def test_the_key_is_the_from_domains_if_ours_else_the_envelope_senders_else_none(signer):
    def domain_of(sig: bytes | None) -> str | None:
        return None if sig is None else re.search(rb"d=([^;]+);", sig).group(1).decode()  # type: ignore[union-attr]

    ours = b"From: a@other.example\r\n\r\nx\r\n"
    theirs = b"From: a@unsigned.test\r\n\r\nx\r\n"
    assert domain_of(streamed(signer, ours, [3], envelope("x@example.org"))) == "other.example"
    assert domain_of(streamed(signer, theirs, [3], envelope("x@example.org"))) == "example.org"
    assert streamed(signer, theirs, [3], envelope("x@unsigned.test")) is None
    assert streamed(signer, theirs, [3], envelope("")) is None  # the null sender
    assert DKIMSigner({}).start(envelope("x@example.org")) is None  # no keys: nothing to feed


def test_a_message_with_no_key_stops_being_read_after_its_header_section(signer):
    stream = signer.start(envelope("x@unsigned.test"))
    assert stream is not None
    stream.feed(b"From: a@unsigned.test\r\nSubj")
    assert not stream.done
    stream.feed(b"ect: x\r\n\r\nbody")
    assert stream.done and stream.retained == 0
    assert stream.signature(NOW) is None


@pytest.mark.parametrize(
    "message",
    [
        b"From: a@example.org\r\nSubject: no body",
        b"From: a@example.org\r\nSubject: no body\r\n",
        b"From: a@example.org\r\n\r\n",
        b"From: a@example.org\nSubject: bare LF\n\nbody\nline\n",
        b"\r\nFrom: a@example.org\r\n",  # no header fields at all: From is body, no key for it
    ],
)
def test_messages_that_end_early_or_use_bare_lf_sign_as_dkimpy_does(message, signer, dnsfunc):
    for sizes in ([1], [2, 3], []):
        sig = streamed(signer, message, sizes, envelope("x@example.org"))
        if message.startswith(b"\r\n"):
            assert sig is None
            continue
        assert sig == dkimpy_signature(message, signer, "example.org")
        assert dkim.verify(sig + message, dnsfunc=dnsfunc)


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    found: list[str] = []

    def observe(event: dict) -> None:  # type: ignore[type-arg]
        if "DKIM: cannot sign" in event.get("log_format", ""):
            found.append(event["error"])

    globalLogPublisher.addObserver(observe)
    yield found
    globalLogPublisher.removeObserver(observe)


def test_a_header_section_over_the_limit_goes_out_unsigned_with_a_log_line(signer, warnings):
    stream = signer.start(envelope("x@example.org"))
    assert stream is not None
    stream.feed(b"From: a@example.org\r\n")
    for _ in range(HEADER_LIMIT // 1000 + 2):
        stream.feed(b"X-Filler: " + b"f" * 988 + b"\r\n")
        assert stream.retained <= HEADER_LIMIT + 1000
    assert stream.done and stream.retained == 0
    stream.feed(b"\r\nbody\r\n")
    assert stream.signature(NOW) is None
    assert warnings == [f"its header section is longer than {HEADER_LIMIT} octets"]


def test_a_message_without_from_goes_out_unsigned_with_a_log_line(signer, warnings):
    assert streamed(signer, b"Subject: x\r\n\r\nbody\r\n", [4], envelope("x@example.org")) is None
    assert warnings == ["the message has no From header field"]


def message_pieces(header: bytes, mebibytes: int) -> Iterator[bytes]:
    """A message of ``mebibytes`` MiB of body, made as it is read (never whole in memory)."""
    yield header + b"\r\n"
    line = b"The quick  brown fox \t jumps over the lazy dog, again and again and again.  \r\n"
    block = line * (65536 // len(line))
    for _ in range(mebibytes * 1024 * 1024 // len(block)):
        yield block
    yield b"\r\n\r\n"


def test_a_message_of_several_mib_is_never_held_whole(signer, dnsfunc):
    header = b"From: a@example.org\r\nSubject: big\r\n"
    stream = signer.start(envelope())
    assert stream is not None
    tracemalloc.start()
    try:
        for piece in message_pieces(header, 8):
            stream.feed(piece)
            assert stream.retained == len(header) + 2
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 512 * 1024  # a few pieces' worth, not 8 MiB
    signature = stream.signature(NOW)
    assert signature is not None
    assert dkim.verify(signature + b"".join(message_pieces(header, 8)), dnsfunc=dnsfunc)


# -- delivery: the signature in front of the stored message ------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=20),
    st.binary(max_size=40),
    st.lists(
        st.one_of(
            st.tuples(st.just("read"), st.integers(-1, 30)),
            st.tuples(st.just("seek"), st.integers(0, 70), st.sampled_from([0, 1, 2])),
        ),
        max_size=10,
    ),
)
def test_a_prefixed_body_reads_and_seeks_as_the_two_texts_joined(prefix, body, steps):
    ours, joined = PrefixedBody(prefix, io.BytesIO(body)), io.BytesIO(prefix + body)
    for step in steps:
        if step[0] == "read":
            assert ours.read(step[1]) == joined.read(step[1])
        else:
            offset = step[1] if step[2] == 0 else step[1] - 35
            if step[2] == 0 or joined.tell() + offset >= 0 and step[2] == 1:
                assert ours.seek(offset, step[2]) == joined.seek(offset, step[2])
            elif step[2] == 2 and len(prefix + body) + offset >= 0:
                assert ours.seek(offset, 2) == joined.seek(offset, 2)
        assert ours.tell() == joined.tell()
    with ours:
        pass
    assert ours.closed
    plain = io.BytesIO(body)
    assert (
        prefixed(b"", plain) is plain
        and prefixed(prefix or b"X", plain).read(1) == (prefix or b"X")[:1]
    )


def relay_world(signer: DKIMSigner, deliverer: RecordingDeliverer, hostname: str = "relay.test"):  # type: ignore[no-untyped-def]
    """A memory store behind a signing intake, and a queue manager on a Clock that delivers
    from it (and writes its reports through the intake, as the service wires them)."""
    from twisted.internet.task import Clock

    clock = Clock()
    clock.advance(NOW)
    store = MemoryQueueStore(clock)
    sink = SigningSink(store, signer, SyncReactor(NOW), SyncPool())
    manager = QueueManager(
        store,
        FakeRouter({"*": route_to("127.0.0.1", 2526)}),
        deliverer,
        clock,
        QueueConfig(retry_schedule=(60.0,), max_lifetime=86400.0),
        hostname,
        jitter=lambda d: d,
        reports_to=sink,
    )
    return clock, store, sink, manager


def receive(sink: SigningSink, env: Envelope, message: bytes) -> str:
    writer = sink.open(env)
    for piece in cut(message, [4096]):
        writer.write(piece)
    writer.commit()
    queue_id: str = writer.queue_id
    return queue_id


def test_delivery_sends_the_signature_made_at_intake_on_every_attempt(signer, dnsfunc):
    """Signed once, when received: a deferred first attempt and the retry send the same
    signature, once, in front of the stored text, which stays as received."""
    message = b"From: a@other.example\r\nSubject: x\r\n\r\n" + b"line\r\n" * 50_000
    deliverer = RecordingDeliverer([Reply(451, "4.3.0", "later")])
    clock, store, sink, manager = relay_world(signer, deliverer)
    manager.start()
    qid = receive(sink, envelope(), message)
    signature = store.messages[qid].prefix
    assert signature == dkimpy_signature(message, signer, "other.example")
    assert store.bodies[qid] == message  # the stored text as received
    clock.advance(0)
    clock.advance(60)
    first, second = deliverer.calls
    assert first.body == second.body == signature + message
    assert first.body.count(b"DKIM-Signature:") == 1
    assert dkim.verify(second.body, dnsfunc=dnsfunc)
    assert qid not in store.messages  # delivered
    unsigned = b"From: a@unsigned.test\r\n\r\nx\r\n"
    receive(sink, envelope(), unsigned)
    clock.advance(0)
    assert deliverer.calls[-1].body == unsigned


def test_a_report_to_the_sender_is_signed_at_intake_for_our_hostnames_domain(signer, dnsfunc):
    """The bounce a relay of example.org writes is signed as example.org (MAILER-DAEMON's
    From); it quotes the original as it was received, without the signature."""
    message = b"From: a@other.example\r\nSubject: x\r\n\r\nbody\r\n"
    deliverer = RecordingDeliverer([Reply(550, "5.1.1", "no such user")])
    clock, store, sink, manager = relay_world(signer, deliverer, hostname="example.org")
    manager.start()
    receive(sink, envelope("a@other.example"), message)
    clock.advance(0)
    clock.advance(0)
    bounce = deliverer.calls[-1]
    assert bounce.envelope.sender == "" and bounce.body.startswith(b"DKIM-Signature:")
    assert bounce.body.count(b"DKIM-Signature:") == 1 and b"d=example.org;" in bounce.body
    assert dkim.verify(bounce.body, dnsfunc=dnsfunc)


# -- intake: signed once, before the commit ----------------------------------------------------


@implementer(IPrependingWriter)
class Writer:
    """A store's message writer that keeps what it is given, in order."""

    def __init__(self, log: list[tuple[str, bytes]]) -> None:
        self.queue_id = "Q1"
        self.log = log

    def write(self, data: bytes) -> None:
        self.log.append(("write", data))

    def prepend(self, header: bytes) -> None:
        self.log.append(("prepend", header))

    def commit(self):  # type: ignore[no-untyped-def]
        self.log.append(("commit", b""))
        return "Q1"

    def abort(self) -> None:
        self.log.append(("abort", b""))


class Sink:
    def __init__(self) -> None:
        self.log: list[tuple[str, bytes]] = []

    def open(self, envelope: Envelope) -> Writer:
        return Writer(self.log)


def test_intake_signs_once_before_the_commit_and_the_store_keeps_it(signer, dnsfunc):
    store = Sink()
    sink = SigningSink(store, signer, SyncReactor(NOW), SyncPool())
    message = b"Received: by us\r\nFrom: a@example.org\r\nSubject: s\r\n\r\nbody\r\n"
    writer = sink.open(envelope())
    for piece in cut(message, [7]):
        writer.write(piece)
    assert writer.queue_id == "Q1"
    committed = []
    writer.commit().addCallback(committed.append)
    assert committed == ["Q1"]
    kinds = [k for k, _ in store.log]
    assert kinds == ["write"] * len(kinds[:-2]) + ["prepend", "commit"]
    assert b"".join(d for k, d in store.log if k == "write") == message
    signature = store.log[-2][1]
    with PrefixedBody(signature, io.BytesIO(message)) as f:
        assert dkim.verify(f.read(), dnsfunc=dnsfunc)


def test_intake_leaves_the_stores_writer_alone_when_no_key_applies(signer):
    store = Sink()
    sink = SigningSink(store, DKIMSigner({}), SyncReactor(NOW), SyncPool())
    assert isinstance(sink.open(envelope("a@example.org")), Writer)  # no keys at all
    sink.signer = signer  # SIGHUP: new keys
    writer = sink.open(envelope())
    writer.write(b"From: a@unsigned.test\r\n\r\nbody\r\n")
    writer.commit()
    writer = sink.open(envelope())
    writer.write(b"From: a@example.org\r\n\r\nbody\r\n")
    writer.abort()
    assert [k for k, _ in store.log] == ["write", "commit", "write", "abort"]


class PlainWriter:
    """An embedder's writer that cannot keep a prefix (no ``IPrependingWriter``)."""

    queue_id = "Q2"

    def write(self, data: bytes) -> None:
        pass


def test_a_store_whose_writer_cannot_keep_a_signature_gets_the_mail_unsigned_with_one_line(
    signer,
):
    class PlainSink:
        def open(self, envelope: Envelope) -> PlainWriter:
            return PlainWriter()

    found: list[str] = []

    def observe(event: dict) -> None:  # type: ignore[type-arg]
        if "cannot keep a signature" in event.get("log_format", ""):
            found.append(event["writer"])

    sink = SigningSink(PlainSink(), signer, SyncReactor(NOW), SyncPool())
    globalLogPublisher.addObserver(observe)
    try:
        assert all(isinstance(sink.open(envelope("a@example.org")), PlainWriter) for _ in "ab")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert found == ["PlainWriter"]


def test_random_messages_cut_randomly_all_verify(signer, dnsfunc):
    """A broader sweep than the property tests: many shapes, seeded."""
    rng = random.Random(20)
    for n in range(150):
        domain = rng.choice(["example.org", "other.example"])
        header = f"From: n{n}@{domain}\r\nSubject: {n}\r\n".encode()
        body = b"".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 200)))
        message = header + b"\r\n" + body
        sizes = [rng.randrange(1, 50) for _ in range(3)]
        sig = streamed(signer, message, sizes, envelope())
        assert sig == dkimpy_signature(message, signer, domain)
        assert dkim.verify(sig + message, dnsfunc=dnsfunc), (message, sizes)
