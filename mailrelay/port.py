"""``Listener``: a listening port as a service that fails loudly and remembers its port.

A port that cannot be had (address in use, no permission) is a ``ConfigError`` naming the config
key (``server.listen[0]``), the endpoint and the system's reason, raised from
``privilegedStartService`` so that twistd stops at start-up instead of logging and running deaf.

Built on Twisted's ``StreamServerEndpointService``, whose switch for raising at once has an
underscored name (set in ``mailrelay._twisted``); the port is learnt from our own endpoint wrapper.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay._twisted import raise_listen_errors_at_once
from mailrelay.errors import cannot_listen

log = Logger()


@implementer(IStreamServerEndpoint)
class _Reporting:
    """An endpoint that hands the listening port to ``listened`` before anyone else sees it."""

    def __init__(self, endpoint: IStreamServerEndpoint, listened: Any) -> None:
        self.endpoint, self.listened = endpoint, listened

    def listen(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IListeningPort]:  # noqa: N803
        return self.endpoint.listen(protocolFactory).addCallback(self.listened)


class Listener(StreamServerEndpointService):
    """``description`` is the endpoint string; ``source`` and ``key`` name its place in the
    config. ``port`` is the listening port once listening; ``listening`` fires with it."""

    def __init__(
        self,
        description: str,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        source: str = "<config>",
        key: str = "",
    ) -> None:
        super().__init__(_Reporting(endpoint, self._listened), factory)
        raise_listen_errors_at_once(self)
        self.description = description
        self.source, self.key = source, key
        self.port: IListeningPort | None = None
        self.listening: defer.Deferred[IListeningPort] = defer.Deferred()

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise cannot_listen(self.source, self.key, self.description, e) from None

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        log.info(
            "listening on {description} ({address})",
            description=self.description,
            address=port.getHost(),
        )
        self.listening.callback(port)
        return port

    def stopService(self) -> Any:
        self.port = None
        return super().stopService()
