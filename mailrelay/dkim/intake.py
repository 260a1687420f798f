"""Signing at intake: once per message, as it is received, before it is committed.

``SigningSink`` stands in front of the store's ``IMessageSink``: the door the SMTP server writes
through, and the queue's reports to senders (``Notifier``). Each message's octets go to the
store's writer and, on the reactor thread, to a ``MessageSigner`` (cheap: the header section and
a running hash). At commit the signature is computed in the thread pool (RSA), handed to the
writer with ``prepend`` and only then is the writer committed: the signature is durable with the
message, so the 250 that follows the commit covers it, and delivery sends it in front of the
stored text on every attempt without signing again (``queue.body.prefixed``). Its ``t=`` is the
time of that commit. A message that cannot be signed is committed unsigned (with a log line).

A writer that cannot keep a prefix (not ``IPrependingWriter``: an embedder's own store) is used
as it is, and its messages go out unsigned, with one log line. ``signer`` may be swapped at any
time (SIGHUP); a message keeps the keys that were in force when it was opened.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.dkim.signer import DKIMSigner, MessageSigner
from mailrelay.envelope import Envelope
from mailrelay.interfaces import IMessageSink, IMessageWriter, IPrependingWriter

log = Logger()


@implementer(IMessageSink)
class SigningSink:
    """The store's ``IMessageSink`` with DKIM signing in front (``signer`` may be swapped)."""

    def __init__(self, sink: Any, signer: DKIMSigner, reactor: Any, threadpool: Any) -> None:
        self.sink = sink
        self.signer = signer
        self.reactor = reactor
        self.threadpool = threadpool
        self._warned = False

    def open(self, envelope: Envelope) -> Any:
        writer = self.sink.open(envelope)
        stream = self.signer.start(envelope)
        if stream is None:
            return writer
        if not IPrependingWriter.providedBy(writer):
            if not self._warned:
                self._warned = True
                log.warn(
                    "DKIM: the store's writer {writer} cannot keep a signature "
                    "(no IPrependingWriter): mail goes out unsigned",
                    writer=type(writer).__name__,
                )
            return writer
        return SigningWriter(writer, stream, self.reactor, self.threadpool)


@implementer(IMessageWriter)
class SigningWriter:
    """A store's writer that also feeds the message to a ``MessageSigner``."""

    def __init__(self, writer: Any, stream: MessageSigner, reactor: Any, threadpool: Any) -> None:
        self.writer = writer
        self.stream = stream
        self.reactor = reactor
        self.threadpool = threadpool

    @property
    def queue_id(self) -> str:
        queue_id: str = self.writer.queue_id
        return queue_id

    def write(self, data: bytes) -> None:
        self.stream.feed(data)
        self.writer.write(data)

    def commit(self) -> defer.Deferred[Any]:
        if self.stream.done:  # no key applies: nothing to wait for
            return defer.maybeDeferred(self.writer.commit)
        d = threads.deferToThreadPool(
            self.reactor, self.threadpool, self.stream.signature, int(self.reactor.seconds())
        )
        return d.addCallback(self._signed)

    def _signed(self, signature: bytes | None) -> Any:
        if signature is not None:
            self.writer.prepend(signature)
        return self.writer.commit()

    def abort(self) -> Any:
        return self.writer.abort()
