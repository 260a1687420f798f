"""Embedding mailrelay: a Twisted program that serves its own web page and relays mail.

    python examples/embed.py mailrelay.toml [WEB-ENDPOINT]

The program owns its service tree; ``MailRelayService`` is one branch of it, next to a
twisted.web site (``tcp:8080:interface=127.0.0.1`` unless given) that shows what the relay did.
An observer of our own (``LastMessages``) hears of every accepted message through the same
interface that feeds the relay's Prometheus counters. The relay's log (a line per connection,
message and delivery attempt) goes to stdout. SIGTERM or Ctrl-C stops the whole tree gracefully:
the relay lets sessions finish their message, then stops its queue.
"""

from __future__ import annotations

import collections
import sys
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web import resource, server

from mailrelay import ConfigError, MailRelayService, RelayObserver, config


class LastMessages(RelayObserver):
    """Remembers the last few accepted messages (an embedder's own observer)."""

    def __init__(self, keep: int = 10) -> None:
        self.messages: collections.deque[str] = collections.deque(maxlen=keep)

    def message_accepted(self, info: Any, envelope: Any, queue_id: str, size: int) -> None:
        self.messages.append(f"{queue_id} from=<{envelope.sender}> size={size}")


class StatusPage(resource.Resource):
    isLeaf = True

    def __init__(self, relay: MailRelayService, last: LastMessages) -> None:
        super().__init__()
        self.relay = relay
        self.last = last

    def render_GET(self, request: Any) -> bytes:
        sample = self.relay.metrics.registry.get_sample_value
        lines = [
            "mailrelay embedded in my program",
            f"accepted: {sample('mailrelay_messages_accepted_total'):.0f}",
            f"delivered: {sample('mailrelay_deliveries_total', {'outcome': 'sent'}) or 0:.0f}",
            f"queued: {len(self.relay.manager.scheduled())}",
            "last messages:",
            *self.last.messages,
        ]
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return ("\n".join(lines) + "\n").encode()


def build(cfg: config.Config, web_endpoint: str) -> service.MultiService:
    """The program's service tree: the relay and our web page."""
    app = service.MultiService()
    last = LastMessages()
    relay = MailRelayService(cfg, observers=[last])
    relay.setServiceParent(app)
    site = server.Site(StatusPage(relay, last))
    StreamServerEndpointService(serverFromString(reactor, web_endpoint), site).setServiceParent(app)
    return app


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        sys.stderr.write(__doc__ or "")
        return 2
    try:
        cfg = config.load(argv[1])
    except ConfigError as e:
        sys.stderr.write(f"embed: {e}\n")
        return 1
    # The relay logs through twisted.logger; a program of its own (not twistd) says where the lines
    # go.
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    app = build(cfg, argv[2] if len(argv) > 2 else "tcp:8080:interface=127.0.0.1")
    app.startService()
    # reactor.stop() (SIGTERM, SIGINT) runs this before the reactor shuts down, and waits for it
    reactor.addSystemEventTrigger("before", "shutdown", app.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
