"""Which key signs a message, and its signature computed while the message streams past.

``DKIMSigner`` holds the keys of the ``[dkim]`` domains. The signing domain is the ``From:``
header's domain when it is one of ours (what DMARC aligns on), else the envelope sender's.
``DKIMSigner.start(envelope)`` gives a ``MessageSigner`` for one message:

- ``feed(data)`` takes the message's octets as they arrive (as stored: CRLF line endings, cut
  anywhere). It runs on the reactor thread and is cheap: until the header section ends it keeps
  it (at most ``HEADER_LIMIT`` octets); then it chooses the key and, if there is one, feeds the
  body to a running hash (``body.RelaxedBodyHash``), keeping nothing of it. With no key it stops.
- ``signature(timestamp)``, after the last ``feed``, returns the ``DKIM-Signature:`` field
  (CRLF-terminated) to put in front of the message, or None. It blocks (RSA), so it is called
  from a thread; the object is used by one thread at a time, handed over with the Deferred.

A message that cannot be signed goes out unsigned, with a log line, as OpenDKIM does by default:
a signature is never a reason to hold mail. That includes a header section longer than
``HEADER_LIMIT`` (a message of that shape is not one a receiver would score anyway).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from email.utils import getaddresses

from twisted.logger import Logger

from mailrelay.address import domain_of
from mailrelay.config import DKIMConfig
from mailrelay.dkim.body import RelaxedBodyHash
from mailrelay.dkim.header import header_signature
from mailrelay.dkim.keys import DomainKey, domain_key
from mailrelay.envelope import Envelope
from mailrelay.errors import ConfigError

log = Logger()

#: The header section is kept up to this size; the From header is looked for only in it.
HEADER_LIMIT = 256 * 1024
_FROM = re.compile(rb"(?im)^from[ \t]*:((?:.*)(?:\r?\n[ \t].*)*)")


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


def load_keys(config: DKIMConfig, source: str = "<config>") -> dict[str, DomainKey]:
    """Every configured domain's key, read now: a missing or unreadable key is a ``ConfigError``."""
    keys = {}
    for domain in config.domains:
        assert config.key_file is not None
        path = config.key_file.replace("{domain}", domain)
        try:
            with open(path, "rb") as f:
                pem = f.read()
        except OSError as e:
            raise ConfigError(source, "dkim.key_file", f"{path}: {e.strerror or e}") from None
        try:  # sign a tiny message: the key parses and can sign
            key = domain_key(domain, config.selector, pem)
            DKIMSigner({}).sign(b"From: a@" + domain.encode() + b"\r\n\r\n", key, 0)
        except Exception as e:
            raise ConfigError(
                source, "dkim.key_file", f"{path}: not a usable private key ({e})"
            ) from None
        keys[domain] = key
    return keys


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

    def start(self, envelope: Envelope) -> MessageSigner | None:
        """A signer to feed this message to; None when no domain has a key (nothing to do)."""
        return MessageSigner(self, envelope) if self.keys else None

    def sign(self, message: bytes, key: DomainKey, timestamp: int) -> bytes:
        """The ``DKIM-Signature:`` field of a message in memory, signed with ``key``; raises
        when it cannot be signed. Blocking."""
        header, body = _split(message)
        digest = RelaxedBodyHash()
        digest.update(body)
        return header_signature(header, digest.digest(), key, timestamp)


class MessageSigner:
    """One message's signature, computed as its octets are fed (see the module docstring)."""

    def __init__(self, signer: DKIMSigner, envelope: Envelope) -> None:
        self._signer = signer
        self._sender = envelope.sender
        self._envelope = envelope
        self._head: bytearray | None = bytearray()  # until the header section ends
        self._scanned = 0  # where to look for its end next
        self._header = b""
        self._key: DomainKey | None = None
        self._body: RelaxedBodyHash | None = None  # while the body is being hashed
        self._problem = ""  # why a message with a key cannot be signed

    @property
    def done(self) -> bool:
        """True when the rest of the message cannot change the outcome (no key applies)."""
        return self._head is None and self._body is None

    @property
    def retained(self) -> int:
        """Octets of the message this object holds (bounded by ``HEADER_LIMIT`` plus a piece)."""
        return len(self._head or b"") + len(self._header)

    def feed(self, data: bytes) -> None:
        """The next octets of the message; cheap, for the reactor thread."""
        if self._body is not None:
            self._body.update(data)
            return
        head = self._head
        if head is None:
            return
        head += data
        end = _header_end(head, self._scanned)
        if end < 0:
            self._scanned = max(0, len(head) - 2)
            if len(head) > HEADER_LIMIT:
                self._head = None
                self._key = self._signer.key_for(self._envelope, bytes(head[:HEADER_LIMIT]))
                self._problem = f"its header section is longer than {HEADER_LIMIT} octets"
            return
        self._head = None
        self._header = bytes(head[:end])
        self._key = self._signer.key_for(self._envelope, self._header)
        if self._key is None:
            self._header = b""
            return
        self._body = RelaxedBodyHash()
        if end < len(head):
            self._body.update(bytes(head[end:]))

    def signature(self, timestamp: int) -> bytes | None:
        """After the last ``feed``: the ``DKIM-Signature:`` field to put in front of the message
        (CRLF-terminated), or None to send it as it is. Blocking (RSA): call it from a thread."""
        if self._head is not None:  # the message ended inside its header section
            self._header, self._head = bytes(self._head), None
            self._key = self._signer.key_for(self._envelope, self._header)
            self._body = RelaxedBodyHash()
        key, body, self._body = self._key, self._body, None
        if key is None:
            return None
        try:
            if body is None:
                raise ValueError(self._problem)
            return header_signature(self._header, body.digest(), key, timestamp)
        except Exception as e:
            log.warn(
                "DKIM: cannot sign a message from <{sender}> for {domain}, "
                "sending it unsigned: {error}",
                sender=self._sender,
                domain=key.domain,
                error=str(e),
            )
            return None


def _header_end(head: bytes | bytearray, start: int) -> int:
    """Where the body begins: after the first empty line (CRLF or a bare LF, as dkimpy reads
    lines); -1 while there is none."""
    if head[:1] == b"\n":
        return 1
    if head[:2] == b"\r\n":
        return 2
    end = -1
    for blank, n in ((b"\n\n", 2), (b"\n\r\n", 3)):
        i = head.find(blank, start)
        if i >= 0 and (end < 0 or i + n < end):
            end = i + n
    return end


def _split(message: bytes) -> tuple[bytes, bytes]:
    end = _header_end(message, 0)
    return (message, b"") if end < 0 else (message[:end], message[end:])
