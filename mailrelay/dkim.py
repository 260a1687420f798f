"""DKIM signing (RFC 6376) of outgoing mail, per sender domain, with dkimpy.

``DKIMSigningDeliverer`` wraps the real deliverer: before each attempt it reads the message from
the spool, signs it in the thread pool (RSA is too slow for the reactor thread) and hands the
deliverer the signed text. The signing domain is the ``From:`` header's domain when it is one of
ours (what DMARC aligns on), else the envelope sender's. A message that cannot be signed goes out
unsigned, with a log line, as OpenDKIM does by default: a signature is never a reason to hold mail.

The key's type chooses the algorithm: an RSA key signs rsa-sha256, an Ed25519 key ed25519-sha256
(RFC 8463; dkimpy does that with PyNaCl, and takes the key as its base64 seed, not as PEM).

dkimpy needs the whole message in memory to sign it, so a signed message is held in memory while
it is being delivered (unsigned ones still stream from the spool).
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable, Mapping, Sequence
from email.utils import getaddresses
from typing import IO, Any

import attrs
from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.address import domain_of
from mailrelay.config import DKIMConfig
from mailrelay.envelope import Envelope, Recipient, Reply, Route
from mailrelay.errors import ConfigError
from mailrelay.interfaces import IDeliverer

log = Logger()

#: Look for the From header only in this much of the message head.
HEADER_LIMIT = 256 * 1024
_FROM = re.compile(rb"(?im)^from[ \t]*:((?:.*)(?:\r?\n[ \t].*)*)")


@attrs.frozen
class DomainKey:
    domain: str
    selector: str
    private_key: bytes  # as dkimpy takes it: PEM for RSA, the base64 seed for Ed25519
    algorithm: bytes = b"rsa-sha256"


def dkimpy_key(pem: bytes) -> tuple[bytes, bytes]:
    """A PEM private key as dkimpy signs with it, and the signature algorithm its type calls for."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

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


def load_keys(config: DKIMConfig, source: str = "<config>") -> dict[str, DomainKey]:
    """Every configured domain's key, read now: a missing or unreadable key is a ``ConfigError``."""
    import dkim

    keys = {}
    for domain in config.domains:
        assert config.key_file is not None
        path = config.key_file.replace("{domain}", domain)
        try:
            with open(path, "rb") as f:
                pem = f.read()
        except OSError as e:
            raise ConfigError(source, "dkim.key_file", f"{path}: {e.strerror or e}") from None
        try:  # sign a tiny message: the key parses and dkimpy can use it
            private_key, algorithm = dkimpy_key(pem)
            dkim.sign(
                b"From: a@" + domain.encode() + b"\r\n\r\n",
                config.selector.encode(),
                domain.encode(),
                private_key,
                signature_algorithm=algorithm,
            )
        except Exception as e:
            raise ConfigError(
                source, "dkim.key_file", f"{path}: not a usable private key ({e})"
            ) from None
        keys[domain] = DomainKey(domain, config.selector, private_key, algorithm)
    return keys


def from_domain(head: bytes) -> str | None:
    """The domain of the (first) ``From:`` address in the message head."""
    end = head.find(b"\r\n\r\n")
    m = _FROM.search(head if end < 0 else head[:end])
    if not m:
        return None
    addresses = getaddresses([m.group(1).decode("utf-8", "replace")])
    for _, address in addresses:
        if "@" in address:
            return domain_of(address)  # canonical; str.lower() would fold look-alikes (U+212A)
    return None


class DKIMSigner:
    """Signs messages for the domains of ``keys``."""

    def __init__(self, keys: Mapping[str, DomainKey]) -> None:
        self.keys = dict(keys)

    @classmethod
    def from_config(cls, config: DKIMConfig, source: str = "<config>") -> DKIMSigner:
        return cls(load_keys(config, source))

    def key_for(self, envelope: Envelope, head: bytes) -> DomainKey | None:
        for domain in (from_domain(head), domain_of(envelope.sender) if envelope.sender else None):
            if domain and domain in self.keys:
                return self.keys[domain]
        return None

    def sign(self, message: bytes, key: DomainKey) -> bytes:
        """The ``DKIM-Signature:`` header (CRLF-terminated) for ``message``; blocking (RSA is slow)."""
        import dkim

        signature: bytes = dkim.sign(
            message,
            key.selector.encode(),
            key.domain.encode(),
            key.private_key,
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=key.algorithm,
            linesep=b"\r\n",
        )
        return signature


@implementer(IDeliverer)
class DKIMSigningDeliverer:
    """An ``IDeliverer`` that signs each message for its sender domain, then hands it on."""

    def __init__(
        self, deliverer: IDeliverer, signer: DKIMSigner, reactor: Any, threadpool: Any
    ) -> None:
        self.deliverer = deliverer
        self.signer = signer
        self.reactor = reactor
        self.threadpool = threadpool

    def deliver(
        self,
        envelope: Envelope,
        recipients: Sequence[Recipient],
        route: Route,
        open_body: Callable[[], IO[bytes]],
    ) -> defer.Deferred[list[tuple[Reply, str | None]]]:
        if not self.signer.keys:
            return defer.maybeDeferred(
                self.deliverer.deliver, envelope, recipients, route, open_body
            )
        d = threads.deferToThreadPool(
            self.reactor, self.threadpool, self._signed, envelope, open_body
        )

        def signed(data: bytes | None) -> Any:
            body = open_body if data is None else (lambda: io.BytesIO(data))
            return self.deliverer.deliver(envelope, recipients, route, body)

        return d.addCallback(signed)

    def _signed(self, envelope: Envelope, open_body: Callable[[], IO[bytes]]) -> bytes | None:
        """In the pool: the signed message, or None to send it as it is."""
        with open_body() as f:
            head = f.read(HEADER_LIMIT)
            key = self.signer.key_for(envelope, head)
            if key is None:
                return None
            message = head + f.read()
        try:
            return self.signer.sign(message, key) + message
        except Exception as e:
            log.warn(
                "DKIM: cannot sign a message from <{sender}> for {domain}, sending it unsigned: {error}",
                sender=envelope.sender,
                domain=key.domain,
                error=str(e),
            )
            return None

    def __getattr__(self, name: str) -> Any:  # stop(), pool, ... of the wrapped deliverer
        return getattr(self.deliverer, name)
