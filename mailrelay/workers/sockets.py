"""Listening sockets bound once by the supervisor and adopted by every worker process.

The supervisor turns each ``[server] listen`` / ``submission_listen`` endpoint string into a bound,
listening socket (``bind``), passes it to each worker as an inherited file descriptor, and the
worker adopts it (``AdoptedEndpoint``, through ``reactor.adoptStreamPort``). All workers then
``accept`` on the same socket and the kernel hands each connection to one of them. ``ssl:``
endpoints are wrapped in TLS in the worker, the way ``reactor.listenSSL`` does it.
"""

from __future__ import annotations

import socket
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.abstract import isIPv6Address
from twisted.internet.endpoints import TCP6ServerEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from zope.interface import implementer

from mailrelay._twisted import ssl_context_factory, tcp_listen_address
from mailrelay.config import WORKER_ENDPOINTS


@attrs.frozen
class ListenerSpec:
    """One listener as a worker receives it: the list it came from, its string, fd and family."""

    kind: str  # "smtp" (server.listen) or "submission" (server.submission_listen)
    description: str
    fd: int
    family: int

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ListenerSpec:
        return cls(d["kind"], d["description"], int(d["fd"]), int(d["family"]))


def bind(reactor: Any, description: str) -> socket.socket:
    """A listening, non-blocking socket for a ``tcp``, ``tcp6`` or ``ssl`` endpoint string."""
    endpoint = serverFromString(reactor, description)
    address = tcp_listen_address(endpoint)  # the endpoint's own parse of the string
    if address is None:
        raise ValueError(
            f"{description!r}: with workers > 1 listeners must be {', '.join(WORKER_ENDPOINTS)}"
        )
    interface, port, backlog = address
    if isinstance(endpoint, TCP6ServerEndpoint) or isIPv6Address(interface):
        family = socket.AF_INET6
    else:
        family = socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted's own ports do
        sock.bind((interface or ("::" if family == socket.AF_INET6 else ""), port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """Listens by adopting an inherited listening socket (and wrapping ``ssl:`` ones in TLS)."""

    def __init__(self, reactor: Any, spec: ListenerSpec) -> None:
        self.reactor = reactor
        self.spec = spec
        self.tls: Any = None
        if spec.description.split(":", 1)[0].strip().lower() == "ssl":
            # the string's certificate options, loaded as serverFromString loads them
            self.tls = ssl_context_factory(serverFromString(reactor, spec.description))

    def listen(self, factory: Any) -> defer.Deferred[IListeningPort]:
        if self.tls is not None:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            factory = TLSMemoryBIOFactory(self.tls, False, factory)
        d = defer.maybeDeferred(
            self.reactor.adoptStreamPort, self.spec.fd, self.spec.family, factory
        )
        return d.addCallback(self._adopted)

    def _adopted(self, port: IListeningPort) -> IListeningPort:
        # the port listens on a duplicate: close the inherited one so that stopping it closes ours
        import os

        os.close(self.spec.fd)
        return port
