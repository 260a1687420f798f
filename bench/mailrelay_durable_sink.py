"""mailrelay's ESMTP server with each message made durable before its ``250``, and nothing else.

    python mailrelay_durable_sink.py HOST PORT

The floor under the relay's accept only: ``mailrelay_sink.py`` (the protocol alone), plus what
any durable server must do. The commits of one pass of a writer thread are appended to one file
with one ``pwritev(RWF_DSYNC)``, as the spool's writer does with its segments, and answered on
the reactor; no queue manager, no logs, no metrics, no Received header, no envelope on disk.
The gap between this and the relay is the relay's own machinery; the gap between this and the
protocol alone is the price of the durable ``250`` itself. The file is removed at exit.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import sys
import tempfile
import threading

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from zope.interface import implementer

from mailrelay.config import ServerConfig
from mailrelay.interfaces import IMessageSink, IMessageWriter
from mailrelay.listener import server_factory
from mailrelay.policy import build_policy

_ids = itertools.count(1)
_WRAP = 256 * 2**20


class Appender:
    """One writer thread: appends what was committed since its last pass, synced, then answers."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.offset = 0
        self.waiting: list[tuple[defer.Deferred[str], str, bytes]] = []
        self.ready = threading.Condition()
        threading.Thread(target=self._run, name="durable-writer", daemon=True).start()

    def commit(self, queue_id: str, data: bytes) -> defer.Deferred[str]:
        d: defer.Deferred[str] = defer.Deferred()
        with self.ready:
            self.waiting.append((d, queue_id, data))
            self.ready.notify()
        return d

    def _run(self) -> None:
        while True:
            with self.ready:
                while not self.waiting:
                    self.ready.wait()
                batch, self.waiting = self.waiting, []
            buffers = [data for _, _, data in batch]
            if self.offset > _WRAP:
                self.offset = (
                    0  # the bytes are never read back: write over them, the file stays small
                )
            os.pwritev(self.fd, buffers, self.offset, os.RWF_DSYNC)
            self.offset += sum(map(len, buffers))
            reactor.callFromThread(self._answer, batch)

    @staticmethod
    def _answer(batch: list[tuple[defer.Deferred[str], str, bytes]]) -> None:
        for d, queue_id, _ in batch:
            d.callback(queue_id)


@implementer(IMessageWriter)
class DurableWriter:
    def __init__(self, appender: Appender) -> None:
        self.appender = appender
        self.queue_id = f"D{next(_ids)}"
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def commit(self) -> defer.Deferred[str]:
        return self.appender.commit(self.queue_id, b"".join(self.parts))

    def abort(self) -> None:
        self.parts = []


@implementer(IMessageSink)
class DurableSink:
    def __init__(self, appender: Appender) -> None:
        self.appender = appender

    def open(self, envelope: object) -> DurableWriter:
        return DurableWriter(self.appender)


def main(host: str, port: int) -> None:
    fd, path = tempfile.mkstemp(prefix="mailrelay-durable-sink-")
    reactor.addSystemEventTrigger("after", "shutdown", os.unlink, path)
    config = ServerConfig(
        hostname="mailrelay-durable-sink",
        trusted_networks=(ipaddress.ip_network("127.0.0.0/8"),),
        max_message_size=200 * 2**20,
        max_connections=5000,
        max_connections_per_ip=5000,
    )
    factory = server_factory(config, DurableSink(Appender(fd)), build_policy(config), reactor)
    TCP4ServerEndpoint(reactor, port, backlog=1024, interface=host).listen(factory)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
