"""The MX router: next hops from DNS (RFC 5321 section 5.1, RFC 7505), with twisted.names.

For a recipient domain: its MX records in preference order (equal preferences shuffled with the
injected ``random``), or the domain itself when it has no MX (the implicit MX); then every A and
AAAA address of every MX host, in that order, up to ``max_hosts`` hops. The hops carry IP addresses
in ``host`` and the MX name in ``name`` (for TLS verification and logs).

Failures say what the queue should do: NXDOMAIN is permanent (5.1.2), a null MX is permanent
(5.1.10), a name with no address is permanent (5.4.4); SERVFAIL, REFUSED and timeouts are temporary
(4.4.3), so a DNS outage never bounces mail. Answers are cached for their TTL on the injected clock.

The resolver is built with exactly the configured ``nameservers``: ``client.createResolver`` would
also read /etc/resolv.conf.

With ``mta_sts`` (RFC 8461, see ``mtasts``) a domain's ``enforce`` policy limits the route to the
MX hosts the policy lists, with ``tls = verify`` against each MX name; if it lists none of them
the route is a temporary failure (4.7.5). A ``testing`` policy only logs what enforce would refuse.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import dns
from twisted.names import error as dnserror
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.address import normalise_domain, split
from mailrelay.config import parse_duration, parse_hostport
from mailrelay.envelope import Envelope, NextHop, Reply, Route, TLSPolicy
from mailrelay.errors import PermanentFailure, TemporaryFailure
from mailrelay.interfaces import IRouter
from mailrelay.routing.context import RouterContext
from mailrelay.routing.dns import (
    address_literal,
    address_of,
    describe_error,
    make_resolver,
    mx_record,
    name_text,
    temporary,
    txt_record,
)
from mailrelay.routing.mtasts import HTTPSFetcher, Mode, Policy, PolicyCache
from mailrelay.routing.static import DomainSet, parse_domain_pattern, parse_tls
from mailrelay.tls_trust import ca_file_option

log = Logger()

MAX_CNAME_DEPTH = 8
CACHE_LIMIT = 10000  # entries per cache: a relay for the world meets many domains
SHUFFLE_WINDOW = 1.0  # seconds during which one domain's equal-preference order is reused


@attrs.frozen
class Exchange:
    """One MX host: its preference, its name and its addresses (in connection order)."""

    preference: int
    name: str
    addresses: tuple[str, ...]


@attrs.frozen
class _Resolved:
    """What DNS said about one domain, cached until ``expires`` (clock seconds)."""

    exchanges: tuple[Exchange, ...] = ()
    failure: PermanentFailure | None = None
    expires: float = 0.0


def bound_cache(
    cache: dict[Any, Any], expired: Callable[[Any], bool], limit: int = CACHE_LIMIT
) -> None:
    """Keep a cache under ``limit`` entries: drop expired ones, then the oldest half if needed."""
    if len(cache) <= limit:
        return
    for key in [k for k, v in cache.items() if expired(v)]:
        del cache[key]
    if len(cache) > limit:
        for key in list(cache)[: len(cache) // 2]:
            del cache[key]


@implementer(IRouter)
class MXRouter:
    """Routes recipients of ``domains`` (default: every domain) by DNS.

    ``resolver`` provides ``twisted.names``' ``IResolver`` lookups (``lookupMailExchange``,
    ``lookupAddress``, ``lookupIPV6Address``); ``clock`` times the cache; ``random`` shuffles MX
    hosts of equal preference (seed it in tests); ``prefer`` is ``"ipv4"`` or ``"ipv6"``: which
    family's addresses of one host come first. ``mta_sts``, when set, is the ``PolicyCache`` whose
    policies constrain the routes (it asks this router for TXT records and addresses).
    """

    def __init__(
        self,
        resolver: Any,
        clock: IReactorTime,
        *,
        port: int = 25,
        domains: Sequence[str] = ("*",),
        random: _random.Random | None = None,
        max_hosts: int = 10,
        prefer: str = "ipv4",
        tls: TLSPolicy = TLSPolicy.MAY,
        source: str | None = None,
        min_ttl: float = 0.0,
        max_ttl: float = 3600.0,
        negative_ttl: float = 60.0,
        mta_sts: PolicyCache | None = None,
    ) -> None:
        if prefer not in ("ipv4", "ipv6"):
            raise ValueError("prefer must be 'ipv4' or 'ipv6'")
        self.resolver = resolver
        self.clock = clock
        self.port = port
        self.domains = tuple(parse_domain_pattern(d) for d in domains)
        self.matches = DomainSet(self.domains)
        self.random = random if random is not None else _random.Random()
        self.max_hosts = max_hosts
        self.prefer = prefer
        self.tls = tls
        self.source = source
        self.min_ttl, self.max_ttl, self.negative_ttl = min_ttl, max_ttl, negative_ttl
        self._cache: dict[str, _Resolved] = {}
        self._inflight: dict[str, list[defer.Deferred[tuple[Exchange, ...]]]] = {}
        self._orders: dict[str, tuple[tuple[Exchange, ...], float, tuple[Exchange, ...]]] = {}
        self._routes: dict[int, tuple[tuple[Exchange, ...], Route]] = {}  # port → last route built
        self._sts_routes: dict[tuple[str, int], tuple[tuple[Exchange, ...], Policy, Route]] = {}
        self.mta_sts = mta_sts

    def __repr__(self) -> str:
        return f"MXRouter(port={self.port}, domains={list(self.domains)!r})"

    def route(self, recipient: str, envelope: Envelope | None) -> defer.Deferred[Route] | None:
        domain = split(recipient)[1]
        if not domain or not self.matches(domain):
            return None
        return self.route_domain(domain)

    def route_domain(self, domain: str, port: int | None = None) -> defer.Deferred[Route]:
        """The route to ``domain``'s MX hosts (as if mail were addressed to someone there).

        Also used by other routers (LDAP ``mailHost``) to route on to a host name.
        """
        port = port if port is not None else self.port
        d = self.exchanges(domain)
        domain = normalise_domain(domain)
        if self.mta_sts is None or address_literal(domain) is not None:
            return d.addCallback(self._route, port)
        policy = self.mta_sts.policy(domain)  # in parallel with the MX lookup; never fails
        return d.addCallback(
            lambda exchanges: policy.addCallback(lambda p: self._apply(domain, exchanges, p, port))
        )

    def _apply(
        self, domain: str, exchanges: tuple[Exchange, ...], policy: Policy | None, port: int
    ) -> Route:
        """The route under ``domain``'s MTA-STS policy (RFC 8461 sections 4 and 5)."""
        if policy is None or policy.mode is Mode.NONE:
            return self._route(exchanges, port)
        if policy.mode is Mode.TESTING:
            refused = [x.name for x in exchanges if not policy.allows(x.name)]
            if refused:
                log.warn(
                    "MTA-STS testing policy {id} of {domain}: enforce would refuse MX {hosts} "
                    "(not in {patterns}); delivering as usual",
                    id=policy.id,
                    domain=domain,
                    hosts=", ".join(refused),
                    patterns=", ".join(policy.mx),
                )
            return self._route(exchanges, port)
        memo = self._sts_routes.get((domain, port))
        if memo is not None and memo[0] is exchanges and memo[1] is policy:
            return memo[2]
        allowed = tuple(x for x in exchanges if policy.allows(x.name))
        if not allowed:
            if self.mta_sts is not None:  # section 5.1: look for a newer policy
                self.mta_sts.recheck(domain)
            names = ", ".join(x.name for x in exchanges)
            log.warn(
                "MTA-STS enforce policy {id} of {domain} lists none of its MX hosts ({hosts}); "
                "mail waits",
                id=policy.id,
                domain=domain,
                hosts=names,
            )
            raise TemporaryFailure(
                Reply(
                    451,
                    "4.7.5",
                    f"MTA-STS policy of {domain} (enforce) allows none of "
                    f"its MX hosts ({names}); will retry",
                )
            )
        if len(allowed) < len(exchanges):
            log.info(
                "MTA-STS enforce policy {id} of {domain}: MX {hosts} not listed, not used",
                id=policy.id,
                domain=domain,
                hosts=", ".join(x.name for x in exchanges if x not in allowed),
            )
        route = attrs.evolve(self._build_route(allowed, port), tls=TLSPolicy.VERIFY)
        self._sts_routes[(domain, port)] = (exchanges, policy, route)
        bound_cache(self._sts_routes, lambda v: False)
        return route

    def txt(self, name: str) -> defer.Deferred[tuple[tuple[str, ...], float]]:
        """The TXT records of ``name`` (each one's strings joined) and their TTL; for MTA-STS.

        Raises ``DNSNameError`` for NXDOMAIN and ``TemporaryFailure`` when DNS does not answer.
        """

        async def lookup() -> tuple[tuple[str, ...], float]:
            records, ttls = await self._lookup(normalise_domain(name), dns.TXT)
            texts = tuple(b"".join(txt_record(r).data).decode("utf-8", "replace") for r in records)
            return texts, self._ttl(ttls)

        return defer.ensureDeferred(lookup())

    def addresses(self, name: str) -> defer.Deferred[tuple[str, ...]]:
        """Every address of host ``name`` (by ``prefer``); raises when DNS does not answer."""

        async def lookup() -> tuple[str, ...]:
            result = await self._host(normalise_domain(name))
            if isinstance(result, Exception):
                raise result
            return result[0]

        return defer.ensureDeferred(lookup())

    def route_host(self, name: str, port: int | None = None) -> defer.Deferred[Route]:
        """The route to one host's own A/AAAA addresses, no MX lookup (Postfix's ``[host]``)."""
        d = defer.ensureDeferred(self._host(normalise_domain(name)))

        def hops(result: tuple[tuple[str, ...], list[int]] | Exception) -> Route:
            if isinstance(result, Exception):
                raise result
            addresses, _ = result
            if not addresses:
                raise PermanentFailure(Reply(550, "5.4.4", f"host {name} has no address"))
            return self._route(
                (Exchange(0, name, addresses),), port if port is not None else self.port
            )

        return d.addCallback(hops)

    def exchanges(self, domain: str) -> defer.Deferred[tuple[Exchange, ...]]:
        """The MX hosts of ``domain`` with their addresses, in order; cached per TTL.

        Concurrent calls for one domain (the recipients of one message) share one DNS lookup.
        """
        domain = normalise_domain(domain)
        literal = address_literal(domain)
        if literal is not None:
            return defer.succeed((Exchange(0, literal, (literal,)),))
        now = self.clock.seconds()
        cached = self._cache.get(domain)
        if cached is not None and cached.expires > now:
            if cached.failure is not None:
                return defer.fail(cached.failure)
            return defer.succeed(self._ordered(domain, cached.exchanges))
        waiter: defer.Deferred[tuple[Exchange, ...]] = defer.Deferred()
        waiters = self._inflight.get(domain)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._inflight[domain] = [waiter]
        d = defer.ensureDeferred(self._resolve(domain))
        d.addBoth(self._resolved, domain)
        return waiter

    def _resolved(self, result: _Resolved | Failure, domain: str) -> None:
        waiters = self._inflight.pop(domain, [])
        if isinstance(result, _Resolved):
            self._cache[domain] = result
            bound_cache(self._cache, lambda v: v.expires <= self.clock.seconds())
            if result.failure is not None:
                result = Failure(result.failure)
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(self._ordered(domain, result.exchanges))

    def _ordered(self, domain: str, exchanges: tuple[Exchange, ...]) -> tuple[Exchange, ...]:
        """Preference order; hosts of equal preference in random order.

        The order is drawn afresh for each delivery attempt, but kept for ``SHUFFLE_WINDOW``
        seconds so that the recipients of one message, routed together, share one destination
        (and one connection) instead of being split by the dice.
        """
        now = self.clock.seconds()
        memo = self._orders.get(domain)
        if memo is not None and memo[0] == exchanges and now - memo[1] < SHUFFLE_WINDOW:
            return memo[2]
        keyed = [(x.preference, self.random.random(), x) for x in exchanges]
        keyed.sort(key=lambda t: (t[0], t[1]))
        ordered = tuple(x for _, _, x in keyed)
        self._orders[domain] = (exchanges, now, ordered)
        bound_cache(self._orders, lambda v: now - v[1] >= SHUFFLE_WINDOW)
        return ordered

    def _route(self, exchanges: tuple[Exchange, ...], port: int) -> Route:
        memo = self._routes.get(port)
        if memo is not None and memo[0] is exchanges:  # the same order as last time: same Route
            return memo[1]
        route = self._build_route(exchanges, port)
        self._routes[port] = (exchanges, route)
        return route

    def _build_route(self, exchanges: tuple[Exchange, ...], port: int) -> Route:
        hops: list[NextHop] = []
        seen: set[str] = set()
        for x in exchanges:
            for address in x.addresses:
                if address in seen:
                    continue
                seen.add(address)
                hops.append(NextHop(address, port, x.preference, x.name))
        return Route(tuple(hops[: self.max_hosts]), tls=self.tls, source=self.source)

    def _ttl(self, ttls: Sequence[int]) -> float:
        ttl = float(min(ttls)) if ttls else self.negative_ttl
        return min(max(ttl, self.min_ttl), self.max_ttl)

    async def _resolve(self, domain: str) -> _Resolved:
        now = self.clock.seconds()
        try:
            records, ttls = await self._lookup(domain, dns.MX)
        except dnserror.DNSNameError:
            return _Resolved(
                failure=PermanentFailure(
                    Reply(550, "5.1.2", f"domain {domain} does not exist (NXDOMAIN)")
                ),
                expires=now + self.negative_ttl,
            )
        mxs = [(mx_record(r).preference, name_text(mx_record(r).name)) for r in records]
        if any(name in ("", ".") for _, name in mxs):
            # RFC 7505: a null MX says the domain accepts no mail; never fall back to A/AAAA.
            return _Resolved(
                failure=PermanentFailure(
                    Reply(556, "5.1.10", f"domain {domain} accepts no mail (null MX)")
                ),
                expires=now + self._ttl(ttls),
            )
        implicit = not mxs
        if implicit:
            mxs = [(0, domain)]
        try:
            results = await defer.gatherResults(
                [defer.ensureDeferred(self._host(name)) for _, name in mxs], consumeErrors=True
            )
        except defer.FirstError as e:
            e.subFailure.raiseException()
        exchanges = []
        temporary_errors = []
        for (pref, name), result in zip(mxs, results, strict=True):
            if isinstance(result, Exception):
                temporary_errors.append(result)
                continue
            addresses, host_ttls = result
            if addresses:
                exchanges.append(Exchange(pref, name, addresses))
                ttls = [*ttls, *host_ttls]
        if exchanges:
            return _Resolved(tuple(exchanges), expires=now + self._ttl(ttls))
        if temporary_errors:
            raise temporary_errors[0]
        what = (
            f"{domain} has no MX and no address"
            if implicit
            else f"no MX host of {domain} has an address"
        )
        return _Resolved(
            failure=PermanentFailure(Reply(550, "5.4.4", what)), expires=now + self.negative_ttl
        )

    async def _host(self, name: str) -> tuple[tuple[str, ...], list[int]] | Exception:
        """All A and AAAA addresses of one MX host; the (temporary) error when DNS would not say.

        The error is returned, not raised, so that one MX host's trouble does not hide the others.
        """
        literal = address_literal(f"[{name}]")
        if literal is not None:  # an MX pointing at an address (RFC-forbidden, seen in the wild)
            return (literal,), []
        lookups = [self._lookup(name, dns.A), self._lookup(name, dns.AAAA)]
        if self.prefer == "ipv6":
            lookups.reverse()
        results: list[tuple[bool, Any]] = await defer.DeferredList(
            [defer.ensureDeferred(c) for c in lookups], consumeErrors=True
        )
        addresses: list[str] = []
        ttls: list[int] = []
        failures: list[Exception] = []
        for ok, result in results:
            if ok:
                records, rttls = result
                addresses.extend(address_of(r) for r in records)
                ttls.extend(rttls)
            elif not result.check(dnserror.DNSNameError):
                failures.append(result.value)
        if not addresses and failures:
            return failures[0]
        return tuple(addresses), ttls

    async def _lookup(self, name: str, qtype: int) -> tuple[list[dns.RRHeader], list[int]]:
        """Records of ``qtype`` for ``name``, following CNAMEs; DNS errors mapped to ours.

        Raises ``DNSNameError`` for NXDOMAIN, ``TemporaryFailure`` for anything that may pass.
        """
        method = {
            dns.MX: self.resolver.lookupMailExchange,
            dns.A: self.resolver.lookupAddress,
            dns.AAAA: self.resolver.lookupIPV6Address,
            dns.TXT: self.resolver.lookupText,
        }[qtype]
        ttls: list[int] = []
        target = name
        for _ in range(MAX_CNAME_DEPTH):
            try:
                answers, _authority, _additional = await method(target)
            except dnserror.DNSNameError:
                raise
            except (
                dnserror.DNSServerError,
                dnserror.DNSQueryRefusedError,
                dnserror.DNSFormatError,
                dnserror.DNSNotImplementedError,
                dnserror.DNSUnknownError,
                defer.TimeoutError,
            ) as e:
                raise temporary(name, describe_error(e)) from None
            except OSError as e:
                raise temporary(name, str(e)) from None
            names = {target}
            found = []
            cname = None
            # Walk the answer's CNAME chain from ``target``: the records of the last name count.
            progressed = True
            while progressed:
                progressed = False
                for r in answers:
                    if r.type == dns.CNAME and name_text(r.name) in names:
                        nxt = name_text(r.payload.name)
                        if nxt not in names:
                            names.add(nxt)
                            cname = nxt
                            ttls.append(r.ttl)
                            progressed = True
            for r in answers:
                if r.type == qtype and name_text(r.name) in names:
                    found.append(r)
                    ttls.append(r.ttl)
            if found or cname is None:
                return found, ttls
            target = cname  # the chain leaves the answer: ask for the CNAME's target
        raise temporary(name, "CNAME chain too long")

    @classmethod
    def from_options(cls, options: Mapping[str, Any], context: RouterContext) -> MXRouter:
        """The ``IRouterFactory`` registered as ``mx``.

        Options: ``nameservers`` (``host:port``, default port 53; default: the system's
        /etc/resolv.conf), ``port``, ``domains``, ``max_hosts``, ``prefer``, ``tls``, ``source``,
        ``timeout`` (per DNS query), ``min_ttl``, ``max_ttl``, ``negative_ttl``; ``mta_sts``,
        ``mta_sts_port``, ``mta_sts_ca_file``, ``mta_sts_timeout``.
        """
        s = context.options(options)
        nameservers = s.get_list("nameservers", (), lambda v: parse_hostport(v, 53))
        timeout = s.get("timeout", 5.0, parse_duration)
        router_options: dict[str, Any] = dict(
            port=s.get("port", 25, _port),
            domains=s.get_list("domains", ("*",), parse_domain_pattern),
            max_hosts=s.get("max_hosts", 10, _positive),
            prefer=s.get("prefer", "ipv4", _family),
            tls=s.get("tls", TLSPolicy.MAY, parse_tls),
            source=s.get("source", None, types=str),
            min_ttl=s.get("min_ttl", 0.0, parse_duration),
            max_ttl=s.get("max_ttl", 3600.0, parse_duration),
            negative_ttl=s.get("negative_ttl", 60.0, parse_duration),
        )
        mta_sts = s.get("mta_sts", False, types=bool)
        sts_port = s.get("mta_sts_port", 443, _port)
        sts_ca_file = s.get("mta_sts_ca_file", None, ca_file_option)
        sts_timeout = s.get("mta_sts_timeout", 10.0, parse_duration)
        if sts_timeout <= 0:
            raise s.error("mta_sts_timeout", "must be more than 0")
        s.check_unknown()
        resolver = context.resolver
        if resolver is None:
            resolver = make_resolver(nameservers, context.reactor, timeout)
        router = cls(resolver, context.reactor, random=context.random, **router_options)
        if mta_sts:
            fetch = HTTPSFetcher(
                context.reactor,
                router.addresses,
                port=sts_port,
                ca_file=sts_ca_file,
                timeout=sts_timeout,
            )
            router.mta_sts = PolicyCache(
                context.reactor, router.txt, fetch, negative_ttl=router_options["negative_ttl"]
            )
        return router


def _port(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        raise ValueError(f"port must be 1-65535, not {v!r}")
    return v


def _positive(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"must be a whole number of at least 1, not {v!r}")
    return v


def _family(v: object) -> str:
    if v not in ("ipv4", "ipv6"):
        raise ValueError(f"{v!r}: must be 'ipv4' or 'ipv6'")
    return str(v)
