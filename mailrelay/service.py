"""``MailRelayService``: the one place where the rooms are wired together — the embedding API.

Add it to any Twisted application::

    from mailrelay import config
    from mailrelay.service import MailRelayService
    MailRelayService(config.load("mailrelay.toml")).setServiceParent(application)

Everything that can be wrong in the config is checked when the service is *built*, so an embedding
program fails before it starts serving; sockets, threads and the queue start with ``startService``.
Stopping is graceful: listening stops at once, sessions may finish the message in hand until
``[server] shutdown_timeout``, then the queue manager and the store stop, in that order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailrelay.config import Config, ServerConfig
from mailrelay.delivery import SMTPDeliverer
from mailrelay.delivery.capabilities import HopCapabilities
from mailrelay.dkim import DKIMSigner, DKIMSigningDeliverer
from mailrelay.envelope import Reply
from mailrelay.interfaces import IDeliverer, IPolicy, IQueueStore, IRouter
from mailrelay.metrics import RelayMetrics, metrics_site
from mailrelay.observer import FanOut, IRelayObserver, ObservedDeliverer
from mailrelay.policy import build_policy
from mailrelay.policy.access import is_trusted
from mailrelay.policy.onward import OnwardCapabilities
from mailrelay.policy.verify import RecipientVerification
from mailrelay.queue.manager import QueueManager
from mailrelay.queue.spool import FilesystemSpool
from mailrelay.routing.context import RouterContext
from mailrelay.routing.plugins import build_router
from mailrelay.smtp.server import SMTPServerFactory

log = Logger()


def shutting_down(hostname: str) -> Reply:
    return Reply(421, "4.3.2", f"{hostname} Service shutting down, closing transmission channel")


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

    def stopService(self) -> Any:
        self.port = None
        return super().stopService()


class MailRelayService(service.MultiService):
    """A complete relay: listeners, spool, queue manager, routers, deliverer, metrics, control.

    Collaborators may be passed in to replace the defaults (an embedder's own store, router,
    deliverer or extra policies); ``observers`` receive the relay's events (see
    ``mailrelay.observer``) besides the built-in Prometheus counters in ``self.metrics``.
    ``reactor`` defaults to the global one.
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
        observers: Sequence[IRelayObserver] = (),
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        self.threadpool = ThreadPool(minthreads=0, maxthreads=10, name="mailrelay")
        self.metrics = RelayMetrics()
        self.observer = FanOut([self.metrics, *observers])
        self._own_store = store is None
        self.store = store if store is not None else self._make_store()
        self._own_router = router is None
        self.router = router if router is not None else build_router(config.routes, self._router_context)
        if deliverer is None:
            deliverer = SMTPDeliverer(reactor, config.delivery, config.delivery.helo_name or config.server.hostname)
            deliverer.observer = self.observer  # type: ignore[attr-defined]  # new connections, TLS
        # DKIM signs (for the [dkim] domains; none: passes through) before the message goes out
        self.dkim = DKIMSigningDeliverer(deliverer, DKIMSigner.from_config(config.dkim, config.source),
                                         reactor, self.threadpool)
        self.deliverer = ObservedDeliverer(self.dkim, self.observer, reactor)
        self.manager = QueueManager(self.store, self.router, self.deliverer, reactor,
                                    config.queue, config.server.hostname, observer=self.observer,
                                    trusted_client=self._trusted_client)
        self.metrics.watch_queue(self.manager, reactor)
        self.policies = tuple(policies)
        self.policy = self._build_policy(config.server, self.router)
        self.factory = self._build_factory(config.server, submission=False)
        self.factories = [self.factory]
        self.listeners: list[_Listener] = []
        for description in config.server.listen:
            self._listen(description, self.factory)
        if config.server.submission_listen:
            submission = self._build_factory(config.server, submission=True)
            self.factories.append(submission)
            for description in config.server.submission_listen:
                self._listen(description, submission)
        self.metrics_listener: _Listener | None = None
        if config.metrics_listen:
            self.metrics_listener = _Listener(config.metrics_listen, serverFromString(reactor, config.metrics_listen),
                                              metrics_site(self.metrics.registry))
            self.metrics_listener.setServiceParent(self)
        self.control: Any = None

    # -- building -------------------------------------------------------------------------------

    def _trusted_client(self, address: str) -> bool:
        """In the trusted networks of the config in force (a reload changes them)."""
        return is_trusted(address, self.config.server.trusted_networks)

    def _make_store(self) -> IQueueStore:
        spool = self.config.spool
        if spool.backend == "filesystem":
            return FilesystemSpool(spool.path, self.reactor, fsync_threads=spool.fsync_threads)
        from mailrelay.queue.postgres import PostgresStore  # type: ignore[import-not-found]

        return PostgresStore(spool.dsn, self.reactor, self.threadpool,  # type: ignore[no-any-return]
                             lease_time=spool.lease_time, scan_interval=spool.scan_interval)

    def _router_context(self, route_key: str) -> RouterContext:
        return RouterContext(reactor=self.reactor, threadpool=self.threadpool,
                             source=self.config.source, key=route_key)

    def _build_policy(self, server: ServerConfig, router: IRouter) -> IPolicy:
        # after relay access: a recipient of our own domains that no router accepts gets 550 at RCPT
        extra: list[IPolicy] = list(self.policies)
        # with no domains of our own it could never apply: not one more step per RCPT for nothing
        if server.verify_recipients and (server.local_domains or server.relay_domains):
            extra.insert(0, RecipientVerification.from_config(server, router, self.reactor))
        # what no next hop can carry is refused at DATA to an untrusted client, not bounced later
        capabilities = getattr(self.deliverer, "capabilities", None)  # our SMTPDeliverer's
        if isinstance(capabilities, HopCapabilities):
            extra.insert(0, OnwardCapabilities(router, capabilities, self.reactor))
        return build_policy(server, extra=extra)

    def _build_factory(self, server: ServerConfig, submission: bool) -> SMTPServerFactory:
        factory = SMTPServerFactory.from_config(server, self.store, self.policy, self.reactor, submission=submission,
                                                binarymime=self.config.binarymime)
        factory.observer = self.observer  # type: ignore[attr-defined]
        return factory

    def _endpoint(self, description: str) -> Any:
        """The endpoint to listen on for ``description`` (a worker process adopts its supervisor's)."""
        return serverFromString(self.reactor, description)

    def _listen(self, description: str, factory: SMTPServerFactory) -> None:
        listener = _Listener(description, self._endpoint(description), factory)
        listener.setServiceParent(self)
        self.listeners.append(listener)

    # -- running --------------------------------------------------------------------------------

    @property
    def ports(self) -> list[IListeningPort]:
        """The SMTP listening ports, once started (``port.getHost().port`` when listening on port 0)."""
        return [listener.port for listener in self.listeners if listener.port is not None]

    def startService(self) -> None:
        self.threadpool.start()
        start = getattr(self.store, "start", None)
        if start is not None:
            start()
        self.manager.start()
        self._start_control()
        super().startService()  # the listeners last: nothing is accepted before the queue runs

    def _start_control(self) -> None:
        """The CLI's control socket, in the spool directory of a store we built ourselves."""
        if not self._own_store:
            return
        from mailrelay.control.server import ControlServer, socket_path

        try:
            os.makedirs(self.config.spool.path, mode=0o700, exist_ok=True)
        except OSError as e:
            log.error("no control channel: cannot create {path}: {error}", path=self.config.spool.path, error=e)
            return
        self.control = ControlServer(self.manager, self.store, socket_path(self.config.spool.path), self.reactor,
                                     metrics=self.metrics.registry)
        d = self.control.start()
        d.addErrback(lambda f: log.failure("no control channel (mailrelay queue ... will not reach us)", f))

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """Stop listening; let sessions finish their message until the deadline; then the queue."""
        deadline = self.reactor.seconds() + self.config.server.shutdown_timeout
        yield defer.maybeDeferred(super().stopService)  # stops listening; open sessions go on
        yield self._drain_sessions(deadline)
        if self.control is not None:
            yield defer.maybeDeferred(self.control.stop)
            self.control = None
        grace = max(1.0, deadline - self.reactor.seconds())
        yield defer.maybeDeferred(self.manager.stop, grace)
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
        log.info("mailrelay stopped")

    @defer.inlineCallbacks
    def _drain_sessions(self, deadline: float):  # type: ignore[no-untyped-def]
        """Idle sessions get 421 now; busy ones after their transaction; the rest at the deadline."""
        reply = shutting_down(self.config.server.hostname)
        waits = [f.drain(reply) for f in self.factories if callable(getattr(f, "drain", None))]
        if not waits:
            return
        open_now = sum(getattr(f, "connections", 0) for f in self.factories)
        if open_now:
            log.info("shutting down: waiting for {n} sessions to finish (up to {t:.0f}s)", n=open_now,
                     t=max(0.0, deadline - self.reactor.seconds()))
        done = defer.DeferredList(waits)
        timer = self.reactor.callLater(max(0.0, deadline - self.reactor.seconds()), done.cancel)
        try:
            yield done
        except defer.CancelledError:
            pass
        if timer.active():
            timer.cancel()
        left = sum(getattr(f, "connections", 0) for f in self.factories)
        if left:
            log.warn("shutdown timeout: closing {n} sessions still open", n=left)
            for f in self.factories:
                f.close_all(reply)  # type: ignore[attr-defined]

    # -- SIGHUP ---------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def reconfigure(self, new: Config):  # type: ignore[no-untyped-def]
        """Take ``new`` routes, policies, TLS certificates, limits and DKIM keys without dropping a connection.

        Everything is built before anything is swapped, so a bad route or certificate raises
        (``ConfigError`` or the loader's error) and leaves the running relay as it was. Keys that
        need a restart (listeners, spool, metrics, delivery) are returned as a list of their names.
        """
        old_router = self.router
        router = build_router(new.routes, self._new_context(new)) if self._own_router else old_router
        try:
            policy = self._build_policy(new.server, router)
            for factory in self.factories:
                _check_server(factory, new.server)
            signer = DKIMSigner.from_config(new.dkim, new.source)
        except Exception:
            if router is not old_router:
                yield defer.maybeDeferred(router.close)
            raise
        self.policy = policy
        for factory in self.factories:
            factory.reconfigure(new.server, policy, binarymime=new.binarymime)
        self.dkim.signer = signer
        self.router = router
        self.manager.router = router
        self.manager.config = _queue_config(self.manager.config, new.queue)
        restart = needs_restart(self.config, new)
        self.config = new
        if router is not old_router:
            close = getattr(old_router, "close", None)
            if close is not None:  # lookups in flight on it fail as temporary: retried on the new one
                yield defer.maybeDeferred(close)
        return restart

    def _new_context(self, new: Config) -> Any:
        def context(route_key: str) -> RouterContext:
            return RouterContext(reactor=self.reactor, threadpool=self.threadpool, source=new.source, key=route_key)

        return context


def _check_server(factory: SMTPServerFactory, server: ServerConfig) -> None:
    """Load what ``factory.reconfigure`` would (certificate, key) so a failure comes before any swap."""
    if server.tls_certificate and server.tls_key:
        from mailrelay.smtp.tls import server_tls_options

        server_tls_options(server.tls_certificate, server.tls_key)


def _queue_config(old: Any, new: Any) -> Any:
    """The queue keys a running manager can take: schedule, lifetime, warnings, postmaster."""
    import attrs

    return attrs.evolve(old, retry_schedule=new.retry_schedule, max_lifetime=new.max_lifetime,
                        delay_warning=new.delay_warning, postmaster=new.postmaster)


def needs_restart(old: Config, new: Config) -> list[str]:
    """The changed keys a reload cannot apply (they need a restart)."""
    changed = []
    for key in ("listen", "submission_listen", "hostname", "workers"):
        if getattr(old.server, key) != getattr(new.server, key):
            changed.append(f"server.{key}")
    if old.spool != new.spool:
        changed.append("spool")
    if old.delivery != new.delivery:
        changed.append("delivery")
    if old.metrics_listen != new.metrics_listen:
        changed.append("metrics.listen")
    for key in ("max_deliveries", "max_per_destination"):
        if getattr(old.queue, key) != getattr(new.queue, key):
            changed.append(f"queue.{key}")
    return changed
