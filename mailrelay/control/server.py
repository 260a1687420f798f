"""The control channel of a running instance: AMP over a UNIX socket only its owner may use.

``MailRelayService`` starts a ``ControlServer`` on ``<spool path>/control.sock`` (see
``socket_path``); ``mailrelay queue ...`` connects to it. The socket is created mode 0600 inside
the spool directory, which the spool keeps at 0700.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Generator
from typing import Any, TypeAlias

from twisted.internet import defer
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from mailrelay._log import plural
from mailrelay._quiet import QuietFactory
from mailrelay.control import info, protocol
from mailrelay.interfaces import IBatchLoader, IQueueStore
from mailrelay.queue.manager import QueueManager
from mailrelay.queue.store import is_queue_id

#: What an ``inlineCallbacks`` generator yields and is sent: Deferreds and their results.
Steps: TypeAlias = Generator[defer.Deferred[Any], Any, Any]

log = Logger()

SOCKET_NAME = "control.sock"


def socket_path(spool_path: str) -> str:
    """Where the control socket of the instance whose spool is at ``spool_path`` lives."""
    return os.path.join(spool_path, SOCKET_NAME)


class ControlProtocol(amp.AMP):
    """Answers the commands of ``mailrelay.control.protocol`` from the manager and the store."""

    def __init__(
        self, manager: QueueManager, store: IQueueStore, clock: Any, metrics: Any = None
    ) -> None:
        super().__init__()
        self.manager = manager
        self.store: Any = store  # an IQueueStore (mypy sees no zope interface as a type)
        self.clock = clock
        self.metrics = metrics  # a prometheus_client registry, or None
        self._ids: list[str] | None = None

    def _check(self, queue_id: str) -> None:
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)

    @defer.inlineCallbacks
    def _info(self, queue_id: str, detail: bool = False) -> Steps:
        message = yield self.store.load(queue_id)
        due = self.manager.scheduled().get(queue_id)
        active = self.manager.is_active(queue_id)
        try:
            body = self.store.open_body(queue_id)
        except (KeyError, OSError):
            body = None
        if detail:
            return info.message_detail(message, body, due, active)
        return info.message_info(message, info.body_size(body) if body else None, due, active)

    @defer.inlineCallbacks
    def _load_many(self, ids: list[str]) -> Steps:
        """The messages of ``ids`` still queued; in one pass when the store can
        (``IBatchLoader``)."""
        if IBatchLoader.providedBy(self.store):
            return (yield self.store.load_many(ids))
        out = []
        for qid in ids:
            try:
                out.append((yield self.store.load(qid)))
            except KeyError:
                continue  # delivered while we listed
        return out

    @protocol.ListQueue.responder
    @defer.inlineCallbacks
    def list_queue(self, limit: int, after: str | None = None) -> Steps:
        if after is None or self._ids is None:
            self._ids = sorted((yield self.store.list_ids()))  # once per listing, not per page
        ids = [i for i in self._ids if i > after] if after else self._ids
        page, more = ids[: max(1, limit)], len(ids) > limit
        scheduled = self.manager.scheduled()
        out = []
        for message in (yield self._load_many(page)):
            qid = message.queue_id
            try:
                size = info.body_size(self.store.open_body(qid))
            except (KeyError, OSError):
                continue
            out.append(
                info.message_info(message, size, scheduled.get(qid), self.manager.is_active(qid))
            )
        return {"messages": out, "more": more}

    @protocol.ShowMessage.responder
    @defer.inlineCallbacks
    def show(self, queue_id: str) -> Steps:
        self._check(queue_id)
        return {"message": (yield self._info(queue_id, detail=True))}

    @protocol.Summary.responder
    @defer.inlineCallbacks
    def summary(self) -> Steps:
        messages = yield self._load_many(sorted((yield self.store.list_ids())))
        infos = (info.message_info(m, None) for m in messages)
        return {"summary": info.summary(infos, self.clock.seconds())}

    @protocol.Flush.responder
    @defer.inlineCallbacks
    def flush(self, queue_id: str | None = None) -> Steps:
        if queue_id is not None:
            self._check(queue_id)
            message = yield self.store.load(queue_id)  # KeyError when there is no such message
            if message.held:
                raise protocol.MessageHeld(queue_id)
        count = yield self.manager.flush(queue_id)
        log.info(
            "control: flush {what} ({messages})",
            what=queue_id or "all",
            count=count,
            messages=plural(count, "message"),
        )
        return {"count": count}

    @protocol.Delete.responder
    @defer.inlineCallbacks
    def delete(self, queue_id: str) -> Steps:
        self._check(queue_id)
        yield self.manager.delete(queue_id)
        log.info("{queue_id}: removed by the operator", queue_id=queue_id)
        return {}

    @protocol.Hold.responder
    @defer.inlineCallbacks
    def hold(self, queue_id: str) -> Steps:
        self._check(queue_id)
        yield self.manager.hold(queue_id)
        log.info("{queue_id}: held by the operator", queue_id=queue_id)
        return {}

    @protocol.Metrics.responder
    def metrics_text(self) -> dict[str, str]:
        from prometheus_client import generate_latest

        return {"text": generate_latest(self.metrics).decode() if self.metrics is not None else ""}

    @protocol.Release.responder
    @defer.inlineCallbacks
    def release(self, queue_id: str) -> Steps:
        self._check(queue_id)
        yield self.manager.release(queue_id)
        log.info("{queue_id}: released by the operator", queue_id=queue_id)
        return {}


class ControlFactory(QuietFactory):
    """The control socket's factory (its name is in the listener's "starting on" line)."""


class ControlServer:
    """Listens on ``socket_path`` (mode 0600) for the CLI while started.

    A socket left by a crashed instance is replaced; one that a live instance answers on is not
    (``start`` fails instead, so two instances never share a spool unknowingly).
    """

    def __init__(
        self,
        manager: QueueManager,
        store: IQueueStore,
        socket_path: str,
        reactor: Any = None,
        metrics: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.manager = manager
        self.store = store
        self.socket_path = socket_path
        self.reactor = reactor
        self.metrics = metrics
        self.port: Any = None  # the IListeningPort, once listening

    def _factory(self) -> Factory:
        return ControlFactory.forProtocol(
            lambda: ControlProtocol(self.manager, self.store, self.reactor, self.metrics)
        )

    @defer.inlineCallbacks
    def start(self) -> Steps:
        """Listen; a Deferred that fires with the port (or fails if a live instance holds the
        socket)."""
        self._remove_stale()
        endpoint = UNIXServerEndpoint(self.reactor, self.socket_path, mode=0o600)
        self.port = yield endpoint.listen(self._factory())
        os.chmod(self.socket_path, 0o600)
        log.info("control channel on {path}", path=self.socket_path)
        return self.port

    def _remove_stale(self) -> None:
        if not os.path.exists(self.socket_path):
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.socket_path)
        except OSError:
            os.unlink(self.socket_path)  # nobody listens: left by a crash
            return
        finally:
            probe.close()
        raise RuntimeError(f"another mailrelay instance is running on {self.socket_path}")

    def stop(self) -> defer.Deferred[None]:
        if self.port is None:
            return defer.succeed(None)
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening)
