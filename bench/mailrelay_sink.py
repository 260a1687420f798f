"""Accept-and-discard server on mailrelay's own ESMTP server (``mailrelay.smtp.server``).

    python mailrelay_sink.py HOST PORT

The wire side only, nothing stored: the same job as aiosmtpd_sink.py and twisted_mail_sink.py, so
``accept.py`` compares protocol implementations and nothing else. Default (epoll) reactor.
"""

from __future__ import annotations

import ipaddress
import itertools
import sys

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from zope.interface import implementer

from mailrelay.config import ServerConfig
from mailrelay.interfaces import IMessageSink, IMessageWriter
from mailrelay.listener import server_factory
from mailrelay.policy import build_policy

_ids = itertools.count(1)


@implementer(IMessageWriter)
class Discard:
    def __init__(self) -> None:
        self.queue_id = f"D{next(_ids)}"

    def write(self, data: bytes) -> None:
        pass

    def commit(self) -> defer.Deferred[str]:
        return defer.succeed(self.queue_id)

    def abort(self) -> None:
        pass


@implementer(IMessageSink)
class DiscardSink:
    def open(self, envelope: object) -> Discard:
        return Discard()


def main(host: str, port: int) -> None:
    config = ServerConfig(
        hostname="mailrelay-sink",
        trusted_networks=(ipaddress.ip_network("127.0.0.0/8"),),
        max_message_size=200 * 2**20,
        max_connections=5000,
        max_connections_per_ip=5000,
    )
    factory = server_factory(config, DiscardSink(), build_policy(config), reactor)
    TCP4ServerEndpoint(reactor, port, backlog=1024, interface=host).listen(factory)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
