"""The static router: fixed next hops for a set of domains (Postfix's transport map, in config).

``[[routes]] type = "static"`` with::

    domains = ["example.test", ".example.test"]   # exact, ".x" = any subdomain of x, "*" = any
    hosts = ["127.0.0.1:2526", "[::1]:2526"]      # tried in this order
    port = 25                                     # for hosts given without a port
    tls = "may"                                   # none | may | encrypt | verify
    protocol = "smtp"                             # or "lmtp" (RFC 2033), e.g. to a local MDA
    auth = { username = "relay", password = "secret" }
    allow_plaintext_auth = false
    source = "127.0.0.1"                          # local address to connect from
    rewrite = "{local}@mailstore.example.test"    # fields: {local}, {domain}, {address}

or, instead of ``hosts`` (and the keys that say how to reach them), a local capture::

    maildir = "var/mail"                          # each recipient's copy lands in var/mail/new/
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from zope.interface import implementer

from mailrelay import _ascii
from mailrelay.address import DomainError, canonical_pattern, split
from mailrelay.config import Section, parse_hostport
from mailrelay.envelope import Envelope, NextHop, Route, TLSPolicy
from mailrelay.interfaces import IRouter
from mailrelay.routing.context import RouterContext

_REWRITE_FIELDS = frozenset({"local", "domain", "address"})


def parse_domain_pattern(value: object) -> str:
    """A ``domains`` entry, ``"example.test"``, ``".example.test"`` or ``"*"``, canonical."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {type(value).__name__}")
    try:
        return canonical_pattern(_ascii.strip(value))
    except DomainError:
        raise ValueError(f"{value!r} is not a domain, '.subdomain' pattern or '*'") from None


class DomainSet:
    """``domains`` patterns as a predicate: ``DomainSet(["a.test", ".b.test"])("x.b.test")``.

    A set lookup per label of the domain, not a loop over the patterns: routers run it for every
    recipient. The domain must be normalised (``mailrelay.address.split`` does it).
    """

    def __init__(self, patterns: Sequence[str]) -> None:
        self.any = "*" in patterns
        self.exact = frozenset(p for p in patterns if not p.startswith(".") and p != "*")
        self.parents = frozenset(p for p in patterns if p.startswith("."))

    def __call__(self, domain: str) -> bool:
        if self.any or domain in self.exact:
            return True
        dot = domain.find(".")
        while dot >= 0:
            if domain[dot:] in self.parents:
                return True
            dot = domain.find(".", dot + 1)
        return False


def parse_tls(value: object) -> TLSPolicy:
    try:
        if isinstance(value, str):
            return TLSPolicy(value)
    except ValueError:
        pass
    known = ", ".join(p.value for p in TLSPolicy)
    raise ValueError(f"{value!r}: must be one of {known}")


def parse_rewrite(value: object) -> str:
    """A ``str.format`` template using only ``{local}``, ``{domain}`` and ``{address}``."""
    if not isinstance(value, str) or "@" not in value:
        raise ValueError("must be an address template such as '{local}@other.example'")
    try:
        fields = {f for _, f, spec, conv in string.Formatter().parse(value) if f is not None}
    except ValueError as e:
        raise ValueError(f"{value!r}: {e}") from None
    unknown = fields - _REWRITE_FIELDS
    if unknown:
        raise ValueError(
            f"{value!r}: unknown field {sorted(unknown)[0]!r} (known: address, domain, local)"
        )
    return value


def parse_auth(section: Section, name: str) -> tuple[str, str] | None:
    """``auth = { username = "...", password = "..." }`` → ``(username, password)``."""
    section.seen.add(name)
    if name not in section.table:
        return None
    sub = Section(section.source, section.key(name), section.table[name])
    username = sub.get("username", "", types=str)
    password = sub.get("password", "", types=str)
    sub.check_unknown()
    if not username:
        raise sub.error("username", "missing: auth needs a username and a password")
    if not password:
        raise sub.error("password", "missing: auth needs a username and a password")
    return username, password


@implementer(IRouter)
class StaticRouter:
    """Routes every recipient whose domain matches one of ``domains`` along ``route``.

    ``rewrite`` (a template, see the module doc) gives the address the next hop receives.
    """

    def __init__(self, domains: Sequence[str], route: Route, rewrite: str | None = None) -> None:
        if not route.hops and route.maildir is None:
            raise ValueError("a static route needs at least one next hop or a maildir")
        self.domains = tuple(parse_domain_pattern(d) for d in domains)
        self.matches = DomainSet(self.domains)
        self.route_ = route
        self.rewrite = parse_rewrite(rewrite) if rewrite is not None else None

    def __repr__(self) -> str:
        hops = (
            ", ".join(f"{h.host}:{h.port}" for h in self.route_.hops)
            or f"maildir {self.route_.maildir}"
        )
        return f"StaticRouter({list(self.domains)!r} -> {hops})"

    def route(self, recipient: str, envelope: Envelope) -> Route | None:
        local, domain = split(recipient)
        if not domain or not self.matches(domain):
            return None
        if self.rewrite is None:
            return self.route_
        new = self.rewrite.format(local=local, domain=domain, address=recipient)
        return attrs.evolve(self.route_, recipient=new)

    @classmethod
    def from_options(cls, options: Mapping[str, Any], context: RouterContext) -> StaticRouter:
        """The ``IRouterFactory`` registered as ``static``."""
        s = context.options(options)
        domains = s.get_list("domains", (), parse_domain_pattern)
        if not domains:
            raise s.error("domains", "missing: a static route needs at least one domain (or '*')")
        maildir = s.get("maildir", None, _maildir)
        rewrite = s.get("rewrite", None, parse_rewrite)
        if maildir is not None:
            for key in _NETWORK_KEYS:
                if key in options:
                    raise s.error(
                        key, "not with 'maildir': a maildir route delivers locally, to no host"
                    )
            s.check_unknown()
            return cls(domains, Route(hops=(), maildir=maildir), rewrite)
        port = s.get("port", 25, _port)
        hosts = s.get_list("hosts", (), lambda v: parse_hostport(v, port))
        if not hosts:
            raise s.error("hosts", "missing: a static route needs at least one 'host:port'")
        route = Route(
            hops=tuple(NextHop(host, p, preference=i) for i, (host, p) in enumerate(hosts)),
            tls=s.get("tls", TLSPolicy.MAY, parse_tls),
            auth=parse_auth(s, "auth"),
            source=s.get("source", None, types=str),
            allow_plaintext_auth=s.get("allow_plaintext_auth", False, types=bool),
            lmtp=s.get("protocol", "smtp", _protocol) == "lmtp",
        )
        s.check_unknown()
        return cls(domains, route, rewrite)


_NETWORK_KEYS = ("hosts", "port", "tls", "protocol", "auth", "allow_plaintext_auth", "source")


def _maildir(v: object) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError("must be a directory path, such as 'var/mail'")
    return v


def _protocol(v: object) -> str:
    if v not in ("smtp", "lmtp"):
        raise ValueError(f"must be 'smtp' or 'lmtp', not {v!r}")
    return str(v)


def _port(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        raise ValueError(f"port must be 1-65535, not {v!r}")
    return v
