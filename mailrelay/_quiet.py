"""Twisted's per-connection chatter kept out of the log.

A Twisted factory logs ``Starting factory <...>`` and ``Stopping factory <...>`` whenever it
starts and stops (``noisy = True`` is the default): for a client factory that is every outbound
connection. A DNS query over UDP starts and stops a ``DNSDatagramProtocol`` of its own (a fresh
source port per query, against spoofed answers), which logs ``Starting protocol`` and ``Stopping
protocol``, and its port logs ``DNSDatagramProtocol starting on <port>`` and ``(UDP Port <port>
Closed)``. The relay's own lines say what happened to each connection and message; these say
nothing more, so every factory of ours is quiet; the DNS protocol's and port's lines, whose class
twisted.names chooses inside a private method, are left out by our log observers
(``mailrelay._log.is_chatter``).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer


class QuietFactory(Factory):
    """A ``Factory`` that does not log its starts and stops."""

    noisy = False


def connect_protocol(endpoint: Any, protocol: Protocol) -> defer.Deferred[Protocol]:
    """``endpoints.connectProtocol`` without a ``Starting factory`` line per call."""

    class _OneShot(QuietFactory):
        def buildProtocol(self, addr: Any) -> Protocol:  # noqa: N802 (Twisted's name)
            return protocol

    connecting: defer.Deferred[Protocol] = endpoint.connect(_OneShot())
    return connecting


@implementer(IStreamClientEndpoint)
class QuietEndpoint:
    """An endpoint that quiets the factories it connects (twisted.web's ``Agent`` makes its own)."""

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        factory.noisy = False
        connecting: defer.Deferred[Any] = self.endpoint.connect(factory)
        return connecting
