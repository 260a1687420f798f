"""Opening a connection to one next hop: the endpoint for its address, bound source, error words."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import error
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure

from mailrelay.envelope import NextHop


def ip_version(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host.strip("[]")).version
    except ValueError:
        return None


def endpoint_for(
    reactor: Any, hop: NextHop, timeout: float, source: str | None
) -> IStreamClientEndpoint:
    """TCP4/TCP6 straight to an address literal; HostnameEndpoint (both families) for a name."""
    host = hop.host.strip("[]")
    bind = (source, 0) if source else None
    version = ip_version(host)
    if version == 4:
        return TCP4ClientEndpoint(reactor, host, hop.port, timeout=timeout, bindAddress=bind)
    if version == 6:
        return TCP6ClientEndpoint(reactor, host, hop.port, timeout=timeout, bindAddress=bind)
    return HostnameEndpoint(reactor, host, hop.port, timeout=timeout, bindAddress=bind)


def hop_label(hop: NextHop, ip: str | None = None) -> str:
    """``name[ip]:port`` as Postfix logs it (``[ip]`` alone: the address literal, no name)."""
    name = hop.name or hop.host.strip("[]")
    address = ip or (hop.host.strip("[]") if ip_version(hop.host) else "")
    if address:
        return f"{name}[{address}]:{hop.port}"
    return f"{name}:{hop.port}"


def connect_error_text(failure: Failure) -> str:
    """Short words for a failed connect, as an operator reads them in a bounce or log."""
    if failure.check(error.ConnectionRefusedError):
        return "Connection refused"
    if failure.check(error.TimeoutError, error.UserError):
        return "Connection timed out"
    if failure.check(error.DNSLookupError):
        return "Host or domain name not found"
    if failure.check(error.NoRouteError):
        return "No route to host"
    return failure.getErrorMessage()
