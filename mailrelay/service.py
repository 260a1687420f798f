"""``MailRelayService``: the one place where the rooms are wired together — the embedding API.

Add it to any Twisted application::

    from mailrelay import config
    from mailrelay.service import MailRelayService
    MailRelayService(config.load("mailrelay.toml")).setServiceParent(application)

Everything that can be wrong in the config is checked when the service is *built*, so an embedding
program fails before it starts serving; sockets, threads and the queue start with ``startService``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailrelay.config import Config
from mailrelay.delivery import SMTPDeliverer
from mailrelay.interfaces import IDeliverer, IPolicy, IQueueStore, IRouter
from mailrelay.policy import build_policy
from mailrelay.policy.verify import RecipientVerification
from mailrelay.queue.manager import QueueManager
from mailrelay.queue.spool import FilesystemSpool
from mailrelay.routing.context import RouterContext
from mailrelay.routing.plugins import build_router
from mailrelay.smtp.server import SMTPServerFactory

log = Logger()


class _Listener(StreamServerEndpointService):
    """An endpoint service that fails loudly when it cannot listen and remembers its port."""

    _raiseSynchronously = True

    def __init__(self, description: str, endpoint: Any, factory: Any) -> None:
        super().__init__(endpoint, factory)
        self.description = description
        self.port: IListeningPort | None = None
        self.listening: defer.Deferred[IListeningPort] = defer.Deferred()

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._listened)  # type: ignore[union-attr]

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        log.info("listening on {description} ({address})", description=self.description,
                 address=port.getHost())
        self.listening.callback(port)
        return port


class MailRelayService(service.MultiService):
    """A complete relay: listeners, spool, queue manager, routers and deliverer.

    Collaborators may be passed in to replace the defaults (an embedder's own store, router,
    deliverer or extra policies); ``reactor`` defaults to the global one.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any = None,
        *,
        store: IQueueStore | None = None,
        router: IRouter | None = None,
        deliverer: IDeliverer | None = None,
        policies: Sequence[IPolicy] = (),
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        self.threadpool = ThreadPool(minthreads=0, maxthreads=10, name="mailrelay")
        self.store = store if store is not None else self._make_store()
        self.router = router if router is not None else build_router(
            config.routes, self._router_context)
        self.deliverer = deliverer if deliverer is not None else SMTPDeliverer(
            reactor, config.delivery, config.delivery.helo_name or config.server.hostname)
        self.manager = QueueManager(self.store, self.router, self.deliverer, reactor,
                                    config.queue, config.server.hostname)
        # after relay access: a recipient of our own domains that no router accepts gets 550 at RCPT
        verify = RecipientVerification.from_config(config.server, self.router, reactor)
        self.policy = build_policy(config.server, extra=[verify, *policies])
        self.factory = SMTPServerFactory.from_config(config.server, self.store, self.policy, reactor)
        self.listeners: list[_Listener] = []
        for description in config.server.listen:
            listener = _Listener(description, serverFromString(reactor, description), self.factory)
            listener.setServiceParent(self)
            self.listeners.append(listener)

    def _make_store(self) -> IQueueStore:
        spool = self.config.spool
        if spool.backend == "filesystem":
            return FilesystemSpool(spool.path, self.reactor)
        from mailrelay.queue.postgres import PostgresStore  # type: ignore[import-not-found]

        return PostgresStore(spool.dsn, self.reactor, self.threadpool)  # type: ignore[no-any-return]

    def _router_context(self, route_key: str) -> RouterContext:
        return RouterContext(reactor=self.reactor, threadpool=self.threadpool,
                             source=self.config.source, key=route_key)

    @property
    def ports(self) -> list[IListeningPort]:
        """The listening ports, once started (``port.getHost().port`` when listening on port 0)."""
        return [listener.port for listener in self.listeners if listener.port is not None]

    def startService(self) -> None:
        self.threadpool.start()
        start = getattr(self.store, "start", None)
        if start is not None:
            start()
        self.manager.start()
        super().startService()  # the listeners last: nothing is accepted before the queue runs

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        # Stop accepting first, then let the queue finish what it has in hand, then storage.
        yield defer.maybeDeferred(super().stopService)
        yield defer.maybeDeferred(self.manager.stop)
        stop_deliverer = getattr(self.deliverer, "stop", None)
        if stop_deliverer is not None:
            yield defer.maybeDeferred(stop_deliverer)
        stop_store = getattr(self.store, "stop", None)
        if stop_store is not None:
            yield defer.maybeDeferred(stop_store)
        close_router = getattr(self.router, "close", None)  # LDAP connections; uses the thread pool
        if close_router is not None:
            yield defer.maybeDeferred(close_router)
        self.threadpool.stop()
