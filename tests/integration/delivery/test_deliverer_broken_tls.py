"""A real-socket next hop whose TLS is broken: it says 220 to STARTTLS, then speaks no TLS at all.

Under ``may`` the same hop is tried again in plaintext and the message arrives; under ``encrypt``
it is a temporary failure for that hop, never a plaintext delivery.
"""

from __future__ import annotations

import io

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver

from mailrelay.config import DeliveryConfig
from mailrelay.delivery import SMTPDeliverer
from mailrelay.envelope import Envelope, NextHop, Recipient, Route, TLSPolicy

pytestmark = pytest.mark.integration


class BrokenTLSServer(LineReceiver):
    delimiter = b"\r\n"

    def __init__(self, factory: BrokenTLSFactory) -> None:
        self.factory = factory
        self.in_data = False
        self.data: list[bytes] = []
        self.commands: list[bytes] = []

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.sendLine(b"220 broken.test ESMTP")

    def lineReceived(self, line: bytes) -> None:
        if self.in_data:
            if line == b".":
                self.in_data = False
                self.factory.messages.append(b"".join(ln + b"\r\n" for ln in self.data))
                self.sendLine(b"250 2.0.0 queued")
            else:
                self.data.append(line[1:] if line.startswith(b".") else line)
            return
        verb = line.split(b" ")[0].upper()
        self.commands.append(verb)
        self.factory.commands.append(verb)
        if verb == b"EHLO":
            self.sendLine(b"250-broken.test\r\n250-PIPELINING\r\n250 STARTTLS")
        elif verb == b"STARTTLS":
            self.sendLine(b"220 2.0.0 go ahead")
            self.transport.write(b"this is not a TLS server hello\r\n" * 4)
        elif verb == b"DATA":
            self.in_data = True
            self.sendLine(b"354 go")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"250 2.0.0 ok")


class BrokenTLSFactory(Factory):
    def __init__(self) -> None:
        self.connections = 0
        self.messages: list[bytes] = []
        self.commands: list[bytes] = []

    def buildProtocol(self, addr: object) -> BrokenTLSServer:
        return BrokenTLSServer(self)


async def run(policy: TLSPolicy) -> tuple[list, BrokenTLSFactory]:  # type: ignore[type-arg]
    factory = BrokenTLSFactory()
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    d = SMTPDeliverer(
        reactor, DeliveryConfig(connect_timeout=5, command_timeout=10), "relay.mailrelay.test"
    )
    env = Envelope("a@example.org", (Recipient("b@example.test"),))
    body = b"Subject: tls\r\n\r\n.dot\r\n"
    try:
        route = Route((NextHop("127.0.0.1", port.getHost().port),), tls=policy)
        results = await d.deliver(env, env.recipients, route, lambda: io.BytesIO(body))
    finally:
        await d.stop()
        await port.stopListening()
    return results, factory


@pytest_twisted.ensureDeferred
async def test_may_retries_the_hop_in_plaintext() -> None:
    results, factory = await run(TLSPolicy.MAY)
    assert [r.code for r, _ in results] == [250]
    assert factory.connections == 2
    assert factory.messages == [b"Subject: tls\r\n\r\n.dot\r\n"]
    assert factory.commands.count(b"STARTTLS") == 1  # the retry does not try TLS again


@pytest_twisted.ensureDeferred
async def test_encrypt_fails_temporarily_and_sends_nothing() -> None:
    results, factory = await run(TLSPolicy.ENCRYPT)
    [(reply, _)] = results
    assert (reply.code, reply.enhanced) == (451, "4.7.5")
    assert factory.messages == [] and b"MAIL" not in factory.commands
