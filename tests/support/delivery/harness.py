"""SMTPDeliverer in memory (``Harness``): connection attempts on a MemoryReactorClock that a test
accepts or refuses one by one, then scripted replies on a StringTransport."""

from __future__ import annotations

import io

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from mailrelay.config import DeliveryConfig
from mailrelay.delivery import SMTPDeliverer
from mailrelay.envelope import Envelope, NextHop, Recipient, Route

ENV = Envelope("a@x.test", (Recipient("b@y.test"), Recipient("c@y.test")))


class Harness:
    """A deliverer on a MemoryReactorClock; ``accept(i)`` completes the i-th connection attempt."""

    def __init__(
        self,
        *hops: NextHop,
        start: bool = True,
        config: DeliveryConfig | None = None,
        **route_kw: object,
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.deliverer = SMTPDeliverer(
            self.reactor, config or DeliveryConfig(connect_timeout=30), "relay.test"
        )
        self.route = Route(hops, **route_kw)  # type: ignore[arg-type]
        self.result: list[object] = []
        self.bodies: list[io.BytesIO] = []
        self.body = b"Subject: t\r\n\r\nbody\r\n"
        self.transport: StringTransport | None = None
        self.tls_started: list[object] = []
        if start:
            self.deliver()

    def deliver(self, env: Envelope = ENV) -> list[object]:
        self.result = []
        self.deliverer.deliver(env, env.recipients, self.route, self.open_body).addBoth(
            self.result.append
        )
        return self.result

    def open_body(self) -> io.BytesIO:
        self.bodies.append(io.BytesIO(self.body))
        return self.bodies[-1]

    def refuse(self, i: int) -> None:
        host, port, factory, timeout, bind = self.reactor.tcpClients[i]
        factory.clientConnectionFailed(
            self.reactor.connectors[i], Failure(error.ConnectionRefusedError())
        )

    def accept(self, i: int) -> None:
        host, port, factory, timeout, bind = self.reactor.tcpClients[i]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        assert protocol is not None
        self.protocol = protocol
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        self.transport.startTLS = self.tls_started.append  # type: ignore[attr-defined]
        self.protocol.makeConnection(self.transport)

    def reply(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def sent(self) -> bytes:
        assert self.transport is not None
        v = self.transport.value()
        self.transport.clear()
        return v

    def lose(self) -> None:
        self.protocol.connectionLost(Failure(error.ConnectionLost()))
