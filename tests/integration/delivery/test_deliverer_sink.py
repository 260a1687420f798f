"""SMTPDeliverer over real sockets to Postfix's smtp-sink on loopback."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor

from mailrelay.config import DeliveryConfig
from mailrelay.delivery import SMTPDeliverer
from mailrelay.envelope import Envelope, NextHop, Recipient, Reply, Route, TLSPolicy
from tests.support.delivery.messages import dotted_message
from tests.support.peers import SMTPSink, free_port

pytestmark = pytest.mark.integration

ENV = Envelope("sender@example.org", (Recipient("a@example.test"), Recipient("b@example.test")))


def body_with_dots(size: int = 3000) -> bytes:
    lines = [b"Subject: dots", b"", b".", b"..", b".leading", b"x" * 990, b"end ."]
    while sum(len(ln) + 2 for ln in lines) < size:
        lines.append(b".line %d" % len(lines))
    return b"".join(ln + b"\r\n" for ln in lines)


@pytest.fixture
def sinks() -> Iterator[list[SMTPSink]]:
    started: list[SMTPSink] = []
    yield started
    for s in started:
        s.cleanup()


def start(sinks: list[SMTPSink], *flags: str, host: str = "127.0.0.1") -> SMTPSink:
    sink = SMTPSink(flags=flags, host=host).start()
    sinks.append(sink)
    return sink


async def deliver(route: Route, body: bytes, env: Envelope = ENV) -> list[tuple[Reply, str | None]]:
    d = SMTPDeliverer(reactor, DeliveryConfig(connect_timeout=5), "relay.mailrelay.test")
    try:
        return await d.deliver(env, env.recipients, route, lambda: io.BytesIO(body))
    finally:
        await d.stop()


def sessions(sink: SMTPSink, at_least: int, timeout: float = 10.0) -> int:
    """Sessions smtp-sink counted, less the readiness probe (its counters lag: wait for
    ``at_least``)."""
    deadline = time.monotonic() + timeout
    while True:
        counters = (sink.dir / "counters").read_bytes().replace(b"\r", b"\n").split(b"\n")
        last = [ln for ln in counters if b"sess=" in ln][-1]
        n = int(last.split(b"sess=")[1].split()[0]) - 1
        if n >= at_least or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


@pytest_twisted.ensureDeferred
async def test_connection_cache_one_session_for_many_messages(sinks: list[SMTPSink]) -> None:
    sink = start(sinks)
    d = SMTPDeliverer(
        reactor, DeliveryConfig(connect_timeout=5, connection_reuse_limit=4), "relay.mailrelay.test"
    )
    route = Route((NextHop("127.0.0.1", sink.port),))
    bodies = [b"Subject: %d\r\n\r\n.body %d\r\n" % (i, i) for i in range(6)]
    for b in bodies:
        results = await d.deliver(ENV, ENV.recipients, route, lambda b=b: io.BytesIO(b))
        assert [r.code for r, _ in results] == [250, 250]
    await d.stop()
    sink.wait_for(6)
    assert sorted(t.data for t in sink.transactions()) == sorted(bodies)
    assert sessions(sink, at_least=2) == 2  # 4 messages on the first connection, 2 on the second


@pytest_twisted.ensureDeferred
async def test_delivery_byte_identical(sinks: list[SMTPSink]) -> None:
    sink = start(sinks)
    body = body_with_dots()
    results = await deliver(Route((NextHop("127.0.0.1", sink.port),)), body)
    assert [r.code for r, _ in results] == [250, 250]
    assert results[0][1] == f"127.0.0.1[127.0.0.1]:{sink.port}"
    sink.wait_for(1)
    [t] = sink.transactions()
    assert t.sender == "sender@example.org" and t.recipients == ["a@example.test", "b@example.test"]
    assert t.data == body


@pytest_twisted.ensureDeferred
async def test_dots_at_every_16k_boundary_large_message(sinks: list[SMTPSink]) -> None:
    sink = start(sinks)
    body = dotted_message("sender@example.org", 40)  # 656 KiB through DATA: several producer chunks
    results = await deliver(Route((NextHop("127.0.0.1", sink.port),)), body)
    assert [r.code for r, _ in results] == [250, 250]
    sink.wait_for(1)
    assert sink.transactions()[0].data == body


@pytest_twisted.ensureDeferred
async def test_without_pipelining(sinks: list[SMTPSink]) -> None:
    sink = start(sinks, "-p")
    body = body_with_dots(500)
    results = await deliver(Route((NextHop("127.0.0.1", sink.port),)), body)
    assert [r.code for r, _ in results] == [250, 250]
    sink.wait_for(1)
    assert sink.transactions()[0].data == body


@pytest_twisted.ensureDeferred
async def test_rcpt_rejected(sinks: list[SMTPSink]) -> None:
    sink = start(sinks, "-r", "RCPT")
    results = await deliver(Route((NextHop("127.0.0.1", sink.port),)), b"Subject: x\r\n\r\nx\r\n")
    assert [r.code for r, _ in results] == [450, 450]
    assert sink.count() == 0  # no DATA text was sent


@pytest_twisted.ensureDeferred
async def test_disconnect_at_mail_moves_to_next_hop(sinks: list[SMTPSink]) -> None:
    bad = start(sinks, "-Q", "MAIL")
    good = start(sinks)
    body = body_with_dots(200)
    route = Route((NextHop("127.0.0.1", bad.port), NextHop("127.0.0.1", good.port)))
    results = await deliver(route, body)
    assert [r.code for r, _ in results] == [250, 250]
    assert results[0][1].endswith(f":{good.port}")
    good.wait_for(1)
    assert bad.messages() == []


@pytest_twisted.ensureDeferred
async def test_disconnect_at_mail_only_hop_is_temporary(sinks: list[SMTPSink]) -> None:
    bad = start(sinks, "-Q", "MAIL")
    results = await deliver(Route((NextHop("127.0.0.1", bad.port),)), b"x\r\n")
    assert all(r.code == 421 or r.is_temporary for r, _ in results)


@pytest_twisted.ensureDeferred
async def test_hangup_after_dot_is_temporary(sinks: list[SMTPSink]) -> None:
    sink = start(sinks, "-q", ".")
    results = await deliver(Route((NextHop("127.0.0.1", sink.port),)), b"Subject: x\r\n\r\nx\r\n")
    assert [(r.code, r.enhanced) for r, _ in results] == [(451, "4.4.2")] * 2


@pytest_twisted.ensureDeferred
async def test_refused_first_hop_second_delivers(sinks: list[SMTPSink]) -> None:
    sink = start(sinks)
    dead = free_port()
    body = b"Subject: x\r\n\r\nhello\r\n"
    results = await deliver(
        Route((NextHop("127.0.0.1", dead), NextHop("127.0.0.1", sink.port))), body
    )
    assert [r.code for r, _ in results] == [250, 250]
    sink.wait_for(1)
    assert sink.transactions()[0].data == body


@pytest_twisted.ensureDeferred
async def test_all_refused(sinks: list[SMTPSink]) -> None:
    dead = free_port()
    results = await deliver(Route((NextHop("127.0.0.1", dead),)), b"x\r\n")
    assert [str(r) for r, _ in results] == [
        f"451 4.4.1 connect to 127.0.0.1:{dead} failed: Connection refused"
    ] * 2


@pytest_twisted.ensureDeferred
async def test_ipv6_hop(sinks: list[SMTPSink]) -> None:
    sink = start(sinks, host="::1")
    results = await deliver(Route((NextHop("::1", sink.port),)), b"Subject: 6\r\n\r\nv6\r\n")
    assert [r.code for r, _ in results] == [250, 250]
    assert results[0][1] == f"::1[::1]:{sink.port}"


@pytest_twisted.ensureDeferred
async def test_dsn_parameters_passed_on(sinks: list[SMTPSink]) -> None:
    sink = start(sinks)
    env = Envelope(
        "sender@example.org",
        (Recipient("a@example.test", ("SUCCESS", "DELAY"), "rfc822;A@example.test"),),
        ret="HDRS",
        envid="queue+id=1",
    )
    results = await deliver(
        Route((NextHop("127.0.0.1", sink.port),)), b"Subject: dsn\r\n\r\nx\r\n", env=env
    )
    assert [(r.code, *passed) for r, _, *passed in results] == [(250, True)]  # the sink reports now
    [raw] = sink.wait_for(1)
    headers = dict(line.split(b": ", 1) for line in raw.split(b"\n") if line.startswith(b"X-"))
    assert headers[b"X-Mail-Args"].split()[1:] == [b"RET=HDRS", b"ENVID=queue+2Bid+3D1"]
    assert headers[b"X-Rcpt-Args"].split()[1:] == [
        b"NOTIFY=SUCCESS,DELAY",
        b"ORCPT=rfc822;A@example.test",
    ]


@pytest_twisted.ensureDeferred
async def test_source_address_is_bound(sinks: list[SMTPSink]) -> None:
    sink = start(sinks)
    route = Route((NextHop("127.0.0.1", sink.port),), source="127.0.0.2")
    results = await deliver(route, b"Subject: src\r\n\r\nx\r\n")
    assert [r.code for r, _ in results] == [250, 250]
    [raw] = sink.wait_for(1)
    assert b"X-Client-Addr: 127.0.0.2\n" in raw


@pytest_twisted.ensureDeferred
async def test_auth_to_smarthost_only_when_plaintext_allowed(sinks: list[SMTPSink]) -> None:
    sink = start(sinks)  # smtp-sink offers AUTH PLAIN LOGIN and never STARTTLS
    hop = NextHop("127.0.0.1", sink.port)
    refused = await deliver(Route((hop,), auth=("user", "secret"), tls=TLSPolicy.MAY), b"x\r\n")
    assert [(r.code, r.enhanced) for r, _ in refused] == [(451, "4.7.0")] * 2
    allowed = await deliver(
        Route((hop,), auth=("user", "secret"), allow_plaintext_auth=True),
        b"Subject: a\r\n\r\nx\r\n",
    )
    assert [r.code for r, _ in allowed] == [250, 250]
    assert len(sink.wait_for(1)) == 1  # only the allowed one got through


@pytest_twisted.ensureDeferred
async def test_hop_by_name_through_hostname_endpoint(sinks: list[SMTPSink]) -> None:
    sink = start(
        sinks
    )  # "localhost" is in /etc/hosts (files before dns): no DNS query leaves the host
    results = await deliver(
        Route((NextHop("localhost", sink.port),)), b"Subject: n\r\n\r\nname\r\n"
    )
    assert [r.code for r, _ in results] == [250, 250]
    assert results[0][1] == f"localhost[127.0.0.1]:{sink.port}"
