"""Trust roots for outbound TLS: a configured CA bundle, alone or added to the platform's store.

Routing (the MTA-STS policy fetch, the LDAP and MX routers' ``*_ca_file`` options), delivery
(``verify`` hops) and the start-up checks all read CA bundles; this module is the one place that
does, so none of them imports another's package. The platform's store plus a CA file needs a
Twisted name that is not public: ``mailrelay._twisted.PlatformAnd``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from twisted.internet import ssl

from mailrelay._twisted import PlatformAnd

_BEGIN = b"-----BEGIN CERTIFICATE-----"


def load_trust_root(ca_file: str) -> Any:
    """Every certificate in a PEM bundle as one trust root (read again when the file changes)."""
    return _load_trust_root(ca_file, os.stat(ca_file).st_mtime_ns)


def ca_file_option(v: object) -> str:
    """A router option naming a CA bundle (``mta_sts_ca_file``, ``tls_ca_file``): a readable PEM
    file with at least one certificate, checked when the router is built, not at its first use."""
    if not isinstance(v, str) or not v:
        raise ValueError(f"must be the path of a PEM CA file, not {v!r}")
    try:
        load_trust_root(v)
    except OSError as e:
        raise ValueError(f"cannot read {v}: {e.strerror}") from None
    except Exception as e:  # ValueError (no PEM), or OpenSSL's error for a broken certificate
        raise ValueError(f"{v}: not a PEM CA file ({e})") from None
    return v


@functools.lru_cache(maxsize=8)
def _load_trust_root(ca_file: str, mtime_ns: int) -> Any:
    with open(ca_file, "rb") as f:
        data = f.read()
    pems = [_BEGIN + part for part in data.split(_BEGIN)[1:]]
    if not pems:
        raise ValueError(f"{ca_file}: no PEM certificate found")
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(p) for p in pems])


def platform_and(ca_file: str | None) -> Any:
    """The platform's trust store, plus the certificates of ``ca_file`` when one is given."""
    return PlatformAnd(load_trust_root(ca_file)) if ca_file else ssl.platformTrust()
