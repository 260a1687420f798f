"""Server-side TLS: certificate/key loading and what a session records about its TLS connection.

The certificate file may hold the chain after the leaf certificate (as Let's Encrypt's
``fullchain.pem`` does); the chain is sent to clients. Protocol versions below TLS 1.2 are refused.
"""

from __future__ import annotations

import re
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.internet import ssl

from mailrelay.envelope import TLSInfo

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\s*", re.S)


def server_tls_options(certificate_path: str, key_path: str) -> ssl.CertificateOptions:
    """Read PEM files (at start-up, not on the reactor's hot path) into Twisted TLS options."""
    with open(certificate_path, "rb") as f:
        cert_pem = f.read()
    with open(key_path, "rb") as f:
        key_pem = f.read()
    certs = _PEM_CERT.findall(cert_pem)
    if not certs:
        raise ValueError(f"{certificate_path}: no PEM certificate found")
    leaf, *chain = (x509.load_pem_x509_certificate(c) for c in certs)
    key = load_pem_private_key(key_pem, password=None)
    # cryptography's objects, which Twisted takes (its stubs still name pyOpenSSL's, deprecated)
    given: dict[str, Any] = {"privateKey": key, "certificate": leaf, "extraCertChain": chain}
    options = ssl.CertificateOptions(**given, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    options.getContext()  # a key that does not go with the certificate fails now, not at a STARTTLS
    return options


def tls_info(transport: Any) -> TLSInfo | None:
    """Version and cipher of a transport whose TLS handshake completed, else ``None``."""
    handle = getattr(transport, "getHandle", lambda: None)()
    version = getattr(handle, "get_protocol_version_name", None)
    cipher = getattr(handle, "get_cipher_name", None)
    if version is None or cipher is None:
        return None
    try:
        v, c = version(), cipher()
    except Exception:
        return None
    if not v or not c or v == "Unknown":
        return None
    return TLSInfo(str(v), str(c))
