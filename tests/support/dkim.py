"""Support for the DKIM signing tests: keys, a DNS answer for dkimpy's verifier, and a thread pool
and reactor that run at once (what runs in the pool is the code under test, not the pool)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.python.failure import Failure


def pem_key(kind: str) -> tuple[bytes, bytes]:
    """A fresh private key (PEM) of ``kind`` ("rsa" or "ed25519") and its DKIM key record."""
    if kind == "rsa":
        key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, f"v=DKIM1; k={kind}; p=".encode() + base64.b64encode(public)


def dns_answering(records: dict[bytes, bytes]) -> Callable[..., bytes | None]:
    """A ``dnsfunc`` for ``dkim.verify``: the record of ``selector._domainkey.domain.``."""

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    return dnsfunc


class SyncPool:
    """A thread pool that runs each call at once, in the calling thread."""

    def callInThreadWithCallback(  # noqa: N802 (Twisted's name)
        self, on_result: Callable[[bool, Any], None], f: Callable[..., Any], *a: Any, **kw: Any
    ) -> None:
        try:
            result = f(*a, **kw)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class SyncReactor:
    """The little of a reactor that ``deferToThreadPool`` and the signers use."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def seconds(self) -> float:
        return self.now

    def callFromThread(self, f: Callable[..., Any], *a: Any, **kw: Any) -> None:  # noqa: N802
        f(*a, **kw)
