"""MTA-STS (RFC 8461): a recipient domain's published demand for verified TLS to listed MX hosts.

Discovery: the TXT record ``_mta-sts.<domain>`` (``v=STSv1; id=...``) says a policy exists and
names its version; the policy itself is fetched from ``https://mta-sts.<domain>/.well-known/
mta-sts.txt`` with treq, over HTTPS whose certificate must be valid for that name (no redirects,
at most 64 KiB, a timeout). The policy is cached for its ``max_age`` on the injected clock and
fetched again only when the TXT ``id`` changes (or an ``enforce`` policy refused every MX host,
in case the domain has fixed it since). A fetch that fails keeps the cached policy while it has
not expired; no policy at all means ordinary opportunistic delivery (RFC 8461 section 5).

Every name is resolved by the MX router's own resolver (never the system's): the HTTPS
connection goes to the address that resolver found, and TLS checks the policy host's name.
What the router does with a policy is in ``mx.MXRouter``; reporting (TLSRPT, RFC 8460) is not done.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import treq
from twisted.internet import defer, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import error as dnserror
from twisted.python.failure import Failure
from twisted.web.client import Agent
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from mailrelay import _ascii
from mailrelay._quiet import QuietEndpoint
from mailrelay.errors import TemporaryFailure
from mailrelay.tls_trust import platform_and

log = Logger()

MAX_AGE_LIMIT = 31557600  # RFC 8461 section 3.2: about one year
MAX_POLICY_SIZE = 64 * 1024  # RFC 8461 section 3.3 suggests 64 KiB
CACHE_LIMIT = 10000
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


class Mode(enum.StrEnum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


class PolicyError(ValueError):
    """A policy (or its fetch) that cannot be used: the domain is treated as having none."""


@attrs.frozen
class Policy:
    """One fetched policy; ``id`` is the TXT record's, which names this version."""

    id: str
    mode: Mode
    mx: tuple[str, ...]
    max_age: int

    def allows(self, host: str) -> bool:
        """Whether MX host ``host`` matches one of the policy's ``mx`` patterns."""
        return any(mx_matches(p, host) for p in self.mx)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 section 4.1: exact (case-insensitive) or ``*.`` standing for exactly one label."""
    pattern, host = _ascii.lower(pattern).rstrip("."), _ascii.lower(host).rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label and dot) and rest == pattern[2:]
    return host == pattern


def parse_record(texts: Sequence[str]) -> str | None:
    """The policy id in the TXT records of ``_mta-sts.<domain>``; None unless one only is STSv1.

    RFC 8461 section 3.1: records that do not begin with ``v=STSv1;`` are ignored; not exactly one
    left, or one that is invalid, means the domain has no policy.
    """
    records = [t for t in texts if t.startswith("v=STSv1;")]
    if len(records) != 1:
        return None
    fields = [f.strip(" \t") for f in records[0].split(";")][1:]
    if fields and fields[-1] == "":
        fields.pop()  # a trailing delimiter is allowed
    ids = []
    for field in fields:
        name, eq, value = field.partition("=")
        if name == "id":
            if not _ID.fullmatch(value):
                return None
            ids.append(value)
        elif not (eq and _EXT_NAME.fullmatch(name) and _EXT_VALUE.fullmatch(value)):
            return None
    return ids[0] if len(ids) == 1 else None


def parse_policy(body: bytes | str, policy_id: str) -> Policy:
    """Parse a policy file (RFC 8461 section 3.2): ``key: value`` lines, CRLF or LF.

    Unknown keys are ignored; of a key given twice (``mx`` aside) the first counts.
    """
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError("policy is not UTF-8") from None
    fields: dict[str, str] = {}
    mx: list[str] = []
    for raw in body.replace("\r\n", "\n").split("\n"):
        if not _ascii.strip(raw):
            continue
        key, colon, value = raw.partition(":")
        key, value = _ascii.strip(key), _ascii.strip(value)
        if not colon or not _EXT_NAME.fullmatch(key):
            raise PolicyError(f"malformed policy line {raw[:80]!r}")
        if key == "mx":
            mx.append(_mx_pattern(value))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError(f"version must be STSv1, not {fields.get('version')!r}")
    try:
        mode = Mode(fields.get("mode", ""))
    except ValueError:
        raise PolicyError(
            f"mode must be enforce, testing or none, not {fields.get('mode')!r}"
        ) from None
    age = fields.get("max_age", "")
    max_age = _ascii.number(age, 10)
    if max_age is None or max_age > MAX_AGE_LIMIT:
        raise PolicyError(f"max_age must be 0-{MAX_AGE_LIMIT} seconds, not {age!r}")
    if not mx and mode is not Mode.NONE:
        raise PolicyError(f"a policy in mode {mode} must list mx patterns")
    return Policy(policy_id, mode, tuple(mx), max_age)


def _mx_pattern(value: str) -> str:
    name = _ascii.lower(value).rstrip(".")  # str.lower() folds U+212A (Kelvin) to "k"
    labels = name[2:].split(".") if name.startswith("*.") else name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise PolicyError(f"invalid mx pattern {value!r}")
    return name


@attrs.define
class _State:
    """What is known of a domain: its TXT id (until ``txt_expires``), its policy, a failed fetch."""

    txt_id: str | None = None
    txt_expires: float = 0.0
    policy: Policy | None = None
    policy_expires: float = 0.0
    failed_until: float = 0.0
    recheck: bool = False


TxtLookup = Callable[[str], Awaitable[tuple[tuple[str, ...], float]]]
Fetch = Callable[[str], Awaitable[bytes]]


def _discovery_failed(failure: Failure, domain: str) -> None:
    """A discovery that failed unexpectedly: logged, and the domain treated as having no policy."""
    log.failure("MTA-STS discovery for {domain} failed", failure, domain=domain)


class PolicyCache:
    """The policy in force for a domain: TXT discovery, fetch, cache (RFC 8461 sections 3 and 5).

    ``txt(name)`` gives that name's TXT strings and their TTL (``DNSNameError`` for NXDOMAIN,
    ``TemporaryFailure`` when DNS does not answer); ``fetch(domain)`` the policy file's bytes.
    A fetch that failed is not tried again for ``retry_after`` seconds, so that a policy host
    that is down does not slow every routing decision down by its timeout.
    """

    def __init__(
        self,
        clock: IReactorTime,
        txt: TxtLookup,
        fetch: Fetch,
        *,
        negative_ttl: float = 60.0,
        retry_after: float = 60.0,
    ) -> None:
        self.clock, self.txt, self.fetch = clock, txt, fetch
        self.negative_ttl, self.retry_after = negative_ttl, retry_after
        self._state: dict[str, _State] = {}
        self._inflight: dict[str, list[defer.Deferred[Policy | None]]] = {}

    def policy(self, domain: str) -> defer.Deferred[Policy | None]:
        """The policy to apply to mail for ``domain`` now (None: none); never fails."""
        now = self.clock.seconds()
        st = self._state.get(domain)
        if st is not None and st.txt_expires > now and not st.recheck:
            if st.policy is not None and st.policy_expires <= now:
                st.policy = None
            if (
                st.txt_id is None
                or (st.policy is not None and st.policy.id == st.txt_id)
                or st.failed_until > now
            ):
                return defer.succeed(st.policy)
        waiter: defer.Deferred[Policy | None] = defer.Deferred()
        waiters = self._inflight.get(domain)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._inflight[domain] = [waiter]
        d = defer.ensureDeferred(self._discover(domain))
        d.addErrback(_discovery_failed, domain)
        d.addCallback(self._done, domain)
        return waiter

    def recheck(self, domain: str) -> None:
        """Fetch ``domain``'s policy again next time, even with an unchanged id.

        RFC 8461 section 5.1: before mail fails for an ``enforce`` policy, look for a newer one.
        """
        st = self._state.get(domain)
        if st is not None:
            st.recheck = True
            st.txt_expires = 0.0
            st.failed_until = 0.0

    def _done(self, policy: Policy | None, domain: str) -> None:
        for waiter in self._inflight.pop(domain, []):
            waiter.callback(policy)

    async def _discover(self, domain: str) -> Policy | None:
        now = self.clock.seconds()
        st = self._state.get(domain)
        if st is None:
            st = self._state[domain] = _State()
            self._bound(now)
        if st.policy is not None and st.policy_expires <= now:
            st.policy = None
        if st.txt_expires <= now:
            try:
                texts, ttl = await self.txt(f"_mta-sts.{domain}")
                st.txt_id, st.txt_expires = parse_record(texts), now + ttl
            except dnserror.DNSNameError:
                st.txt_id, st.txt_expires = None, now + self.negative_ttl
            except TemporaryFailure as e:
                log.warn(
                    "MTA-STS: TXT lookup for {domain} failed ({reply}); "
                    "using the cached policy: {policy}",
                    domain=domain,
                    reply=str(e.reply),
                    policy=_describe(st.policy),
                )
                return st.policy
        if st.txt_id is None:
            # No (valid) record: a cached policy stays in force until it expires (section 5.1);
            # a domain withdraws its policy by publishing mode "none" (section 8.3).
            return st.policy
        if st.policy is not None and st.policy.id == st.txt_id and not st.recheck:
            return st.policy
        if st.failed_until > now and not st.recheck:
            return st.policy
        st.recheck = False
        try:
            policy = parse_policy(await self.fetch(domain), st.txt_id)
        except Exception as e:  # any failure of the fetch: keep what we had (section 5.1)
            st.failed_until = self.clock.seconds() + self.retry_after
            log.warn(
                "MTA-STS: policy of {domain} (id {id}) not fetched: {why}; "
                "using the cached policy: {policy}",
                domain=domain,
                id=st.txt_id,
                why=_reason(e),
                policy=_describe(st.policy),
            )
            return st.policy
        st.policy, st.policy_expires, st.failed_until = (
            policy,
            self.clock.seconds() + policy.max_age,
            0.0,
        )
        log.info("MTA-STS: policy of {domain}: {policy}", domain=domain, policy=_describe(policy))
        return policy

    def _bound(self, now: float) -> None:
        if len(self._state) <= CACHE_LIMIT:
            return
        for key in [
            k for k, v in self._state.items() if v.txt_expires <= now and v.policy_expires <= now
        ]:
            del self._state[key]
        if len(self._state) > CACHE_LIMIT:
            for key in list(self._state)[: len(self._state) // 2]:
                del self._state[key]


def _describe(policy: Policy | None) -> str:
    if policy is None:
        return "none"
    mx = ", ".join(policy.mx) or "-"
    return f"id {policy.id}, mode {policy.mode}, mx {mx}, max_age {policy.max_age}"


def _reason(e: BaseException) -> str:
    """A one-line reason, reaching into the wrappers twisted.web puts around connection errors."""
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(_reason(f.value) for f in reasons)
    if isinstance(e, defer.CancelledError | defer.TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__


def _cancelled(e: BaseException) -> bool:
    if isinstance(e, defer.CancelledError | ConnectingCancelledError):
        return True
    return any(_cancelled(f.value) for f in getattr(e, "reasons", None) or ())


@implementer(IAgentEndpointFactory)
class _FixedAddress:
    """Endpoints to one address (found by our resolver), with TLS that checks ``hostname``."""

    def __init__(self, reactor: Any, address: str, port: int, tls: Any, timeout: float) -> None:
        self.reactor, self.address, self.port, self.tls, self.timeout = (
            reactor,
            address,
            port,
            tls,
            timeout,
        )

    def endpointForURI(self, uri: Any) -> Any:  # noqa: N802 (Twisted's interface)
        tcp = TCP6ClientEndpoint if ":" in self.address else TCP4ClientEndpoint
        return QuietEndpoint(
            wrapClientTLS(
                self.tls, tcp(self.reactor, self.address, self.port, timeout=self.timeout)
            )
        )


class HTTPSFetcher:
    """Fetches ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (RFC 8461 section 3.3).

    ``addresses(name)`` resolves the policy host (the MX router's resolver); each address is
    tried in turn until one connects. The certificate must chain to the platform's trust store
    or to ``ca_file`` and be valid for the policy host. Only ``200`` with ``text/plain`` is taken;
    redirects are not followed; more than ``max_size`` bytes is an error; the whole fetch gets
    ``timeout`` seconds.
    """

    def __init__(
        self,
        reactor: Any,
        addresses: Callable[[str], Awaitable[tuple[str, ...]]],
        *,
        port: int = 443,
        ca_file: str | None = None,
        timeout: float = 10.0,
        max_size: int = MAX_POLICY_SIZE,
    ) -> None:
        self.reactor, self.addresses, self.port = reactor, addresses, port
        self.timeout, self.max_size = timeout, max_size
        self.trust = platform_and(ca_file)

    def __call__(self, domain: str) -> defer.Deferred[bytes]:
        d = defer.ensureDeferred(self._fetch(domain))
        d.addTimeout(self.timeout, self.reactor)
        return d

    def url(self, host: str) -> str:
        port = "" if self.port == 443 else f":{self.port}"
        return f"https://{host}{port}/.well-known/mta-sts.txt"

    async def _fetch(self, domain: str) -> bytes:
        host = f"mta-sts.{domain}"
        addresses = await self.addresses(host)
        if not addresses:
            raise PolicyError(f"{host} has no address")
        errors = []
        for address in addresses:
            try:
                return await self._get(host, address)
            except PolicyError:  # an answer we refuse
                raise
            except Exception as e:  # could not connect or TLS failed: the next address may do
                if _cancelled(e):  # our own timeout, whatever twisted.web wrapped it in
                    raise defer.CancelledError() from None
                errors.append(f"{address}: {_reason(e)}")
        raise PolicyError(f"{self.url(host)}: " + "; ".join(errors))

    async def _get(self, host: str, address: str) -> bytes:
        tls = ssl.optionsForClientTLS(host, trustRoot=self.trust)
        agent = Agent.usingEndpointFactory(
            self.reactor, _FixedAddress(self.reactor, address, self.port, tls, self.timeout)
        )
        url = self.url(host)
        response = await treq.get(url, agent=agent, allow_redirects=False, reactor=self.reactor)
        if response.code != 200:
            response.deliverBody(_Discard())
            redirect = " (redirects are not followed)" if 300 <= response.code < 400 else ""
            raise PolicyError(f"{url}: HTTP {response.code}{redirect}")
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if ctype.split(b";")[0].strip().lower() != b"text/plain":
            response.deliverBody(_Discard())
            raise PolicyError(f"{url}: content type {ctype.decode('latin-1')!r}, not text/plain")
        if isinstance(response.length, int) and response.length > self.max_size:
            response.deliverBody(_Discard())
            raise PolicyError(f"{url}: {response.length} bytes, more than {self.max_size}")
        chunks: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > self.max_size:
                raise PolicyError(f"{url}: more than {self.max_size} bytes")
            chunks.append(data)

        await treq.collect(response, collect)
        return b"".join(chunks)


class _Discard:
    """Drops a body we will not read and closes the connection at once."""

    transport: Any = None

    def makeConnection(self, transport: Any) -> None:  # noqa: N802
        self.transport = transport
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        pass

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        pass
