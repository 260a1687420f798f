"""mailrelay: a mail transfer agent framework on Twisted.

The public surface is re-exported here; everything else is subject to change.
"""

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

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # MailRelayService pulls in every room; import it only when asked for.
    if name == "MailRelayService":
        from mailrelay.service import MailRelayService

        return MailRelayService
    raise AttributeError(f"module 'mailrelay' has no attribute {name!r}")


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
    "Reply",
    "Route",
    "TemporaryFailure",
    "TLSPolicy",
]
