"""TLS for outbound STARTTLS: client options per route policy, the CA bundle, what was negotiated.

``verify`` checks the chain against the configured CA bundle (or the platform's trust store) and
the host name with service-identity (``optionsForClientTLS``); ``encrypt`` and ``may`` encrypt
without checking who is at the other end, as Postfix's levels of the same names do.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import ssl

from mailrelay.envelope import TLSPolicy
from mailrelay.tls_trust import load_trust_root


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
    # after startTLS (or on a TLS endpoint) the handle is pyOpenSSL's Connection; before, a socket
    conn = getattr(transport, "getHandle", lambda: None)()
    version = getattr(conn, "get_protocol_version_name", None)
    cipher = getattr(conn, "get_cipher_name", None)
    if version is None or cipher is None:
        return ""
    try:
        return f"{version()} {cipher()}"
    except Exception:  # pyOpenSSL raises on a connection without a session
        return ""
