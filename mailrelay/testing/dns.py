"""An in-memory DNS resolver for tests, re-exported as ``mailrelay.testing.FakeResolver``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet import defer
from twisted.names import dns
from twisted.names import error as dnserror

#: What a resolver's lookup gives: answer, authority and additional records.
Answer = tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]


class FakeResolver:
    """Give it to ``MXRouter`` (or ``RouterContext(resolver=...)``) instead of a real resolver.

    Answers ``lookupMailExchange``/``lookupAddress``/``lookupIPV6Address``/``lookupText`` like
    an authoritative server: a known name without records of the type gives an empty answer
    (NODATA), an unknown name ``DNSNameError`` (NXDOMAIN), a CNAME is answered with the target's
    records when known.

    ``add(name, "MX", (10, "mx1.example.test"))``, ``add(name, "A", "127.0.0.1")``,
    ``add(name, "CNAME", "target")``, ``add(name, "TXT", "v=STSv1; id=1")``;
    ``fail(name, "MX", error)`` makes a query fail;
    ``queries`` records every query as ``(name, type)``.
    """

    def __init__(self, ttl: int = 60) -> None:
        self.ttl = ttl
        self.records: dict[str, list[tuple[int, object, int]]] = {}
        self.errors: dict[tuple[str, int], Exception] = {}
        self.queries: list[tuple[str, str]] = []

    def add(self, name: str, rtype: str, *values: object, ttl: int | None = None) -> FakeResolver:
        for value in values:
            self.records.setdefault(name.lower().rstrip("."), []).append(
                (getattr(dns, rtype), value, self.ttl if ttl is None else ttl)
            )
        return self

    def fail(self, name: str, rtype: str, error: Exception) -> FakeResolver:
        self.errors[(name.lower().rstrip("."), getattr(dns, rtype))] = error
        return self

    def _rr(self, name: str, qtype: int, value: Any, ttl: int) -> dns.RRHeader:
        payload: dns.IEncodableRecord
        if qtype == dns.MX:
            pref, host = value
            payload = dns.Record_MX(pref, host, ttl=ttl)
        elif qtype == dns.A:
            payload = dns.Record_A(value, ttl=ttl)
        elif qtype == dns.AAAA:
            payload = dns.Record_AAAA(value, ttl=ttl)
        elif qtype == dns.CNAME:
            payload = dns.Record_CNAME(value, ttl=ttl)
        elif qtype == dns.TXT:  # a str is one string; a tuple of them, several (joined by readers)
            strings = (value,) if isinstance(value, str) else tuple(value)
            payload = dns.Record_TXT(*(v.encode() for v in strings), ttl=ttl)
        else:
            raise ValueError(qtype)
        return dns.RRHeader(name, qtype, dns.IN, ttl, payload)

    def _answer(self, name: str, qtype: int) -> Iterable[dns.RRHeader]:
        name = name.lower().rstrip(".")
        for _ in range(10):
            entries = self.records.get(name, [])
            cnames = [e for e in entries if e[0] == dns.CNAME]
            if cnames and qtype != dns.CNAME:
                _, target, ttl = cnames[0]
                yield self._rr(name, dns.CNAME, target, ttl)
                name = str(target).lower().rstrip(".")
                if name not in self.records:
                    return
                continue
            for t, value, ttl in entries:
                if t == qtype:
                    yield self._rr(name, qtype, value, ttl)
            return

    def _lookup(self, name: str, qtype: int) -> defer.Deferred[Answer]:
        key = name.lower().rstrip(".")
        self.queries.append((key, dns.QUERY_TYPES[qtype]))
        error = self.errors.get((key, qtype))
        if error is not None:
            return defer.fail(error)
        if key not in self.records:
            return defer.fail(dnserror.DNSNameError(key))
        return defer.succeed((list(self._answer(key, qtype)), [], []))

    def lookupMailExchange(self, name: str, timeout: object = None) -> defer.Deferred[Answer]:
        return self._lookup(name, dns.MX)

    def lookupAddress(self, name: str, timeout: object = None) -> defer.Deferred[Answer]:
        return self._lookup(name, dns.A)

    def lookupIPV6Address(self, name: str, timeout: object = None) -> defer.Deferred[Answer]:
        return self._lookup(name, dns.AAAA)

    def lookupText(self, name: str, timeout: object = None) -> defer.Deferred[Answer]:
        return self._lookup(name, dns.TXT)
