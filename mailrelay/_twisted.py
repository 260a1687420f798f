"""Every use the product makes of a Twisted name that Twisted has not made public, and why.

Each has no public equivalent in the Twisted we support (24.3 and later); keeping them here means
an upgrade that moves one breaks this module only, and nothing else reads Twisted's privates.

- ``IOpenSSLTrustRoot`` (``twisted.internet._sslverify``) and the ``_addCACertsToContext`` it is
  called through: the only way to give TLS a trust root that is the platform's store *plus* a
  CA file (``PlatformAnd``; Twisted offers either, not both). Used by ``mailrelay.tls_trust``.
- The parsed fields of a ``tcp:``/``ssl:`` server endpoint (``_interface``, ``_port``,
  ``_backlog``, ``_sslContextFactory``): the supervisor of ``workers > 1`` binds the socket
  itself (``mailrelay.workers.sockets``) and must read the endpoint string exactly as
  ``serverFromString`` does, options and certificate included.
- ``StreamServerEndpointService._raiseSynchronously``: documented on the class as the switch that
  makes a failed listen raise from ``privilegedStartService`` (``twisted.application.strports``
  sets it the same way); used by ``mailrelay.port``.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.application.internet import StreamServerEndpointService
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.endpoints import SSL4ServerEndpoint, _TCPServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer


@implementer(IOpenSSLTrustRoot)
class PlatformAnd:
    """The platform's trust store plus the certificates of another trust root (a CA file's)."""

    def __init__(self, extra: Any) -> None:
        self.extra = extra

    def _addCACertsToContext(self, context: SSL.Context) -> None:  # noqa: N802 (Twisted's name)
        context.set_default_verify_paths()
        self.extra._addCACertsToContext(context)


def tcp_listen_address(endpoint: IStreamServerEndpoint) -> tuple[str, int, int] | None:
    """``(interface, port, backlog)`` of a TCP or SSL server endpoint; None for another kind."""
    if not isinstance(endpoint, _TCPServerEndpoint | SSL4ServerEndpoint):
        return None
    return endpoint._interface, endpoint._port, endpoint._backlog


def ssl_context_factory(endpoint: IStreamServerEndpoint) -> Any:
    """The certificate options an ``ssl:`` endpoint string was parsed into."""
    if not isinstance(endpoint, SSL4ServerEndpoint):
        raise TypeError(f"not an ssl: endpoint: {endpoint!r}")
    return endpoint._sslContextFactory


def raise_listen_errors_at_once(service: StreamServerEndpointService) -> None:
    """Make ``service.privilegedStartService`` raise when its port cannot be had."""
    service._raiseSynchronously = True
