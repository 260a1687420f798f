"""TOML configuration → typed, validated values.

Every error is a ``ConfigError`` naming the file, the key path (``routes[2].hosts[0]``) and the
reason, so an operator never reads a traceback. Nothing here touches the reactor. Relative paths are
taken relative to the current directory, as the operator typed them.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import attrs

from mailrelay import _ascii
from mailrelay.address import DomainError, canonical_domain
from mailrelay.errors import ConfigError, config_errors

T = TypeVar("T")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.ASCII)
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)i?[bB]?\s*$", re.ASCII)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_duration(value: object) -> float:
    """``"5m"`` → 300.0; a bare number is seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 30s, 5m, 4h or 5d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"{value!r} is not a duration such as 30s, 5m, 4h or 5d")


def parse_size(value: object) -> int:
    """``"50M"`` → 52428800; a bare number is bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    raise ValueError(f"{value!r} is not a size in bytes (a number, or e.g. 10M)")


def parse_hostport(value: object, default_port: int = 25) -> tuple[str, int]:
    """``"127.0.0.1:2526"``, ``"[::1]:25"``, ``"mx.example.test"`` → (host, port)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a string host:port")
    v = value.strip()
    if v.startswith("["):
        host, sep, rest = v[1:].partition("]")
        if not sep:
            raise ValueError(f"{value!r}: missing ']'")
        port_s = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"{value!r}: junk after ']'")
    elif v.count(":") == 1:
        host, _, port_s = v.partition(":")
    else:  # a bare host name, IPv4 or IPv6 address
        host, port_s = v, ""
    if not host:
        raise ValueError(f"{value!r}: empty host")
    port = default_port
    if port_s:
        parsed = _ascii.number(port_s, 5)  # "١٠".isdigit() too, and int() reads it as 10
        if parsed is None:
            raise ValueError(f"{value!r}: port must be a number")
        port = parsed
    if not 1 <= port <= 65535:
        raise ValueError(f"{value!r}: port must be 1-65535")
    return host, port


class Section:
    """Reads one table, recording the key path for errors and the keys it was asked about.

    Given an ``errors`` list, a bad value is recorded there and read as its default, so that one
    pass over a file finds every error in it; without one, the first error raises.
    """

    def __init__(
        self, source: str, path: str, table: object, errors: list[ConfigError] | None = None
    ) -> None:
        self.source, self.path, self.errors = source, path, errors
        if not isinstance(table, Mapping):
            self.report_key(path, "must be a table")
            table = {}
        self.table: Mapping[str, Any] = table
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), reason)

    def report(self, name: str, reason: str) -> None:
        """An error in key ``name``: recorded (and reading goes on), or raised."""
        self.report_key(self.key(name), reason)

    def report_key(self, key: str, reason: str) -> None:
        error = ConfigError(self.source, key, reason)
        if self.errors is None:
            raise error
        self.errors.append(error)

    def get(
        self,
        name: str,
        default: T,
        convert: Callable[[Any], T] | None = None,
        types: type | tuple[type, ...] | None = None,
    ) -> T:
        self.seen.add(name)
        if name not in self.table:
            return default
        value = self.table[name]
        if types is not None and (
            not isinstance(value, types) or isinstance(value, bool) and bool not in _astuple(types)
        ):
            names = " or ".join(t.__name__ for t in _astuple(types))
            self.report(name, f"must be {names}, not {type(value).__name__}")
            return default
        if convert is None:
            return value
        try:
            return convert(value)
        except (ValueError, TypeError) as e:
            self.report(name, str(e))
            return default

    def get_list(
        self, name: str, default: Sequence[T], convert: Callable[[Any], T]
    ) -> tuple[T, ...]:
        self.seen.add(name)
        if name not in self.table:
            return tuple(default)
        value = self.table[name]
        if not isinstance(value, list):
            self.report(name, f"must be a list, not {type(value).__name__}")
            return tuple(default)
        out = []
        for i, item in enumerate(value):
            try:
                out.append(convert(item))
            except (ValueError, TypeError) as e:
                self.report_key(f"{self.key(name)}[{i}]", str(e))
        return tuple(out)

    def check_unknown(self) -> None:
        for name in self.table:
            if name not in self.seen:
                self.report(name, "unknown key")


def _astuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def _string(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError(f"must be a string, not {type(v).__name__}")
    return v


def _network(v: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(_string(v), strict=False)
    except ValueError:
        raise ValueError(f"{v!r} is not a network such as 127.0.0.0/8") from None


def _domain(v: object) -> str:
    """One canonical form (``address.canonical_domain``), so config and mail compare alike."""
    try:
        return canonical_domain(_ascii.strip(_string(v)).removesuffix("."))
    except DomainError as e:
        raise ValueError(str(e)) from None


def _thread_count(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 64:
        raise ValueError(f"must be a whole number from 0 to 64, not {v!r}")
    return v


def _positive_int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"must be a whole number of at least 1, not {v!r}")
    return v


def _whole_number(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"must be a whole number of at least 0, not {v!r}")
    return v


def _hopcount(v: object) -> int:
    n = _positive_int(v)
    if n < 2:  # our own Received header counts: 1 would refuse every message
        raise ValueError(f"must be at least 2, not {v!r}")
    return n


Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_LISTEN = ("tcp:2525:interface=127.0.0.1",)
DEFAULT_TRUSTED: tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
DEFAULT_RETRY_SCHEDULE = (300.0, 600.0, 1200.0, 2400.0, 3600.0)


@attrs.frozen
class ServerConfig:
    hostname: str
    listen: tuple[str, ...] = DEFAULT_LISTEN
    trusted_networks: tuple[Network, ...] = DEFAULT_TRUSTED
    local_domains: tuple[str, ...] = ()
    relay_domains: tuple[str, ...] = ()
    # RCPT to local_domains/relay_domains asks the routers at once (550 5.1.1 for no such user)
    verify_recipients: bool = True
    max_message_size: int = 52428800
    max_recipients: int = 100
    max_errors: int = 20
    # RCPTs past max_recipients answered 452 before each further one counts as an error (Postfix's
    # smtpd_recipient_overshoot_limit): a flood of them still ends at max_errors
    recipient_overshoot_limit: int = 1000
    hopcount_limit: int = 50  # Received headers, ours included, that make a mail loop (Postfix's)
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    # per-client limits (max_connections_per_ip, greet_delay) for trusted_networks too; Postfix
    # exempts mynetworks from its client limits, and so do we unless this is true
    limit_trusted_clients: bool = False
    command_line_limit: int = 512
    text_line_limit: int = 1000
    idle_timeout: float = 300.0
    data_timeout: float = 600.0
    tls_certificate: str | None = None
    tls_key: str | None = None
    # AUTH (RFC 4954): a user:hash file (python -m mailrelay.smtp.auth makes hashes); offered
    # only over TLS unless allow_plaintext_auth. submission_listen: endpoints requiring AUTH.
    auth_password_file: str | None = None
    allow_plaintext_auth: bool = False
    submission_listen: tuple[str, ...] = ()
    greet_delay: float = 0.0  # seconds to wait before the 220; a client talking earlier gets 554
    shutdown_timeout: float = 30.0  # on SIGTERM, how long sessions may finish their transaction
    workers: int = (
        1  # processes sharing the listeners (mailrelay.workers); 1 = one process, no supervisor
    )


@attrs.frozen
class SpoolConfig:
    path: str = "var/spool"
    backend: str = "filesystem"
    dsn: str | None = None
    # postgresql: a node's leases last lease_time, renewed every scan_interval (which also finds
    # the mail of dead nodes); a node that dies is taken over within about lease_time.
    lease_time: float = 30.0
    scan_interval: float = 5.0
    # filesystem: threads that fsync the files of one group commit together (0: the writer
    # thread fsyncs them one after another; see docs/configuration.rst).
    fsync_threads: int = 16


@attrs.frozen
class QueueConfig:
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    max_lifetime: float = 5 * 86400.0
    delay_warning: float | None = None
    max_deliveries: int = 100
    max_per_destination: int = 20
    postmaster: str | None = None


@attrs.frozen
class DeliveryConfig:
    helo_name: str | None = None
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    tls_ca_file: str | None = None  # CA bundle for routes with tls = "verify" (else the system's)
    connection_reuse_limit: int = 100  # messages per cached connection
    connection_reuse_time: float = 300.0  # a cached connection's lifetime
    connection_idle_time: float = 2.0  # an unused cached connection is closed after this


@attrs.frozen
class DKIMConfig:
    """DKIM signing of outgoing mail whose From (or envelope sender) domain is in ``domains``."""

    domains: tuple[str, ...] = ()
    selector: str = "mail"
    key_file: str | None = None  # PEM private key; "{domain}" in the path is the signing domain


@attrs.frozen
class RouteConfig:
    """One ``[[routes]]`` table: its type, its options (for the router factory) and its key path."""

    type: str
    options: Mapping[str, Any]
    key: str
    # ``binarymime = true``: every next hop of this route takes BINARYMIME (the server offers
    # BINARYMIME only when every route says so). Not passed to the router factory.
    binarymime: bool = False


@attrs.frozen
class Config:
    source: str
    server: ServerConfig
    spool: SpoolConfig
    queue: QueueConfig
    delivery: DeliveryConfig
    routes: tuple[RouteConfig, ...]
    metrics_listen: str | None = None
    dkim: DKIMConfig = attrs.field(factory=DKIMConfig)

    @property
    def binarymime(self) -> bool:
        """Whether the server may offer BINARYMIME: every route says its next hops carry it."""
        return bool(self.routes) and all(route.binarymime for route in self.routes)


#: The routes of a config without ``[[routes]]``: every domain by its MX records (key ``routes``:
#: no table of the file).
DEFAULT_ROUTES = (RouteConfig("mx", {}, "routes"),)

_SECTIONS = ("server", "spool", "queue", "delivery", "routes", "metrics", "dkim")


def load(path: str) -> Config:
    """Read and validate a TOML config file."""
    return from_dict(_read(path), path)


def load_all(path: str) -> tuple[Config | None, list[ConfigError]]:
    """Read ``path`` and find every error in it: the config (bad values read as their defaults;
    None when the file does not read as TOML) and the errors."""
    try:
        data = _read(path)
    except ConfigError as e:
        return None, [e]
    errors: list[ConfigError] = []
    return from_dict(data, path, errors), errors


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(path, "", e.strerror or str(e)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"not valid TOML: {e}") from None


def loads(text: str, source: str = "<string>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "", f"not valid TOML: {e}") from None
    return from_dict(data, source)


def from_dict(
    data: Mapping[str, Any], source: str = "<config>", errors: list[ConfigError] | None = None
) -> Config:
    """The typed config of ``data``. Every error found is appended to ``errors`` (a bad value read
    as its default) when given; else they are raised together (``ConfigErrors``) after the pass."""
    if errors is not None:
        return _from_dict(data, source, errors)
    found: list[ConfigError] = []
    cfg = _from_dict(data, source, found)
    if found:
        raise config_errors(found)
    return cfg


def _from_dict(data: Mapping[str, Any], source: str, errors: list[ConfigError]) -> Config:
    top = Section(source, "", data, errors)
    for name in data:
        if name not in _SECTIONS:
            top.report(name, f"unknown section (known: {', '.join(_SECTIONS)})")

    s = Section(source, "server", data.get("server", {}), errors)
    server = ServerConfig(
        hostname=s.get("hostname", socket.gethostname(), _domain),
        listen=s.get_list("listen", DEFAULT_LISTEN, _string),
        trusted_networks=s.get_list("trusted_networks", DEFAULT_TRUSTED, _network),
        local_domains=s.get_list("local_domains", (), _domain),
        relay_domains=s.get_list("relay_domains", (), _domain),
        verify_recipients=s.get("verify_recipients", True, types=bool),
        max_message_size=s.get("max_message_size", 52428800, parse_size),
        max_recipients=s.get("max_recipients", 100, _positive_int),
        max_errors=s.get("max_errors", 20, _positive_int),
        recipient_overshoot_limit=s.get("recipient_overshoot_limit", 1000, _whole_number),
        hopcount_limit=s.get("hopcount_limit", 50, _hopcount),
        max_connections=s.get("max_connections", 1000, _positive_int),
        max_connections_per_ip=s.get("max_connections_per_ip", 50, _positive_int),
        limit_trusted_clients=s.get("limit_trusted_clients", False, types=bool),
        command_line_limit=s.get("command_line_limit", 512, _positive_int),
        text_line_limit=s.get("text_line_limit", 1000, _positive_int),
        idle_timeout=s.get("idle_timeout", 300.0, parse_duration),
        data_timeout=s.get("data_timeout", 600.0, parse_duration),
        tls_certificate=s.get("tls_certificate", None, _string),
        tls_key=s.get("tls_key", None, _string),
        auth_password_file=s.get("auth_password_file", None, _string),
        allow_plaintext_auth=s.get("allow_plaintext_auth", False, types=bool),
        submission_listen=s.get_list("submission_listen", (), _string),
        greet_delay=s.get("greet_delay", 0.0, parse_duration),
        shutdown_timeout=s.get("shutdown_timeout", 30.0, parse_duration),
        workers=s.get("workers", 1, _positive_int),
    )
    s.check_unknown()
    _check_workers(s, server)
    if not server.listen:
        s.report("listen", "must name at least one endpoint")
    if bool(server.tls_certificate) != bool(server.tls_key):
        s.report("tls_key", "tls_certificate and tls_key go together")

    s = Section(source, "spool", data.get("spool", {}), errors)
    spool = SpoolConfig(
        path=s.get("path", "var/spool", _string),
        backend=s.get("backend", "filesystem", _string),
        dsn=s.get("dsn", None, _string),
        lease_time=s.get("lease_time", 30.0, parse_duration),
        scan_interval=s.get("scan_interval", 5.0, parse_duration),
        fsync_threads=s.get("fsync_threads", 16, _thread_count),
    )
    s.check_unknown()
    if spool.backend not in ("filesystem", "postgresql"):
        s.report("backend", f"{spool.backend!r}: must be 'filesystem' or 'postgresql'")
    if spool.backend == "postgresql" and not spool.dsn:
        s.report("dsn", "required when backend = 'postgresql'")
    if not 0 < spool.scan_interval < spool.lease_time:
        s.report(
            "scan_interval",
            "must be above 0 and below lease_time (leases are renewed at each scan)",
        )

    s = Section(source, "queue", data.get("queue", {}), errors)
    queue = QueueConfig(
        retry_schedule=s.get_list("retry_schedule", DEFAULT_RETRY_SCHEDULE, parse_duration),
        max_lifetime=s.get("max_lifetime", 5 * 86400.0, parse_duration),
        delay_warning=s.get("delay_warning", None, _optional_duration),
        max_deliveries=s.get("max_deliveries", 100, _positive_int),
        max_per_destination=s.get("max_per_destination", 20, _positive_int),
        postmaster=s.get("postmaster", None, _string),
    )
    s.check_unknown()
    if not queue.retry_schedule:
        s.report("retry_schedule", "must have at least one interval")
        queue = attrs.evolve(queue, retry_schedule=DEFAULT_RETRY_SCHEDULE)

    s = Section(source, "delivery", data.get("delivery", {}), errors)
    delivery = DeliveryConfig(
        helo_name=s.get("helo_name", None, _domain),
        connect_timeout=s.get("connect_timeout", 30.0, parse_duration),
        command_timeout=s.get("command_timeout", 300.0, parse_duration),
        data_timeout=s.get("data_timeout", 600.0, parse_duration),
        tls_ca_file=s.get("tls_ca_file", None, _string),
        connection_reuse_limit=s.get("connection_reuse_limit", 100, _positive_int),
        connection_reuse_time=s.get("connection_reuse_time", 300.0, parse_duration),
        connection_idle_time=s.get("connection_idle_time", 2.0, parse_duration),
    )
    s.check_unknown()

    raw_routes = data.get("routes", [])
    if not isinstance(raw_routes, list):
        top.report("routes", "must be an array of tables ([[routes]])")
        raw_routes = []
    routes = []
    for i, table in enumerate(raw_routes):
        r = Section(source, f"routes[{i}]", table, errors)
        rtype = r.get("type", None, _string)
        if rtype is None and "type" in r.table:
            continue  # not a string: reported
        if not rtype:
            r.report(
                "type",
                "missing: every [[routes]] needs a type (static, mx, ldap or a plugin's name)",
            )
            continue
        binarymime = r.get("binarymime", False, types=bool)
        options = {k: v for k, v in r.table.items() if k not in ("type", "binarymime")}
        routes.append(RouteConfig(rtype, options, f"routes[{i}]", binarymime))
    if not routes:  # as without a file: a relay whose every recipient bounces helps no one
        routes = list(DEFAULT_ROUTES)

    s = Section(source, "metrics", data.get("metrics", {}), errors)
    metrics_listen = s.get("listen", None, _string)
    s.check_unknown()

    s = Section(source, "dkim", data.get("dkim", {}), errors)
    dkim = DKIMConfig(
        domains=s.get_list("domains", (), _domain),
        selector=s.get("selector", "mail", _string),
        key_file=s.get("key_file", None, _string),
    )
    s.check_unknown()
    if dkim.domains and not dkim.key_file:
        s.report("key_file", "required when dkim.domains is set")

    return Config(source, server, spool, queue, delivery, tuple(routes), metrics_listen, dkim)


#: Most worker processes: a worker's number is one base32 character of its queue ids.
MAX_WORKERS = 32
#: Endpoint types a supervisor can bind and hand to its workers (mailrelay.workers).
WORKER_ENDPOINTS = ("tcp", "tcp6", "ssl")


def _check_workers(s: Section, server: ServerConfig) -> None:
    if server.workers > MAX_WORKERS:
        s.report("workers", f"must be at most {MAX_WORKERS}, not {server.workers}")
    if server.workers == 1:
        return
    for key in ("listen", "submission_listen"):
        for description in getattr(server, key):
            kind = description.split(":", 1)[0].strip().lower()
            if kind not in WORKER_ENDPOINTS:
                s.report(
                    key,
                    f"{description!r}: with workers > 1 every listener must be one of "
                    f"{', '.join(WORKER_ENDPOINTS)} (the supervisor binds it for its workers)",
                )


def _optional_duration(v: object) -> float | None:
    if v in (False, "off", "none", "0", 0):
        return None
    return parse_duration(v)
