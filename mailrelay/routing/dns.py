"""DNS for the routers: the resolver they ask, and the reading of its answers.

Names come back from Twisted as ``dns.Name``, bytes or str; errors as its exception classes.
Here they become lower-case strings, addresses, and our 451 ``TemporaryFailure``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import Any, cast

from twisted.internet import defer
from twisted.names import client, dns
from twisted.names import error as dnserror

from mailrelay import _ascii
from mailrelay.envelope import Reply
from mailrelay.errors import TemporaryFailure


def temporary(domain: str, why: str) -> TemporaryFailure:
    return TemporaryFailure(
        Reply(451, "4.4.3", f"DNS lookup for {domain} failed: {why}; will retry")
    )


def name_text(name: object) -> str:
    """A DNS name (``dns.Name``, bytes or str) as a lower-case string without the final dot."""
    if isinstance(name, dns.Name):
        name = name.name
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return _ascii.lower(str(name).rstrip("."))  # str.lower() would fold a look-alike onto a name


def address_literal(domain: str) -> str | None:
    """``[127.0.0.1]`` / ``[IPv6:::1]`` → the address; anything else → None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


def make_resolver(
    nameservers: Sequence[tuple[str, int]], reactor: Any, timeout: float = 5.0
) -> client.Resolver:
    """A resolver asking exactly ``nameservers`` (or, if none, those in /etc/resolv.conf).

    Each query is tried twice (a third, then two thirds of ``timeout``) before it is temporary.
    """
    timeouts = (max(timeout / 3, 0.1), max(timeout * 2 / 3, 0.1))
    if nameservers:
        return client.Resolver(servers=list(nameservers), timeout=timeouts, reactor=reactor)
    return client.Resolver(resolv="/etc/resolv.conf", timeout=timeouts, reactor=reactor)


# The record data of an answer of the type asked for (the routers keep only those): the casts
# say which class Twisted decoded it into, at no cost.


def mx_record(r: dns.RRHeader) -> dns.Record_MX:
    return cast(dns.Record_MX, r.payload)


def txt_record(r: dns.RRHeader) -> dns.Record_TXT:
    return cast(dns.Record_TXT, r.payload)


def address_of(r: dns.RRHeader) -> str:
    if r.type == dns.AAAA:
        return socket.inet_ntop(socket.AF_INET6, cast(dns.Record_AAAA, r.payload).address)
    return cast(dns.Record_A, r.payload).dottedQuad()


_RCODES: dict[type[Exception], str] = {
    dnserror.DNSServerError: "SERVFAIL",
    dnserror.DNSQueryRefusedError: "REFUSED",
    dnserror.DNSFormatError: "FORMERR",
    dnserror.DNSNotImplementedError: "NOTIMP",
}


def describe_error(e: Exception) -> str:
    return _RCODES.get(
        type(e), "timed out" if isinstance(e, defer.TimeoutError) else type(e).__name__
    )
