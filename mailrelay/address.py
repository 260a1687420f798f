"""Mailbox helpers shared by the wire, routing and delivery.

The full RFC 5321 path grammar lives in ``mailrelay.smtp._parser``; what is here works on mailboxes
that have already been parsed: ``local@domain`` strings.
"""

from __future__ import annotations


def split(address: str) -> tuple[str, str]:
    """``"User@Example.TEST"`` → ``("User", "example.test")``: the domain lower-cased and stripped
    of a trailing dot; local parts are case-sensitive (RFC 5321 2.4). No ``@`` → empty domain."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, normalise_domain(domain)


def domain_of(address: str) -> str:
    return split(address)[1]


def normalise_domain(domain: str) -> str:
    """Lower case, no trailing dot, IDNA (A-label) form for non-ASCII names."""
    d = domain.strip().rstrip(".").lower()
    if d.startswith("["):  # address literal
        return d
    if not d.isascii():
        try:
            d = d.encode("idna").decode("ascii")
        except UnicodeError:
            pass
    return d


def domain_matches(domain: str, pattern: str) -> bool:
    """Static-route matching: ``"*"`` anything, ``".x"`` any subdomain of x, else exact."""
    domain = normalise_domain(domain)
    pattern = pattern.lower()
    if pattern == "*":
        return True
    if pattern.startswith("."):
        return domain.endswith(pattern)
    return domain == pattern.rstrip(".")
