"""Relay access control: who may send mail to which domains. Never an open relay.

Trusted clients (``trusted_networks``, or authenticated) may relay anywhere. Anyone else may only
send to ``local_domains`` and ``relay_domains`` (exact names; a leading ``.`` means any subdomain),
and to the unqualified ``<postmaster>``. For them, any address that some MTA down the line could
read as "route elsewhere" is refused before the domain is even looked at: ``%`` (the percent hack),
``!`` (bang paths), an ``@`` or ``:`` hidden in a quoted local part, a source route, and address
literals. Domains are compared in one canonical form (``mailrelay.address.canonical_domain``:
ASCII case folded, IDNA 2008 without mappings) and trailing dots never parse (see
``mailrelay.paths``), so neither case nor a look-alike can make a foreign domain look local.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from zope.interface import implementer

from mailrelay.address import DomainError, canonical_domain, canonical_pattern
from mailrelay.envelope import Reply, SessionInfo
from mailrelay.interfaces import IPolicy
from mailrelay.paths import PathError, parse_mailbox
from mailrelay.policy import Policy

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_ROUTING_CHARS = frozenset("%!@:")


def _client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_trusted(address: str, networks: Iterable[Network]) -> bool:
    ip = _client_ip(address)
    return ip is not None and any(ip.version == n.version and ip in n for n in networks)


@implementer(IPolicy)
class RelayAccess(Policy):
    """``554 5.7.1 <addr>: Relay access denied`` to untrusted clients mailing to other domains."""

    def __init__(
        self,
        trusted_networks: Iterable[Network],
        local_domains: Iterable[str],
        relay_domains: Iterable[str] = (),
    ) -> None:
        self.trusted_networks = tuple(trusted_networks)
        self.domains = tuple(canonical_pattern(d) for d in (*local_domains, *relay_domains))
        self._trusted_cache: dict[str, bool] = {}  # client address → trusted (parsing IPs is slow)

    def is_our_domain(self, domain: str) -> bool:
        if not domain or domain.startswith("[") or domain.endswith("."):
            return False
        try:
            d = canonical_domain(domain)
        except DomainError:
            return False  # a look-alike (fullwidth, U+3002, zero-width...) is nobody's domain
        for pattern in self.domains:
            if pattern.startswith("."):
                if d.endswith(pattern):
                    return True
            elif d == pattern:
                return True
        return False

    def may_receive(self, recipient: str) -> bool:
        """Could an untrusted client send to this (parsed, canonical) forward-path?"""
        if recipient.lower() == "postmaster":
            return True
        try:
            path = parse_mailbox(recipient)
        except PathError:
            return False
        if _ROUTING_CHARS & set(path.local_part):
            return False
        return self.is_our_domain(path.domain)

    # -- IPolicy --------------------------------------------------------------------------------

    def connect(self, session: SessionInfo) -> None:
        trusted = self._trusted_cache.get(session.client_address)
        if trusted is None:
            if len(self._trusted_cache) > 10000:
                self._trusted_cache.clear()
            trusted = is_trusted(session.client_address, self.trusted_networks)
            self._trusted_cache[session.client_address] = trusted
        if trusted:
            session.trusted = True

    def rcpt(
        self, session: SessionInfo, sender: str, recipient: str, params: Mapping[str, str | None]
    ) -> Reply | None:
        if session.trusted or session.auth:
            return None
        if self.may_receive(recipient):
            return None
        return Reply(554, "5.7.1", f"<{recipient}>: Relay access denied")
