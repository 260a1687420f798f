"""SMTP smuggling: no fake end-of-data sequence ever makes a second message, inbound or outbound.

Inbound: a real relay gets, in one write, a message whose text holds a fake end of data followed
by a pipelined MAIL/RCPT/DATA and a second message; the sink counts what came out.
Outbound: whatever the text in the queue holds (bare LF/CR, NULs, even a real CRLF "." CRLF that
arrived through BDAT), what our client sends ends exactly where the message ends.
"""

from __future__ import annotations

import io

import pytest
import pytest_twisted
from twisted.internet import reactor

from mailrelay.config import DeliveryConfig
from mailrelay.delivery import SMTPDeliverer
from mailrelay.envelope import Envelope, NextHop, Recipient, Route
from tests.support.reliability.helpers import Raw, route_to, stuff, wait_for_ids

pytestmark = pytest.mark.integration

# Everything that some MTA has read as an end of data and is not CRLF "." CRLF.
FAKE_ENDS = [
    b"\n.\n",
    b"\r.\r",
    b"\r\n.\r",
    b"\r\n.\n",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\n.\r",
    b"\r.\n",
    b"\r\n\n.\r\n",
    b"\r\n.\r\r\n",
    b"\r\n.\n\r\n",
    b"\n\r.\r\n",
    b"\r\r.\n\n",
    b"\n..\n",
    b"\r..\r",
    b".\n",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\r\x00\n.\r\n",
    b"\n\x00.\r\n",
    b"\r\n.\r\x00\n",
    b"\x00\n.\n",
    b"\r\n.\x00\n",
    b"\n.\x00\r\n",
]


assert not [f for f in FAKE_ENDS if b"\r\n.\r\n" in f]  # a real end of data is no fake one


def smuggled(i: int) -> bytes:
    return (
        b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
        b"Message-ID: <smuggled%d@attacker.example>\r\nSubject: smuggled\r\n\r\nsmuggled\r\n" % i
    )


def test_inbound_fake_end_of_data_yields_at_most_one_message(relays, sinks):
    sink = sinks()
    relay = relays(route_to(sink.port))
    outcomes = []
    for i, fake in enumerate(FAKE_ENDS):
        with Raw(relay.port) as c:
            c.greet()
            head = b"Message-ID: <outer%d@client.example>\r\nSubject: outer\r\n\r\nfirst" % i
            # the whole attack in one write, as a pipelining client would send it
            c.send(
                b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
                + head
                + fake
                + smuggled(i)
                + b".\r\nNOOP\r\n"
            )
            replies = [c.reply() for _ in range(5)]
            codes = [r[:3] for r in replies]
            outcomes.append((fake, replies[3].strip()))
            # MAIL, RCPT, 354, then ONE verdict for the one message, then the NOOP: nothing else
            assert codes[:3] == [b"250", b"250", b"354"] and codes[4] == b"250", replies
            assert codes[3] in (b"250", b"550"), replies
            # a good message right after shows the session is in step and delivery works
            assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
            assert c.cmd("RCPT TO:<b@example.test>").startswith(b"250")
            assert c.cmd("DATA").startswith(b"354")
            c.send(stuff(b"Message-ID: <good%d@client.example>\r\n\r\ngood\r\n" % i))
            assert c.reply().startswith(b"250 2.0.0")
    accepted = {i for i, (_, r) in enumerate(outcomes) if r.startswith(b"250")}
    good = {f"<good{i}@client.example>" for i in range(len(FAKE_ENDS))}
    want = good | {f"<outer{i}@client.example>" for i in accepted}
    got = wait_for_ids(sink, want, timeout=30)
    print(
        f"\nsmuggling inbound: {len(FAKE_ENDS)} fake ends, {len(FAKE_ENDS) - len(accepted)} "
        f"rejected whole (550 5.6.0), {len(accepted)} accepted as one message (NUL variants), "
        f"{sum(got.values())} messages at the sink for {len(want)} expected"
    )
    for fake, reply in outcomes:
        print(f"  {fake!r:24} {reply.decode()[:60]}")
    assert not [m for m in got if "smuggled" in m or "attacker" in m]
    assert got == {m: 1 for m in want}
    for i, (fake, reply) in enumerate(outcomes):
        if b"\r" in fake.replace(b"\r\n", b"") or b"\n" in fake.replace(b"\r\n", b""):
            assert reply.startswith(b"550 5.6.0"), (
                fake,
                reply,
            )  # bare CR/LF: the message is dropped
        else:
            assert i in accepted  # NULs alone are text; the fake end stayed inside the one message
    for t in sink.transactions():
        assert t.sender == "a@example.org" and t.recipients == ["b@example.test"]


def test_bdat_text_holding_crlf_dot_crlf_is_relayed_out_as_one_message(relays, sinks):
    """BDAT text may hold CRLF "." CRLF as plain text; relayed out over DATA it must stay one
    message."""
    sink = sinks()
    relay = relays(route_to(sink.port))
    body = (
        b"Message-ID: <bdat@client.example>\r\nSubject: bdat\r\n\r\nfirst\r\n.\r\n"
        + smuggled(0)
        + b".\r\n.\r\nQUIT\r\n..\r\nend\r\n"
    )
    with Raw(relay.port) as c:
        ehlo = c.greet()
        assert b"CHUNKING" in ehlo
        c.send(
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\n"
            + b"BDAT %d LAST\r\n" % len(body)
            + body
        )
        replies = [c.reply() for _ in range(3)]
        assert [r[:3] for r in replies] == [b"250", b"250", b"250"], replies
    got = wait_for_ids(sink, ["<bdat@client.example>"], timeout=20)
    assert got == {"<bdat@client.example>": 1}
    [t] = sink.transactions()
    assert t.data.endswith(body) and t.recipients == ["b@example.test"]


@pytest_twisted.ensureDeferred
async def test_our_client_never_sends_an_ambiguous_end_of_data(sinks) -> None:
    """Text with every fake end (as a BINARYMIME or an embedder's store could hold) → one message
    each."""
    sink = sinks()
    env = Envelope("a@example.org", (Recipient("b@example.test"),))
    route = Route((NextHop("127.0.0.1", sink.port),))
    deliverer = SMTPDeliverer(reactor, DeliveryConfig(connect_timeout=5), "relay.mailrelay.test")
    bodies = [
        b"Message-ID: <out%d@relay.test>\r\n\r\nfirst" % i + fake + smuggled(i) + b"last\r\n"
        for i, fake in enumerate(FAKE_ENDS)
    ]
    bodies.append(b"Message-ID: <outall@relay.test>\r\n\r\n" + b"x".join(FAKE_ENDS) + smuggled(99))
    try:
        for body in bodies:  # one cached connection: a desynchronised session would show at once
            results = await deliverer.deliver(
                env, env.recipients, route, lambda body=body: io.BytesIO(body)
            )
            assert [r.code for r, _ in results] == [250], results
    finally:
        await deliverer.stop()
    want = [f"<out{i}@relay.test>" for i in range(len(FAKE_ENDS))] + ["<outall@relay.test>"]
    got = wait_for_ids(sink, want, timeout=20)
    print(
        f"\nsmuggling outbound: {len(bodies)} bodies with fake ends sent, {sink.count()} messages "
        f"counted by smtp-sink, {sum(got.values())} dumped"
    )
    assert got == {m: 1 for m in want}
    assert sink.count() == len(bodies)
    for t in sink.transactions():
        assert t.sender == "a@example.org" and t.recipients == ["b@example.test"]
        assert b"smuggled" in t.data  # the smuggled transaction is text inside the one message
