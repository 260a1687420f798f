"""Accept-and-discard server on ``twisted.mail.smtp.ESMTP`` (the protocol mailrelay does not use).

    python twisted_mail_sink.py HOST PORT

Issue 7 asks mailrelay's accept side (which stores and fsyncs) to be at least as fast as this
(which stores nothing).
"""

from __future__ import annotations

import sys

from twisted.internet import defer, protocol, reactor
from twisted.mail import smtp
from zope.interface import implementer


@implementer(smtp.IMessage)
class Discard:
    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(smtp.IMessageDelivery)
class Delivery:
    def receivedHeader(self, helo: object, origin: object, recipients: object) -> None:
        return None

    def validateFrom(self, helo: object, origin: object) -> object:
        return origin

    def validateTo(self, user: object) -> object:
        return Discard


class Factory(protocol.ServerFactory):
    delivery = Delivery()

    def buildProtocol(self, addr: object) -> smtp.ESMTP:
        p = smtp.ESMTP()
        p.delivery = self.delivery
        p.host = b"twisted-mail-sink"
        p.factory = self
        return p


if __name__ == "__main__":
    reactor.listenTCP(int(sys.argv[2]), Factory(), backlog=1024, interface=sys.argv[1])
    reactor.run()
