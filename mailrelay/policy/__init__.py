"""Who may send what where: the server-side policies and the chain that runs them.

``PolicyChain`` runs its policies in order at each stage; the first objection (a ``Reply``) wins.
Any policy may answer through a Deferred; the chain waits for it before asking the next one.
``build_policy`` makes the chain a listener needs from ``ServerConfig``, plus an embedder's extras.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from mailrelay.config import ServerConfig
from mailrelay.interfaces import IPolicy
from mailrelay.policy.access import RelayAccess
from mailrelay.policy.chain import Policy, PolicyChain


def build_policy(server: ServerConfig, extra: Sequence[IPolicy] = ()) -> IPolicy:
    """The standard checks for a listener (relay access first), then the embedder's ``extra``."""
    access = RelayAccess(server.trusted_networks, server.local_domains, server.relay_domains)
    return cast(IPolicy, PolicyChain([access, *extra]))  # it provides IPolicy (implementer)


__all__ = ["Policy", "PolicyChain", "build_policy"]
