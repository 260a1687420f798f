"""The values of a config that only show they are wrong when used: checked before anything starts.

``config.py`` checks what a value looks like; this module checks what it names: that an endpoint
string parses, that a certificate, key, CA bundle or password file reads, that the spool directory
can be made, that each route builds. Each reports every error of a file at once, one line each,
and no traceback: ``mailrelay check-config`` with ``check_file``; ``twistd mailrelay`` with
``load_file`` and then ``MailRelayService``, which checks the same (``problems``) and builds the
routes it runs with, so they are built once (a supervisor of workers, which builds none, ``check``).
Nothing is left behind: a spool directory made to prove it can be is removed again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from mailrelay import config as configmod
from mailrelay.config import Config
from mailrelay.errors import ConfigError, config_errors, each_config_error


def check_file(path: str, reactor: Any = None) -> Config:
    """Load ``path`` and check everything in it; raise every error found together."""
    cfg = load_file(path, reactor)
    check(cfg, reactor)
    return cfg


def load_file(path: str, reactor: Any = None) -> Config:
    """Load ``path``; a file with wrong values raises them with everything else wrong in it (what
    it names, its routes), all at once. One whose values are right is left for ``check``."""
    cfg, errors = configmod.load_all(path)
    if errors:
        if cfg is not None:
            errors += problems(cfg, reactor) + route_problems(cfg, reactor)
        raise config_errors(errors)
    assert cfg is not None
    return cfg


def check(cfg: Config, reactor: Any = None) -> None:
    """Raise every error of what ``cfg`` names and of its routes together."""
    errors = problems(cfg, reactor) + route_problems(cfg, reactor)
    if errors:
        raise config_errors(errors)


def problems(cfg: Config, reactor: Any = None, *, spool: bool = True) -> list[ConfigError]:
    """What is wrong with the things ``cfg`` names (``spool``: also its filesystem spool path)."""
    if reactor is None:
        from twisted.internet import reactor
    found: list[ConfigError] = []

    def check(key: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except ConfigError as e:
            found.append(e)
        except Exception as e:  # whatever the loader raises: its text is the reason
            found.append(ConfigError(cfg.source, key, _reason(e)))

    server = cfg.server
    for name in ("listen", "submission_listen"):
        for i, description in enumerate(getattr(server, name)):
            check(f"server.{name}[{i}]", partial(_smtp_endpoint, reactor, description))
    if cfg.metrics_listen:
        check("metrics.listen", partial(_endpoint, reactor, cfg.metrics_listen))
    if server.tls_certificate and server.tls_key:
        for key, error in _tls_problems(server.tls_certificate, server.tls_key):
            found.append(ConfigError(cfg.source, f"server.{key}", error))
    if server.auth_password_file:
        check("server.auth_password_file", partial(_password_file, server.auth_password_file))
    if cfg.delivery.tls_ca_file:
        check("delivery.tls_ca_file", partial(_ca_file, cfg.delivery.tls_ca_file))
    from mailrelay.dkim import DKIMSigner

    check("dkim.key_file", lambda: DKIMSigner.from_config(cfg.dkim, cfg.source))
    if spool and cfg.spool.backend == "filesystem":
        check("spool.path", lambda: _spool(cfg.spool.path))
    if cfg.spool.backend == "postgresql" and cfg.spool.dsn:
        check("spool.dsn", partial(_dsn, cfg.spool.dsn))
    return found


def route_problems(cfg: Config, reactor: Any = None) -> list[ConfigError]:
    """Each ``[[routes]]`` table that does not build, each with its error."""
    from twisted.python.threadpool import ThreadPool

    from mailrelay.routing.context import RouterContext
    from mailrelay.routing.plugins import build_router

    if reactor is None:
        from twisted.internet import reactor
    threadpool = ThreadPool(minthreads=0, maxthreads=1, name="mailrelay-check")  # never started
    try:
        build_router(
            cfg.routes,
            lambda key: RouterContext(
                reactor=reactor, threadpool=threadpool, source=cfg.source, key=key
            ),
        )
    except ConfigError as e:
        return list(each_config_error(e))
    return []


def _reason(e: Exception) -> str:
    """The exception's text on one line (an error is one line of output)."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return " ".join(str(e).split()) or type(e).__name__


def _smtp_endpoint(reactor: Any, description: str) -> None:
    """An SMTP listener's endpoint. Not ``haproxy:`` (yet): Twisted's PROXY-protocol wrapper starts
    the session before the header is read, so relay access would judge the proxy's address, and a
    proxy on a trusted network would make every client behind it trusted (an open relay)."""
    if description.split(":", 1)[0].strip().lower() == "haproxy":
        raise ValueError(
            f"{description!r}: the PROXY protocol is not supported: the session would see the "
            "proxy's address, not the client's (and trust it where trusted_networks do)"
        )
    _endpoint(reactor, description)


def _endpoint(reactor: Any, description: str) -> None:
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(reactor, description)
    except Exception as e:
        raise ValueError(f"{description!r} is not an endpoint: {_reason(e)}") from None


def _tls_problems(certificate: str, key: str) -> Iterator[tuple[str, str]]:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from mailrelay.smtp.tls import server_tls_options

    cert_ok = key_ok = False
    try:
        with open(certificate, "rb") as f:
            x509.load_pem_x509_certificate(f.read())
        cert_ok = True
    except OSError as e:
        yield "tls_certificate", _reason(e)
    except ValueError:
        yield "tls_certificate", f"{certificate}: not a PEM certificate"
    try:
        with open(key, "rb") as f:
            load_pem_private_key(f.read(), password=None)
        key_ok = True
    except OSError as e:
        yield "tls_key", _reason(e)
    except (ValueError, TypeError):
        yield "tls_key", f"{key}: not a PEM private key without a password"
    if cert_ok and key_ok:
        try:
            server_tls_options(certificate, key)
        except Exception as e:
            yield "tls_key", f"{key}: does not go with {certificate}: {_reason(e)}"


def _dsn(dsn: str) -> None:
    """Parsed as psycopg will (a database that is down is no error of the file: mail waits)."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(dsn)
    except Exception as e:
        raise ValueError(f"not a PostgreSQL connection string: {_reason(e)}") from None


def _password_file(path: str) -> None:
    from mailrelay.smtp.auth import HashedPasswordFile

    HashedPasswordFile(path)


def _ca_file(path: str) -> None:
    from mailrelay.tls_trust import load_trust_root

    load_trust_root(path)


def _spool(path: str) -> None:
    try:
        can_make_directory(path)
    except OSError as e:
        raise ValueError(f"{path!r} cannot be made a directory we write in: {_reason(e)}") from None


def can_make_directory(path: str) -> None:
    """Raise ``OSError`` if ``path`` is not a directory we can write in and cannot be made one.

    The missing directories are made and removed again, the only sure test (permissions, read-only
    file systems, a file in the way).
    """
    made = []
    try:
        target = os.path.abspath(path)
        missing = []
        while not os.path.lexists(target):
            missing.append(target)
            target = os.path.dirname(target)
        if not os.path.isdir(target):
            raise NotADirectoryError(20, "Not a directory", target)
        for directory in reversed(missing):
            os.mkdir(directory, 0o700)
            made.append(directory)
        if not made and not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", path)
    finally:
        for directory in reversed(made):
            os.rmdir(directory)
