"""TLS for outbound STARTTLS: client options per route policy, the CA bundle, what was negotiated.

``verify`` checks the chain against the configured CA bundle (or the platform's trust store) and
the host name with service-identity (``optionsForClientTLS``); ``encrypt`` and ``may`` encrypt
without checking who is at the other end, as Postfix's levels of the same names do.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from twisted.internet import ssl

from mailrelay.envelope import TLSPolicy

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


class ClientTLS:
    """Makes the ``IOpenSSLClientConnectionCreator`` for one hop under one policy."""

    def __init__(self, ca_file: str | None = None) -> None:
        self.ca_file = ca_file
        self._unverified: Any = None

    def options(self, policy: TLSPolicy, hostname: str) -> Any:
        if policy is TLSPolicy.VERIFY:
            trust = load_trust_root(self.ca_file) if self.ca_file else None
            return ssl.optionsForClientTLS(hostname, trustRoot=trust)
        if self._unverified is None:
            self._unverified = ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
        return self._unverified


def tls_info(transport: Any) -> str:
    """``TLSv1.3 TLS_AES_256_GCM_SHA384`` for a transport after the handshake, ``""`` if unknown."""
    conn = getattr(getattr(transport, "protocol", None), "_tlsConnection", None)
    if conn is None:
        return ""
    try:
        return f"{conn.get_protocol_version_name()} {conn.get_cipher_name()}"
    except Exception:  # pyOpenSSL raises on a connection without a session
        return ""
