"""Signing at intake: once per message, as it is received, before it is committed.

``SigningSink`` stands in front of the store's ``IMessageSink`` (the door the SMTP server writes
through, and the queue's own reports). Each message's octets go to the store's writer and, on the
reactor thread, to a ``MessageSigner`` (cheap: the header section and a running hash). At commit
the signature is computed in the thread pool (RSA), handed to the writer with ``prepend`` and only
then is the writer committed: the signature is durable with the message, so the 250 that follows
the commit covers it, and delivery sends it in front of the stored message on every attempt
without signing again. A message that cannot be signed is committed unsigned (with a log line).

The store's writers must provide ``IPrependingWriter``: the store keeps the octets in the
message's record (committed with it) and hands them back as ``QueuedMessage.prefix``; the queue
manager delivers ``PrefixedBody(message.prefix, store.open_body(qid))``. Every other reader of
``open_body`` (bounces quoting the message, ``mailrelay queue show``) sees the text as received,
as today. Not wired yet: ``DKIMSigningDeliverer`` still signs at delivery.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, threads
from zope.interface import implementer

from mailrelay.dkim.signer import DKIMSigner, MessageSigner
from mailrelay.envelope import Envelope
from mailrelay.interfaces import IMessageSink, IMessageWriter


class IPrependingWriter(IMessageWriter):
    """A message writer that can also store header fields to deliver in front of the message."""

    def prepend(header):  # type: ignore[no-untyped-def]  # zope interface: no self
        """Deliver ``header`` (whole header fields, CRLF-terminated octets) in front of the
        message. At most once, before ``commit()``; durable with the commit."""


@implementer(IMessageSink)
class SigningSink:
    """The store's ``IMessageSink`` with DKIM signing in front (``signer`` may be swapped)."""

    def __init__(self, sink: Any, signer: DKIMSigner, reactor: Any, threadpool: Any) -> None:
        self.sink = sink
        self.signer = signer
        self.reactor = reactor
        self.threadpool = threadpool

    def open(self, envelope: Envelope) -> Any:
        writer = self.sink.open(envelope)
        stream = self.signer.start(envelope)
        if stream is None:
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
