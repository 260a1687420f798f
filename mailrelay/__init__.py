"""mailrelay: a mail transfer agent framework on Twisted.

The public surface is re-exported here; everything else is subject to change. A router plugin
needs ``IRouter``, ``Route``/``NextHop``, the failures, ``RouterContext`` (what its factory is
given) and ``parse_hostport``; its tests, ``mailrelay.testing`` (``router_context``, the fakes).
An embedder needs ``MailRelayService``, ``RelayObserver`` and ``mailrelay.config``.
"""

import importlib
from typing import TYPE_CHECKING

from mailrelay.config import parse_hostport
from mailrelay.envelope import (
    Envelope,
    NextHop,
    QueuedMessage,
    Recipient,
    RecipientState,
    RecipientStatus,
    Reply,
    Route,
    TLSPolicy,
)
from mailrelay.errors import ConfigError, PermanentFailure, TemporaryFailure
from mailrelay.interfaces import (
    IDeliverer,
    IMessageSink,
    IMessageWriter,
    IPolicy,
    IQueueStore,
    IRouter,
    IRouterFactory,
)

if TYPE_CHECKING:  # imported on first use, below
    from mailrelay.observer import RelayObserver
    from mailrelay.routing.context import RouterContext
    from mailrelay.service import MailRelayService

__version__ = "0.1.0"


#: Names imported only when asked for, by their module: these pull in every room (RouterContext:
#: the routing package, its routers and their libraries).
_LAZY = {
    "MailRelayService": "mailrelay.service",
    "RelayObserver": "mailrelay.observer",
    "RouterContext": "mailrelay.routing.context",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mailrelay' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "ConfigError",
    "Envelope",
    "IDeliverer",
    "IMessageSink",
    "IMessageWriter",
    "IPolicy",
    "IQueueStore",
    "IRouter",
    "IRouterFactory",
    "MailRelayService",
    "NextHop",
    "PermanentFailure",
    "QueuedMessage",
    "Recipient",
    "RecipientState",
    "RecipientStatus",
    "RelayObserver",
    "Reply",
    "Route",
    "RouterContext",
    "TemporaryFailure",
    "TLSPolicy",
    "parse_hostport",
]
