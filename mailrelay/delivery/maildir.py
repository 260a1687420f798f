"""``MaildirDeliverer``: a route's message written into a local Maildir, one file per recipient.

The local capture a ``maildir`` route asks for (``[[routes]] type = "static"`` with ``maildir``): a
demo domain, or mail kept on this machine for a test or another program to read. Delivery is
final, as an MDA's is: each file is written in ``tmp/``, fsynced and renamed into ``new/`` (the
Maildir protocol) before its recipient counts as delivered, so a reader never sees half a message.
Like Postfix's local delivery, each copy starts with ``Return-Path:`` and ``Delivered-To:`` and its
lines end in LF. A file that cannot be written is a temporary failure (451 4.3.0), retried.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import IO, Any

from twisted.internet import defer, threads
from zope.interface import implementer

from mailrelay._files import fsync_dir, write_all
from mailrelay.envelope import Envelope, Recipient, Reply, Route
from mailrelay.interfaces import IDeliverer

Result = tuple[Reply, str | None]


def maildir_copy(envelope: Envelope, recipient: Recipient, body: bytes) -> bytes:
    """The bytes of one recipient's file: the delivery headers, then the message with LF lines."""
    head = f"Return-Path: <{envelope.sender}>\nDelivered-To: {recipient.address}\n".encode()
    return head + body.replace(b"\r\n", b"\n")


def write_maildir(directory: str, name: str, data: bytes) -> str:
    """Write ``data`` as ``new/<name>`` of the Maildir ``directory`` (made if missing); its path."""
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    tmp = os.path.join(directory, "tmp", name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    final = os.path.join(directory, "new", name)
    os.rename(tmp, final)
    fsync_dir(
        os.path.join(directory, "new")
    )  # the rename itself is durable before we say "delivered"
    return final


@implementer(IDeliverer)
class MaildirDeliverer:
    """Delivers routes that have ``maildir`` set; the file work runs in ``threadpool``.

    ``clock`` and ``randbytes`` make the unique file names (``<seconds>.<random>.<hostname>``,
    as Maildir asks); ``threadpool`` ``None`` writes on the calling thread (tests).
    """

    def __init__(
        self,
        reactor: Any,
        threadpool: Any,
        hostname: str,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.reactor = reactor
        self.threadpool = threadpool
        self.hostname = hostname.replace("/", "_").replace(":", "_")
        self.randbytes = randbytes

    def deliver(
        self,
        envelope: Envelope,
        recipients: Sequence[Recipient],
        route: Route,
        open_body: Callable[[], IO[bytes]],
    ) -> defer.Deferred[list[Result]]:
        if route.maildir is None:
            return defer.succeed(
                [(Reply(451, "4.3.0", "no maildir for this route"), None)] * len(recipients)
            )
        names = [
            f"{int(self.reactor.seconds())}.{self.randbytes(8).hex()}.{self.hostname}"
            for _ in recipients
        ]
        try:
            body = open_body()  # on the reactor thread: the store's own state is not thread-safe
        except (OSError, KeyError) as e:
            reply = Reply(451, "4.3.0", f"cannot read the queued message: {e}")
            return defer.succeed([(reply, None)] * len(recipients))
        args = (route.maildir, envelope, list(recipients), names, body)
        if self.threadpool is None:
            return defer.maybeDeferred(self._write_all, *args)
        return threads.deferToThreadPool(self.reactor, self.threadpool, self._write_all, *args)

    @staticmethod
    def _write_all(
        directory: str,
        envelope: Envelope,
        recipients: list[Recipient],
        names: list[str],
        body_file: IO[bytes],
    ) -> list[Result]:
        remote = f"maildir:{directory}"
        try:
            with body_file:
                body = body_file.read()
        except OSError as e:
            return [
                (Reply(451, "4.3.0", f"cannot read the queued message: {e.strerror or e}"), None)
            ] * len(recipients)
        results: list[Result] = []
        for recipient, name in zip(recipients, names, strict=True):
            try:
                path = write_maildir(directory, name, maildir_copy(envelope, recipient, body))
            except OSError as e:
                results.append(
                    (Reply(451, "4.3.0", f"cannot write to {directory}: {e.strerror or e}"), remote)
                )
            else:
                results.append((Reply(250, "2.0.0", f"delivered to {path}"), remote))
        return results
