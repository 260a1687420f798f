"""DKIM private keys: one per signing domain, read from PEM files named in ``[dkim]``.

The key's type chooses the algorithm: an RSA key signs rsa-sha256, an Ed25519 key ed25519-sha256
(RFC 8463). ``DomainKey.private_key`` keeps the form dkimpy takes (PEM for RSA, the base64 seed for
Ed25519); ``DomainKey.signing_key`` the parsed key that signs, so that no message pays for parsing.
"""

from __future__ import annotations

import base64

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

#: A private key as ``cryptography`` signs with it.
SigningKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@attrs.frozen
class DomainKey:
    domain: str
    selector: str
    private_key: bytes  # as dkimpy takes it: PEM for RSA, the base64 seed for Ed25519
    algorithm: bytes = b"rsa-sha256"
    #: ``private_key`` parsed once (``None``: parsed for each signature)
    signing_key: SigningKey | None = attrs.field(default=None, eq=False, repr=False)

    def key(self) -> SigningKey:
        """The key that signs; raises ``ValueError`` when ``private_key`` is not one."""
        if self.signing_key is not None:
            return self.signing_key
        if self.algorithm == b"ed25519-sha256":
            return ed25519.Ed25519PrivateKey.from_private_bytes(
                base64.b64decode(self.private_key, validate=True)
            )
        key = serialization.load_pem_private_key(self.private_key, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"an {self.algorithm.decode()} key must be RSA")
        return key


def dkimpy_key(pem: bytes) -> tuple[bytes, bytes]:
    """A PEM private key as dkimpy signs with it, and the signature algorithm its type calls for."""
    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        return pem, b"rsa-sha256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return base64.b64encode(seed), b"ed25519-sha256"
    raise ValueError(f"DKIM signs with an RSA or an Ed25519 key, not {type(key).__name__}")


def domain_key(domain: str, selector: str, pem: bytes) -> DomainKey:
    """``domain``'s key from its PEM text (``ValueError`` if it is neither RSA nor Ed25519)."""
    private_key, algorithm = dkimpy_key(pem)
    key = DomainKey(domain, selector, private_key, algorithm)
    return attrs.evolve(key, signing_key=key.key())
