"""DKIM signing (RFC 6376) of outgoing mail, per sender domain: RSA-SHA256 and Ed25519-SHA256
(RFC 8463), c=relaxed/relaxed, the header fields RFC 6376 recommends, From signed twice.

The signing domain is the ``From:`` header's domain when it is one of ours (what DMARC aligns
on), else the envelope sender's. A message that cannot be signed goes out unsigned, with a log
line, as OpenDKIM does by default: a signature is never a reason to hold mail.

A message is signed as it streams past, never whole in memory: ``MessageSigner`` keeps its header
section and a running hash of its canonical body, and signs at the end (in a thread).

- ``keys``: the domains' keys, parsed once (``DomainKey``).
- ``body``: the body hash, fed in pieces (``RelaxedBodyHash``).
- ``header``: the ``DKIM-Signature:`` field from a header section and a body hash.
- ``signer``: which key signs a message (``DKIMSigner``) and the per-message stream signer.
- ``prefixed``: the stored message with the signature in front, as delivery reads it.
- ``deliverer``: signing at delivery (today's wiring, ``DKIMSigningDeliverer``).
- ``intake``: signing once per message before commit (``SigningSink``), to replace it.
"""

from mailrelay.dkim.deliverer import DKIMSigningDeliverer, sign_file
from mailrelay.dkim.intake import IPrependingWriter, SigningSink, SigningWriter
from mailrelay.dkim.keys import DomainKey, dkimpy_key, domain_key
from mailrelay.dkim.prefixed import PrefixedBody, prefixed
from mailrelay.dkim.signer import (
    HEADER_LIMIT,
    DKIMSigner,
    MessageSigner,
    from_domain,
    load_keys,
)

__all__ = [
    "HEADER_LIMIT",
    "DKIMSigner",
    "DKIMSigningDeliverer",
    "DomainKey",
    "IPrependingWriter",
    "MessageSigner",
    "PrefixedBody",
    "SigningSink",
    "SigningWriter",
    "dkimpy_key",
    "domain_key",
    "from_domain",
    "load_keys",
    "prefixed",
    "sign_file",
]
