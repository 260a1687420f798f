"""Mailbox helpers shared by the wire, routing and delivery.

The full RFC 5321 path grammar lives in ``mailrelay.smtp._parser``; what is here works on mailboxes
that have already been parsed: ``local@domain`` strings.

Domains are compared in one canonical form (``canonical_domain``): ASCII letters lower-cased,
every label an A-label, checked by IDNA 2008 (RFC 5891) without the UTS-46 or IDNA 2003 mappings.
A spelling that only becomes a valid name through a mapping (fullwidth letters, an ideographic full
stop, a zero-width space, a Kelvin sign, upper-case non-ASCII, ``ß`` read as ``ss``) is not that
name: it is refused, so nothing is compared as one domain and passed on as another.
"""

from __future__ import annotations

import re

import idna

from mailrelay import _ascii

_LDH_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_LDH_DOMAIN = re.compile(rf"(?:{_LDH_LABEL}\.)*{_LDH_LABEL}")


class DomainError(ValueError):
    """Not a domain name in the strict (IDNA 2008) sense; the message says why."""


def canonical_domain(domain: str) -> str:
    """``"Bücher.DE"`` → ``"xn--bcher-kva.de"``: the form every comparison and lookup uses.

    An address literal (``[...]``) is only lower-cased. Raises ``DomainError`` unless each label,
    ASCII letters lower-cased, is already a valid A-label or U-label that round-trips exactly.
    """
    d = _ascii.lower(domain)
    if d.startswith("["):
        return d
    if d.isascii() and "xn--" not in d:
        if not _LDH_DOMAIN.fullmatch(d):
            raise DomainError(f"{domain!r} is not a domain name (letters, digits, '-' and dots)")
        return d
    labels = []
    for label in d.split("."):
        try:
            a_label = idna.alabel(label).decode("ascii")
            if a_label != label and idna.ulabel(a_label) != label:
                raise DomainError(f"{domain!r} is not a valid domain name")
        except (idna.IDNAError, UnicodeError) as e:
            raise DomainError(f"{domain!r} is not a valid domain name ({e})") from None
        labels.append(a_label)
    return ".".join(labels)


def split(address: str) -> tuple[str, str]:
    """``"User@Example.TEST"`` → ``("User", "example.test")``: the domain in canonical form (see
    ``normalise_domain``); local parts are case-sensitive (RFC 5321 2.4). No ``@``: empty domain.
    """
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, normalise_domain(domain)


def domain_of(address: str) -> str:
    return split(address)[1]


def normalise_domain(domain: str) -> str:
    """``canonical_domain`` without a trailing dot; what is not a valid name comes back unmapped
    (ASCII-lower-cased only), so it can never equal the canonical form of another name."""
    d = domain.removesuffix(".")
    try:
        return canonical_domain(d)
    except DomainError:
        return _ascii.lower(d)


def canonical_pattern(value: str) -> str:
    """A configured domain pattern (``"*"``, ``".example.test"``, ``"example.test."``) in canonical
    form; raises ``DomainError`` for anything else."""
    v = value.removesuffix(".")
    if v == "*":
        return v
    if v.startswith("."):
        return "." + canonical_domain(v[1:])
    return canonical_domain(v)


def domain_matches(domain: str, pattern: str) -> bool:
    """Static-route matching: ``"*"`` anything, ``".x"`` any subdomain of x, else exact. The
    pattern is canonical (``canonical_pattern``); the domain is normalised here."""
    domain = normalise_domain(domain)
    if pattern == "*":
        return True
    if pattern.startswith("."):
        return domain.endswith(pattern)
    return domain == pattern
