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
- ``intake``: signing once per message, as it is received, before its commit (``SigningSink``,
  the door the SMTP server and the queue's reports write through). The store keeps the signature
  in the message's record; delivery sends it in front of the stored text (``queue.body``).
"""

from mailrelay.dkim.intake import SigningSink, SigningWriter
from mailrelay.dkim.keys import DomainKey, dkimpy_key, domain_key
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
    "DomainKey",
    "MessageSigner",
    "SigningSink",
    "SigningWriter",
    "dkimpy_key",
    "domain_key",
    "from_domain",
    "load_keys",
]
