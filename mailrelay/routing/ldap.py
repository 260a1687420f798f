"""The LDAP router: LDAP mail routing (sendmail's, RFC draft "inetLocalMailRecipient").

For a recipient, look up the entry whose ``mailLocalAddress`` is the address, then (if allowed)
the ``@domain`` catch-all. ``mailRoutingAddress`` rewrites the recipient; ``mailHost`` is the next
hop: ``[host]`` (brackets) is dialled as it is, a plain name is routed on by its MX records (or by
the domain of the rewritten address when there is no ``mailHost``). An entry with neither attribute
answers ``None``: the user exists, the rest of the chain routes the address unchanged.

ldap3 is blocking: every directory call runs in ``RouterContext.threadpool``, never on the reactor.
The directory being down is a ``TemporaryFailure`` (the mail waits, it is never bounced for it).
Answers are cached (positive and negative) for a TTL on the injected clock.

``[[routes]] type = "ldap"`` options::

    uri = "ldap://127.0.0.1:389"      # or a list: tried in order (ldaps:// for implicit TLS)
    bind_dn = "cn=mailrelay,ou=services,dc=example,dc=test"
    bind_password = "secret"
    base = "dc=example,dc=test"
    filter = "(&(objectClass=inetLocalMailRecipient)(mailLocalAddress={address}))"
    routing_attribute = "mailRoutingAddress"
    host_attribute = "mailHost"
    catch_all = true                  # then look up "@domain"
    domains = ["*"]                   # which recipient domains this router answers for
    missing = "pass"                  # no entry: "pass" (next router) or "reject" (550 5.1.1)
    port = 25                         # SMTP port of mailHost next hops
    starttls = false                  # StartTLS on ldap:// URIs
    tls_ca_file = "/path/ca.pem"      # verify the server's certificate against this CA
    timeout = "5s"                    # connect and per-operation timeout
    positive_ttl = "5m"
    negative_ttl = "1m"
    nameservers = ["127.0.0.1:53"]    # for mailHost / rewritten domains: as the mx router
    tls = "may"                       # TLS policy of the routes it gives
"""

from __future__ import annotations

import ipaddress
import math
import ssl
import string
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay import _ascii
from mailrelay.address import split
from mailrelay.config import parse_duration, parse_hostport
from mailrelay.envelope import Envelope, NextHop, Reply, Route, TLSPolicy
from mailrelay.errors import PermanentFailure, TemporaryFailure
from mailrelay.interfaces import IRouter
from mailrelay.routing.context import RouterContext
from mailrelay.routing.dns import make_resolver
from mailrelay.routing.mx import MXRouter, bound_cache
from mailrelay.routing.static import DomainSet, parse_domain_pattern, parse_tls
from mailrelay.tls_trust import ca_file_option

log = Logger()

DEFAULT_FILTER = "(&(objectClass=inetLocalMailRecipient)(mailLocalAddress={address}))"
_FILTER_FIELDS = frozenset({"address", "local", "domain"})

Entry = Mapping[str, Sequence[str]]


class DirectoryUnavailable(Exception):
    """The directory could not be asked (down, refused the bind, timed out)."""


def escape_filter_value(value: str) -> str:
    """RFC 4515 escaping of an assertion value: ``* ( ) \\ NUL`` can never change the filter."""
    out = []
    for ch in value:
        if ch in "*()\\\x00":
            out.append(f"\\{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def make_filter(template: str, address: str) -> str:
    """The search filter for ``address`` (``local@domain`` or the catch-all ``@domain``)."""
    local, _, domain = address.rpartition("@")
    return template.format(
        address=escape_filter_value(address),
        local=escape_filter_value(local),
        domain=escape_filter_value(domain),
    )


def parse_filter_template(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("(") or not value.endswith(")"):
        raise ValueError(
            "must be an LDAP filter in parentheses, e.g. '(mailLocalAddress={address})'"
        )
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
    except ValueError as e:
        raise ValueError(f"{value!r}: {e}") from None
    unknown = fields - _FILTER_FIELDS
    if unknown:
        raise ValueError(
            f"{value!r}: unknown field {sorted(unknown)[0]!r} (known: address, domain, local)"
        )
    if not fields:
        raise ValueError(f"{value!r}: must use {{address}} (or {{local}} and {{domain}})")
    return value


class Directory(Protocol):
    """What the router asks of a directory; ``search`` blocks (it runs in a thread)."""

    def search(self, address: str) -> list[Entry]:
        """Entries matching ``address``; raises ``DirectoryUnavailable`` when it cannot tell."""
        ...


class LDAPDirectory:
    """Blocking ldap3 searches over a small pool of bound connections, reconnecting on failure.

    Thread-safe: each search takes an idle connection (or opens and binds a new one); a connection
    that failed is dropped and the search is tried once more on a fresh one, so a restarted server
    costs no failure.
    """

    def __init__(
        self,
        uris: Sequence[str],
        base: str,
        bind_dn: str | None = None,
        bind_password: str | None = None,
        *,
        filter_template: str = DEFAULT_FILTER,
        attributes: Sequence[str] = ("mailRoutingAddress", "mailHost"),
        starttls: bool = False,
        tls_ca_file: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        import ldap3

        self._ldap3 = ldap3
        tls = None
        if tls_ca_file or starttls or any(u.lower().startswith("ldaps:") for u in uris):
            tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=tls_ca_file)
        # ldap3 takes "ldap://host:port" only: no trailing slash (a DN part is not supported)
        # ldap3 packs its timeouts into socket options as whole seconds
        self.timeout = max(1, math.ceil(timeout))
        self.uris = [u.rstrip("/") for u in uris]
        self.tls = tls
        self.base, self.bind_dn, self.bind_password = base, bind_dn, bind_password
        self.filter_template = filter_template
        self.attributes = list(attributes)
        self.starttls = starttls
        self._idle: list[Any] = []
        self._lock = threading.Lock()

    def _open(self) -> Any:
        """A bound connection to the first server that answers (servers in configured order)."""
        ldap3 = self._ldap3
        errors = []
        for uri in self.uris:
            # a fresh Server each time: ldap3 remembers an address that failed as unusable
            server = ldap3.Server(
                uri, get_info=ldap3.NONE, connect_timeout=self.timeout, tls=self.tls
            )
            conn = ldap3.Connection(
                server,
                user=self.bind_dn,
                password=self.bind_password,
                receive_timeout=self.timeout,
                read_only=True,
                raise_exceptions=True,
                auto_escape=False,
            )
            try:
                conn.open()
                if self.starttls:
                    conn.start_tls()
                conn.bind()
                return conn
            except ldap3.core.exceptions.LDAPInvalidCredentialsResult:
                _close(conn)
                raise
            except (ldap3.core.exceptions.LDAPException, OSError) as e:
                _close(conn)
                errors.append(f"{uri}: {type(e).__name__}: {e}")
        raise DirectoryUnavailable("; ".join(errors))

    def search(self, address: str) -> list[Entry]:
        ldap3 = self._ldap3
        query = make_filter(self.filter_template, address)
        for attempt in (1, 2):
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            try:
                if conn is None:
                    conn = self._open()
                conn.search(
                    self.base, query, search_scope=ldap3.SUBTREE, attributes=self.attributes
                )
                # raw values: without the schema ldap3 cannot tell single- from multi-valued
                entries: list[Entry] = [
                    {
                        name: [v.decode("utf-8", "replace") for v in values]
                        for name, values in e["raw_attributes"].items()
                    }
                    for e in conn.response
                    if e.get("type") == "searchResEntry"
                ]
            except ldap3.core.exceptions.LDAPNoSuchObjectResult:
                # the base itself is not there (or not visible to this bind): a configuration or
                # access problem, never "no such user" — that would refuse every recipient
                with self._lock:
                    self._idle.append(conn)
                raise DirectoryUnavailable(
                    f"search base {self.base!r} not found (wrong base or bind?)"
                ) from None
            except DirectoryUnavailable:
                raise
            except (ldap3.core.exceptions.LDAPException, OSError) as e:
                _close(conn)
                if attempt == 2 or isinstance(
                    e, ldap3.core.exceptions.LDAPInvalidCredentialsResult
                ):
                    raise DirectoryUnavailable(f"{type(e).__name__}: {e}") from None
                continue
            with self._lock:
                self._idle.append(conn)
            return entries
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            _close(conn)


def _close(conn: Any) -> None:
    if conn is None:
        return
    try:
        conn.unbind()
    except Exception:  # noqa: BLE001 - it is being thrown away anyway
        pass


@attrs.frozen
class _Found:
    """The routing attributes of one entry (or ``exists=False``: no entry)."""

    exists: bool
    routing_address: str | None = None
    mail_host: str | None = None


@implementer(IRouter)
class LDAPRouter:
    """Routes by directory entries; see the module doc.

    ``directory.search`` is called through ``run_blocking`` (``deferToThreadPool`` on the
    context's thread pool); ``next_hop`` routes a host name or domain on (an ``MXRouter``).
    """

    def __init__(
        self,
        directory: Directory,
        clock: IReactorTime,
        run_blocking: Callable[..., defer.Deferred[Any]],
        next_hop: MXRouter | None,
        *,
        domains: Sequence[str] = ("*",),
        catch_all: bool = True,
        missing: str = "pass",
        port: int = 25,
        routing_attribute: str = "mailRoutingAddress",
        host_attribute: str = "mailHost",
        tls: TLSPolicy = TLSPolicy.MAY,
        positive_ttl: float = 300.0,
        negative_ttl: float = 60.0,
    ) -> None:
        if missing not in ("pass", "reject"):
            raise ValueError("missing must be 'pass' or 'reject'")
        self.directory = directory
        self.clock = clock
        self.run_blocking = run_blocking
        self.next_hop = next_hop
        self.domains = tuple(parse_domain_pattern(d) for d in domains)
        self.matches = DomainSet(self.domains)
        self.catch_all = catch_all
        self.missing = missing
        self.port = port
        self.routing_attribute, self.host_attribute = (
            routing_attribute.lower(),
            host_attribute.lower(),
        )
        self.tls = tls
        self.positive_ttl, self.negative_ttl = positive_ttl, negative_ttl
        self._cache: dict[str, tuple[_Found, float]] = {}
        self._inflight: dict[str, list[defer.Deferred[_Found]]] = {}

    def __repr__(self) -> str:
        return f"LDAPRouter(domains={list(self.domains)!r}, missing={self.missing!r})"

    def route(
        self, recipient: str, envelope: Envelope | None
    ) -> defer.Deferred[Route | None] | None:
        local, domain = split(recipient)
        if not domain or not self.matches(domain):
            return None
        return defer.ensureDeferred(self._route(f"{local}@{domain}"))

    async def _route(self, address: str) -> Route | None:
        found = await self._find(address)
        if not found.exists:
            if self.missing == "reject":
                raise PermanentFailure(Reply(550, "5.1.1", f"<{address}>: no such user here"))
            return None
        if found.routing_address is None and found.mail_host is None:
            return None
        rewritten = found.routing_address
        if found.mail_host is not None:
            route = await self._to_host(found.mail_host)
        else:
            assert rewritten is not None
            route = await self._to_domain(split(rewritten)[1])
        return attrs.evolve(route, recipient=rewritten)

    def _find(self, address: str) -> defer.Deferred[_Found]:
        """The entry for ``address``, else for ``@domain``; from the cache while it is fresh.

        Concurrent questions about one address (a message's retries, RCPT and the queue) share
        one directory lookup.
        """
        key = _ascii.lower(address)  # str.lower() would fold a look-alike onto a cached answer
        cached = self._cache.get(key)
        if cached is not None and cached[1] > self.clock.seconds():
            return defer.succeed(cached[0])
        waiter: defer.Deferred[_Found] = defer.Deferred()
        if key in self._inflight:
            self._inflight[key].append(waiter)
            return waiter
        self._inflight[key] = [waiter]
        defer.ensureDeferred(self._lookup(address)).addBoth(self._found, key)
        return waiter

    async def _lookup(self, address: str) -> _Found:
        found = await self._search(address)
        if not found.exists and self.catch_all:
            found = await self._search("@" + split(address)[1])
        return found

    def _found(self, result: _Found | Failure, key: str) -> None:
        if isinstance(result, _Found):
            ttl = self.positive_ttl if result.exists else self.negative_ttl
            self._cache[key] = (result, self.clock.seconds() + ttl)
            bound_cache(self._cache, lambda v: v[1] <= self.clock.seconds())
        for waiter in self._inflight.pop(key, []):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _search(self, address: str) -> _Found:
        try:
            entries = await self.run_blocking(self.directory.search, address)
        except DirectoryUnavailable as e:
            log.warn("LDAP lookup of {address} failed: {error}", address=address, error=str(e))
            raise TemporaryFailure(
                Reply(451, "4.4.3", "directory unavailable; will retry")
            ) from None
        if not entries:
            return _Found(False)
        if len(entries) > 1:
            raise TemporaryFailure(Reply(451, "4.3.0", f"<{address}>: ambiguous directory entry"))
        attributes = {name.lower(): values for name, values in entries[0].items()}
        return _Found(
            True,
            _first(attributes.get(self.routing_attribute)),
            _first(attributes.get(self.host_attribute)),
        )

    async def _to_host(self, mail_host: str) -> Route:
        host = mail_host.strip().rstrip(".")
        bracketed = host.startswith("[") and host.endswith("]")
        if bracketed:  # [host]: no MX lookup, the host's own addresses
            host = host[1:-1]
            if host.lower().startswith("ipv6:"):
                host = host[5:]
        if _is_ip(host) or self.next_hop is None:
            return Route((NextHop(host, self.port, 0, host),), tls=self.tls)
        if bracketed:
            route = await self.next_hop.route_host(host, self.port)
        else:
            route = await self.next_hop.route_domain(host, self.port)
        return attrs.evolve(route, tls=self.tls)

    async def _to_domain(self, domain: str) -> Route:
        if self.next_hop is None:
            raise PermanentFailure(
                Reply(550, "5.4.4", f"no mail host for {domain} and no MX routing")
            )
        route = await self.next_hop.route_domain(domain)
        return attrs.evolve(route, tls=self.tls)

    def close(self) -> defer.Deferred[None]:
        """Unbind the pooled directory connections (in the thread pool: unbind blocks)."""
        close = getattr(self.directory, "close", None)
        if close is None:
            return defer.succeed(None)
        return self.run_blocking(close)

    @classmethod
    def from_options(cls, options: Mapping[str, Any], context: RouterContext) -> LDAPRouter:
        """The ``IRouterFactory`` registered as ``ldap``."""
        s = context.options(options)
        uris = _uris(s)
        base = s.get("base", "", types=str)
        if not base:
            raise s.error("base", "missing: the search base, e.g. 'dc=example,dc=test'")
        bind_dn = s.get("bind_dn", None, types=str)
        bind_password = s.get("bind_password", None, types=str)
        if bind_dn and bind_password is None:
            raise s.error("bind_password", "missing: bind_dn needs a bind_password")
        filter_template = s.get("filter", DEFAULT_FILTER, parse_filter_template)
        routing_attribute = s.get("routing_attribute", "mailRoutingAddress", types=str)
        host_attribute = s.get("host_attribute", "mailHost", types=str)
        timeout = s.get("timeout", 5.0, parse_duration)
        starttls = s.get("starttls", False, types=bool)
        tls_ca_file = s.get(
            "tls_ca_file", None, ca_file_option
        )  # read now, not at the first connection
        nameservers = s.get_list("nameservers", (), _nameserver)
        port = s.get("port", 25, _port)
        router_options: dict[str, Any] = dict(
            domains=s.get_list("domains", ("*",), parse_domain_pattern),
            catch_all=s.get("catch_all", True, types=bool),
            missing=s.get("missing", "pass", _missing),
            port=port,
            routing_attribute=routing_attribute,
            host_attribute=host_attribute,
            tls=s.get("tls", TLSPolicy.MAY, parse_tls),
            positive_ttl=s.get("positive_ttl", 300.0, parse_duration),
            negative_ttl=s.get("negative_ttl", 60.0, parse_duration),
        )
        s.check_unknown()
        if context.threadpool is None:
            raise s.error("uri", "the ldap router needs a thread pool (RouterContext.threadpool)")
        directory = LDAPDirectory(
            uris,
            base,
            bind_dn,
            bind_password,
            filter_template=filter_template,
            attributes=(routing_attribute, host_attribute),
            starttls=starttls,
            tls_ca_file=tls_ca_file,
            timeout=timeout,
        )
        resolver = context.resolver or make_resolver(nameservers, context.reactor)
        next_hop = MXRouter(resolver, context.reactor, port=port, random=context.random)
        threadpool, reactor = context.threadpool, context.reactor

        def run_blocking(f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
            # a context that has a thread pool has a real reactor, not only a clock
            return deferToThreadPool(cast(IReactorFromThreads, reactor), threadpool, f, *args)

        return cls(directory, context.reactor, run_blocking, next_hop, **router_options)


def _first(values: Sequence[str] | None) -> str | None:
    for v in values or ():
        v = v.strip()
        if v:
            return v
    return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _uris(s: Any) -> tuple[str, ...]:
    raw = s.table.get("uri")
    if isinstance(raw, str):
        uris = (s.get("uri", "", _uri),)
    else:
        uris = s.get_list("uri", (), _uri)
    if not uris:
        raise s.error("uri", "missing: e.g. 'ldap://127.0.0.1:389' (or a list of them)")
    return uris


def _uri(v: object) -> str:
    if not isinstance(v, str) or not v.lower().startswith(("ldap://", "ldaps://")):
        raise ValueError(f"{v!r} is not an ldap:// or ldaps:// URI")
    return v


def _nameserver(v: object) -> tuple[str, int]:
    return parse_hostport(v, 53)


def _port(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        raise ValueError(f"port must be 1-65535, not {v!r}")
    return v


def _missing(v: object) -> str:
    if v not in ("pass", "reject"):
        raise ValueError(f"{v!r}: must be 'pass' (ask the next router) or 'reject' (550 5.1.1)")
    return str(v)
