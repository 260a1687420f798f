"""SMTPDeliverer in memory: hop order, what moves to the next hop, per-recipient results."""

from __future__ import annotations

import io

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from mailrelay.config import DeliveryConfig
from mailrelay.delivery import SMTPDeliverer
from mailrelay.envelope import Envelope, NextHop, Recipient, Reply, Route

ENV = Envelope("a@x.test", (Recipient("b@y.test"), Recipient("c@y.test")))
EHLO = b"250-mx.test\r\n250 PIPELINING\r\n"


class Harness:
    def __init__(self, *hops: NextHop, source: str | None = None) -> None:
        self.reactor = MemoryReactorClock()
        self.deliverer = SMTPDeliverer(self.reactor, DeliveryConfig(connect_timeout=30), "relay.test")
        self.route = Route(hops, source=source)
        self.result: list[object] = []
        self.bodies: list[io.BytesIO] = []
        self.deliverer.deliver(ENV, ENV.recipients, self.route, self.open_body).addBoth(self.result.append)
        self.transport: StringTransport | None = None

    def open_body(self) -> io.BytesIO:
        self.bodies.append(io.BytesIO(b"Subject: t\r\n\r\nbody\r\n"))
        return self.bodies[-1]

    def refuse(self, i: int) -> None:
        host, port, factory, timeout, bind = self.reactor.tcpClients[i]
        factory.clientConnectionFailed(self.reactor.connectors[i], Failure(error.ConnectionRefusedError()))

    def accept(self, i: int) -> None:
        host, port, factory, timeout, bind = self.reactor.tcpClients[i]
        self.protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        self.protocol.makeConnection(self.transport)

    def reply(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def sent(self) -> bytes:
        assert self.transport is not None
        v = self.transport.value()
        self.transport.clear()
        return v


def test_happy_path_remote_and_order() -> None:
    h = Harness(NextHop("127.0.0.1", 2526))
    host, port, _, timeout, bind = h.reactor.tcpClients[0]
    assert (host, port, timeout, bind) == ("127.0.0.1", 2526, 30, None)
    h.accept(0)
    h.reply(b"220 mx\r\n")
    h.reply(EHLO)
    h.reply(b"250 ok\r\n250 ok\r\n550 5.1.1 nobody\r\n354 go\r\n")
    assert h.sent().endswith(b"body\r\n.\r\n")
    h.reply(b"250 2.0.0 queued\r\n")
    remote = "127.0.0.1[127.0.0.1]:2526"
    assert h.result == [[(Reply(250, "2.0.0", "queued"), remote), (Reply(550, "5.1.1", "nobody"), remote)]]
    assert h.sent() == b"QUIT\r\n"
    assert h.bodies[0].closed


def test_refused_then_second_hop() -> None:
    h = Harness(NextHop("127.0.0.1", 2526), NextHop("127.0.0.2", 2527, name="mx2.test"))
    h.refuse(0)
    assert h.reactor.tcpClients[1][:2] == ("127.0.0.2", 2527)
    h.accept(1)
    h.reply(b"220 mx\r\n" + EHLO)
    h.reply(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    h.reply(b"250 done\r\n")
    assert [remote for _, remote in h.result[0]] == ["mx2.test[127.0.0.2]:2527"] * 2  # type: ignore[union-attr]


def test_all_hops_refused_is_temporary_for_everyone() -> None:
    h = Harness(NextHop("127.0.0.1", 2526), NextHop("::1", 2527))
    h.refuse(0)
    h.refuse(1)
    (r1, remote), (r2, _) = h.result[0]  # type: ignore[misc]
    assert r1 == r2 == Reply(451, "4.4.1", "connect to ::1:2527 failed: Connection refused")
    assert remote == "::1[::1]:2527"


def test_connect_timeout_then_greeting_timeout() -> None:
    h = Harness(NextHop("127.0.0.1", 1), NextHop("127.0.0.2", 2))
    host, port, factory, timeout, _ = h.reactor.tcpClients[0]
    factory.clientConnectionFailed(h.reactor.connectors[0], Failure(error.TimeoutError()))
    h.accept(1)
    h.reactor.advance(299)
    assert h.result == []
    h.reactor.advance(1)  # no greeting in 300 s (the command timeout)
    (reply, remote), _ = h.result[0]  # type: ignore[misc]
    assert reply.code == 451 and "timed out" in reply.text and remote == "127.0.0.2[127.0.0.2]:2"


def test_421_greeting_moves_on_and_last_reply_wins() -> None:
    h = Harness(NextHop("127.0.0.1", 1), NextHop("127.0.0.2", 2))
    h.accept(0)
    h.reply(b"421 4.3.2 too busy\r\n")
    h.accept(1)
    h.reply(b"220 mx\r\n" + EHLO)
    h.reply(b"451 4.3.0 try later\r\n503 no\r\n503 no\r\n503 no\r\n")  # MAIL 4xx → next hop
    assert h.result[0] == [(Reply(451, "4.3.0", "try later"), "127.0.0.2[127.0.0.2]:2")] * 2


def test_mail_5xx_is_final_and_no_next_hop() -> None:
    h = Harness(NextHop("127.0.0.1", 1), NextHop("127.0.0.2", 2))
    h.accept(0)
    h.reply(b"220 mx\r\n" + EHLO)
    h.reply(b"553 5.7.1 sender refused\r\n503 no\r\n503 no\r\n503 no\r\n")
    assert h.result[0] == [(Reply(553, "5.7.1", "sender refused"), "127.0.0.1[127.0.0.1]:1")] * 2
    assert len(h.reactor.tcpClients) == 1


def test_5xx_greeting_everywhere_is_temporary() -> None:
    h = Harness(NextHop("127.0.0.1", 1))
    h.accept(0)
    h.reply(b"554 5.3.2 no service\r\n")
    (reply, _), _ = h.result[0]  # type: ignore[misc]
    assert reply.code == 451 and "554 5.3.2 no service" in reply.text


def test_lost_after_data_is_temporary_but_rcpt_rejections_stay() -> None:
    h = Harness(NextHop("127.0.0.1", 1), NextHop("127.0.0.2", 2))
    h.accept(0)
    h.reply(b"220 mx\r\n" + EHLO)
    h.reply(b"250 ok\r\n550 5.1.1 no\r\n250 ok\r\n354 go\r\n")
    h.protocol.connectionLost(Failure(error.ConnectionLost()))
    [(r1, _), (r2, _)] = h.result[0]  # type: ignore[misc]
    assert r1 == Reply(550, "5.1.1", "no")
    assert r2.code == 451 and r2.enhanced == "4.4.2" and "DATA-END" in r2.text
    assert len(h.reactor.tcpClients) == 1  # never the next hop once MAIL was accepted


def test_source_address_bound() -> None:
    h = Harness(NextHop("127.0.0.1", 1), source="127.0.0.9")
    assert h.reactor.tcpClients[0][4] == ("127.0.0.9", 0)


def test_no_hops() -> None:
    h = Harness()
    assert h.result[0][0][0].code == 451  # type: ignore[index]
