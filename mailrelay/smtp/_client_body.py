"""Streaming the message text: a pull producer that writes as fast as the transport drains."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import IO, Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall

from mailrelay.smtp._client_state import ClientFailure
from mailrelay.smtp._client_wire import normalise_crlf

CHUNK_SIZE = 64 * 1024


def bdat_frames(body: IO[bytes], binary: bool) -> Iterator[tuple[bytes, bool]]:
    """``(BDAT n [LAST] + chunk, last)`` for the body, read a chunk at a time (RFC 3030).

    Text gets CRLF line endings as in DATA (no dot-stuffing); BINARYMIME goes byte for byte. The
    next chunk is read before a frame is yielded: a frame knows whether it is the last.
    """
    pending = False
    chunk = body.read(CHUNK_SIZE)
    while True:
        nxt = body.read(CHUNK_SIZE) if chunk else b""
        data, pending = (chunk, False) if binary else normalise_crlf(chunk, pending)
        if not nxt and pending:
            data, pending = data + b"\r\n", False
        last = not nxt
        yield b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data, last
        if last:
            return
        chunk = nxt


class BodyProducer:
    """A pull producer writing the message body in chunks, as fast as the transport drains.

    Fires its ``run()`` Deferred with ``None`` once the end (``finish()``) is written, or with a
    ``ClientFailure`` when the connection dies or no chunk could be written for ``data_block``
    seconds.
    """

    def __init__(
        self,
        client: Any,
        body: IO[bytes],
        first: bytes,
        transform: Callable[[bytes], bytes],
        finish: Callable[[], bytes],
    ) -> None:
        self.client, self.body, self.first = client, body, first
        self.transform, self.finish = transform, finish
        self.done: defer.Deferred[ClientFailure | None] = defer.Deferred()
        self.timer: IDelayedCall | None = None

    def run(self) -> defer.Deferred[ClientFailure | None]:
        self.client._producer = self
        self._arm()
        self.client.transport.registerProducer(self, False)
        return self.done

    def resumeProducing(self) -> None:
        if self.done.called:
            return
        self._arm()
        chunk, self.first = (self.first, b"") if self.first else (self.body.read(CHUNK_SIZE), b"")
        transport = self.client.transport
        if chunk:
            transport.write(self.transform(chunk))
            return
        transport.write(self.finish())
        self._end(None)
        transport.unregisterProducer()

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stop(ClientFailure("data", "connection lost while sending the message"))

    def stop(self, failure: ClientFailure) -> None:
        self._end(failure)

    def _arm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = self.client.clock.callLater(self.client.timeouts.data_block, self._timed_out)

    def _timed_out(self) -> None:
        self.timer = None
        self._end(ClientFailure("data", "timeout sending the message text"))
        self.client.abort("timeout sending the message text")

    def _end(self, result: ClientFailure | None) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.client._producer is self:
            self.client._producer = None
        if not self.done.called:
            self.done.callback(result)
