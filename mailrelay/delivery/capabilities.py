"""What each next hop offered when we last connected: so a message it cannot take can be
refused while the client is still there, instead of accepted and bounced to a forged sender.

A bounded memory (the hops seen most recently), filled by the deliverer at each new session.
A route is judged only when every one of its hops is known: an unknown hop may take anything.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable

import attrs

from mailrelay.envelope import Envelope, NextHop, Recipient, Reply, Route

#: Hops remembered; the least recently seen go first.
MAX_HOPS = 10_000


@attrs.frozen
class Offer:
    """The part of a hop's EHLO that decides what it can take."""

    smtputf8: bool
    size_limit: int | None  # its SIZE, None for none declared


class HopCapabilities:
    def __init__(self, max_hops: int = MAX_HOPS) -> None:
        self.max_hops = max_hops
        self._seen: OrderedDict[tuple[str, int], Offer] = OrderedDict()
        # what refuses_any needs without a pass over every hop: how many lack SMTPUTF8, and how
        # many declared each size limit (a few distinct values)
        self._no_smtputf8 = 0
        self._limits: Counter[int] = Counter()

    def saw(self, hop: NextHop, extensions: Iterable[str], size_limit: int | None) -> None:
        """Record what ``hop`` offered on a new session."""
        key = (hop.host.lower(), hop.port)
        old = self._seen.pop(key, None)
        if old is not None:
            self._count(old, -1)
        offer = Offer("SMTPUTF8" in extensions, size_limit)
        self._seen[key] = offer
        self._count(offer, 1)
        while len(self._seen) > self.max_hops:
            self._count(self._seen.popitem(last=False)[1], -1)

    def _count(self, offer: Offer, n: int) -> None:
        self._no_smtputf8 += 0 if offer.smtputf8 else n
        if offer.size_limit is not None:
            self._limits[offer.size_limit] += n
            if not self._limits[offer.size_limit]:
                del self._limits[offer.size_limit]

    def offer(self, hop: NextHop) -> Offer | None:
        return self._seen.get((hop.host.lower(), hop.port))

    def refuses_any(self, envelope: Envelope, size: int | None) -> bool:
        """Whether some known hop would refuse this message (cheap: no routing needed to say no)."""
        if (
            envelope.smtputf8
            and self._no_smtputf8
            and not ascii_addresses(envelope.sender, envelope.recipients)
        ):
            return True
        size = size if size is not None else envelope.size
        return size is not None and bool(self._limits) and size > min(self._limits)

    def refusal(self, envelope: Envelope, route: Route, size: int | None = None) -> Reply | None:
        """The reply for a message no hop of ``route`` can take (each known to refuse it), or None.

        ``size`` is the message's size in octets, when known (else its declared SIZE counts)."""
        first: Reply | None = None
        for hop in route.hops:
            offer = self.offer(hop)
            reply = self._refuses(offer, envelope, size) if offer is not None else None
            if reply is None:
                return None  # this hop may take it
            first = first or reply
        return first

    @staticmethod
    def _refuses(offer: Offer, envelope: Envelope, size: int | None) -> Reply | None:
        if (
            envelope.smtputf8
            and not offer.smtputf8
            and not ascii_addresses(envelope.sender, envelope.recipients)
        ):
            # (all-ASCII addresses: the header section decides, which only the delivery reads)
            return Reply(
                553, "5.6.7", "the next hop does not support SMTPUTF8, which this message needs"
            )
        size = size if size is not None else envelope.size
        if size is not None and offer.size_limit is not None and size > offer.size_limit:
            return Reply(
                552,
                "5.3.4",
                f"message size {size} exceeds the next hop's size limit {offer.size_limit}",
            )
        return None


def ascii_addresses(sender: str, recipients: Iterable[Recipient]) -> bool:
    """Whether every address is ASCII: then a message received with SMTPUTF8 needs it onward only
    for its header section (RFC 6531 3.2)."""
    return sender.isascii() and all(r.address.isascii() for r in recipients)
