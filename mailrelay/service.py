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
from collections.abc import Generator, Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailrelay.config import Config, ServerConfig
from mailrelay.delivery import ByRouteDeliverer, MaildirDeliverer, SMTPDeliverer
from mailrelay.delivery.capabilities import HopCapabilities
from mailrelay.delivery.observed import ObservedDeliverer
from mailrelay.dkim import DKIMSigner, SigningSink
from mailrelay.envelope import Reply
from mailrelay.errors import ConfigError, config_errors, each_config_error
from mailrelay.interfaces import IDeliverer, IPolicy, IQueueStore, IRouter, IStartableStore
from mailrelay.listener import reconfigure as reconfigure_listener
from mailrelay.listener import server_factory
from mailrelay.metrics import RelayMetrics, metrics_site
from mailrelay.observer import FanOut, IRelayObserver
from mailrelay.policy import build_policy
from mailrelay.policy.access import is_trusted
from mailrelay.policy.onward import OnwardCapabilities
from mailrelay.policy.verify import RecipientVerification
from mailrelay.port import Listener as _Listener
from mailrelay.preflight import problems
from mailrelay.queue.manager import QueueManager
from mailrelay.queue.spool import FilesystemSpool
from mailrelay.routing.context import RouterContext
from mailrelay.routing.plugins import build_router
from mailrelay.smtp.server import SMTPServerFactory

log = Logger()


def shutting_down(hostname: str) -> Reply:
    return Reply(421, "4.3.2", f"{hostname} Service shutting down, closing transmission channel")


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
        # endpoints, certificates, files, the spool directory, the routes: every error at once,
        # before anything (the spool) is made
        found = problems(config, reactor, spool=store is None)
        self._own_router = router is None
        if router is None:
            try:
                router = build_router(config.routes, self._router_context)
            except ConfigError as e:
                raise config_errors([*found, *each_config_error(e)]) from None
        if found:
            raise config_errors(found)
        self.router = router
        self.metrics = RelayMetrics()
        self.observer = FanOut([self.metrics, *observers])
        self._own_store = store is None
        self.store = store if store is not None else self._make_store()
        if deliverer is None:
            network = SMTPDeliverer(
                reactor, config.delivery, config.delivery.helo_name or config.server.hostname
            )
            network.observer = self.observer  # new connections, TLS
            deliverer = ByRouteDeliverer(
                network, MaildirDeliverer(reactor, self.threadpool, config.server.hostname)
            )
        # Intake's door to the store: DKIM signs each message once, as it is received, before
        # its commit (for the [dkim] domains; none: passes through). The SMTP listeners and the
        # reports to senders write through it; delivery sends what it stored.
        self.intake = SigningSink(
            self.store,
            DKIMSigner.from_config(config.dkim, config.source),
            reactor,
            self.threadpool,
        )
        self.deliverer = ObservedDeliverer(deliverer, self.observer, reactor)
        self.manager = QueueManager(
            self.store,
            self.router,
            self.deliverer,
            reactor,
            config.queue,
            config.server.hostname,
            observer=self.observer,
            trusted_client=self._trusted_client,
            reports_to=self.intake,
        )
        self.metrics.watch_queue(self.manager, reactor)
        self.policies = tuple(policies)
        self.policy = self._build_policy(config.server, self.router)
        self.factory = self._build_factory(config.server, submission=False)
        self.factories = [self.factory]
        self.listeners: list[_Listener] = []
        for i, description in enumerate(config.server.listen):
            self._listen(description, self.factory, f"server.listen[{i}]")
        if config.server.submission_listen:
            submission = self._build_factory(config.server, submission=True)
            self.factories.append(submission)
            for i, description in enumerate(config.server.submission_listen):
                self._listen(description, submission, f"server.submission_listen[{i}]")
        self.metrics_listener: _Listener | None = None
        if config.metrics_listen:
            self.metrics_listener = _Listener(
                config.metrics_listen,
                serverFromString(reactor, config.metrics_listen),
                metrics_site(self.metrics.registry),
                config.source,
                "metrics.listen",
            )
            self.metrics_listener.setServiceParent(self)
        self.control: Any = None

    # -- building -------------------------------------------------------------------------------

    def _trusted_client(self, address: str) -> bool:
        """In the trusted networks of the config in force (a reload changes them)."""
        return is_trusted(address, self.config.server.trusted_networks)

    def _make_store(self) -> IQueueStore:
        spool = self.config.spool
        if spool.backend == "filesystem":
            try:
                return FilesystemSpool(spool.path, self.reactor, fsync_threads=spool.fsync_threads)
            except OSError as e:
                raise ConfigError(
                    self.config.source, "spool.path", f"{spool.path}: {e.strerror or e}"
                ) from None
        from mailrelay.queue.postgres import PostgresStore

        if spool.dsn is None:  # the config refuses this backend without one
            raise ConfigError(self.config.source, "spool.dsn", "required for PostgreSQL")
        return PostgresStore(
            spool.dsn,
            self.reactor,
            self.threadpool,
            lease_time=spool.lease_time,
            scan_interval=spool.scan_interval,
        )

    def _router_context(self, route_key: str) -> RouterContext:
        return RouterContext(
            reactor=self.reactor,
            threadpool=self.threadpool,
            source=self.config.source,
            key=route_key,
        )

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
        factory = server_factory(
            server,
            self.intake,
            self.policy,
            self.reactor,
            submission=submission,
            binarymime=self.config.binarymime,
        )
        factory.observer = self.observer
        return factory

    def _endpoint(self, description: str) -> Any:
        """The endpoint to listen on for ``description`` (a worker adopts its supervisor's)."""
        return serverFromString(self.reactor, description)

    def _listen(self, description: str, factory: SMTPServerFactory, key: str = "") -> None:
        listener = _Listener(
            description, self._endpoint(description), factory, self.config.source, key
        )
        listener.setServiceParent(self)
        self.listeners.append(listener)

    # -- running --------------------------------------------------------------------------------

    @property
    def ports(self) -> list[IListeningPort]:
        """The SMTP listening ports, once started (``port.getHost().port`` for a port 0 listen)."""
        return [listener.port for listener in self.listeners if listener.port is not None]

    def privilegedStartService(self) -> None:
        """Listen (before twistd drops privileges); every endpoint that cannot, in one error."""
        errors = []
        for child in self:
            try:
                child.privilegedStartService()
            except ConfigError as e:
                errors.append(e)
        if errors:
            raise config_errors(errors)

    def startService(self) -> None:
        self.threadpool.start()
        if IStartableStore.providedBy(self.store):
            self.store.start()
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
            log.error(
                "no control channel: cannot create {path}: {error}",
                path=self.config.spool.path,
                error=e,
            )
            return
        self.control = ControlServer(
            self.manager,
            self.store,
            socket_path(self.config.spool.path),
            self.reactor,
            metrics=self.metrics.registry,
        )
        d = self.control.start()
        d.addErrback(
            lambda f: log.failure("no control channel (mailrelay queue ... will not reach us)", f)
        )

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
        if IStartableStore.providedBy(self.store):
            yield defer.maybeDeferred(self.store.stop)
        close_router = getattr(self.router, "close", None)  # LDAP connections; uses the thread pool
        if close_router is not None:
            yield defer.maybeDeferred(close_router)
        self.threadpool.stop()
        log.info("mailrelay stopped")

    @defer.inlineCallbacks
    def _drain_sessions(self, deadline: float) -> Generator[defer.Deferred[Any], Any, None]:
        """Idle sessions get 421 now; busy ones after their transaction; the rest at the deadline.

        Returns once every session is gone (those closed at the deadline within SHUTDOWN_LINGER).
        """
        reply = shutting_down(self.config.server.hostname)
        factories = [f for f in self.factories if callable(getattr(f, "drain", None))]
        waits = [f.drain(reply) for f in factories]
        if not waits:
            return
        open_now = sum(getattr(f, "connections", 0) for f in factories)
        if open_now:
            log.info(
                "shutting down: waiting for {n} sessions to finish (up to {t:.0f}s)",
                n=open_now,
                t=max(0.0, deadline - self.reactor.seconds()),
            )
        # cancelled at the deadline, each wait fails with CancelledError: expected, not an error
        done = defer.DeferredList(waits, consumeErrors=True)
        timer = self.reactor.callLater(max(0.0, deadline - self.reactor.seconds()), done.cancel)
        yield done
        if timer.active():
            timer.cancel()
        left = sum(getattr(f, "connections", 0) for f in factories)
        if left:
            log.warn("shutdown timeout: closing {n} sessions still open", n=left)
            yield defer.DeferredList([f.close_all(reply) for f in factories], consumeErrors=True)

    # -- SIGHUP ---------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def reconfigure(self, new: Config) -> Generator[defer.Deferred[Any], Any, list[str]]:
        """Take ``new`` routes, policies, certificates, limits, DKIM keys, dropping no connection.

        Everything is built before anything is swapped, so a bad route or certificate raises
        (``ConfigError`` or the loader's error) and leaves the running relay as it was. Keys that
        need a restart (``RESTART_ONLY``: listeners, hostname, spool, metrics, delivery) keep their
        running values everywhere and are returned as a list of their names.
        """
        restart = needs_restart(self.config, new)
        new = keep_running(
            self.config, new
        )  # the hostname too: not new in the greeting, old in EHLO
        old_router = self.router
        built = build_router(new.routes, self._new_context(new)) if self._own_router else None
        router = built if built is not None else old_router
        try:
            # what a listener loads (certificate, key, password file) fails here, before any swap
            found = problems(new, self.reactor, spool=False)
            if found:
                raise config_errors(found)
            policy = self._build_policy(new.server, router)
            signer = DKIMSigner.from_config(new.dkim, new.source)
        except Exception:
            if built is not None:
                yield defer.maybeDeferred(built.close)
            raise
        self.policy = policy
        for factory in self.factories:
            reconfigure_listener(factory, new.server, policy, binarymime=new.binarymime)
        self.intake.signer = signer  # queued messages keep the signature they have
        self.router = router
        self.manager.router = router
        self.manager.config = _queue_config(self.manager.config, new.queue)
        self.config = new
        if router is not old_router:
            close = getattr(old_router, "close", None)
            if (
                close is not None
            ):  # lookups in flight on it fail as temporary: retried on the new one
                yield defer.maybeDeferred(close)
        return restart

    def _new_context(self, new: Config) -> Any:
        def context(route_key: str) -> RouterContext:
            return RouterContext(
                reactor=self.reactor, threadpool=self.threadpool, source=new.source, key=route_key
            )

        return context


def _queue_config(old: Any, new: Any) -> Any:
    """The queue keys a running manager can take: schedule, lifetime, warnings, postmaster."""
    import attrs

    return attrs.evolve(
        old,
        retry_schedule=new.retry_schedule,
        max_lifetime=new.max_lifetime,
        delay_warning=new.delay_warning,
        postmaster=new.postmaster,
    )


#: What a running relay cannot take: (section, key), None for the whole section. A reload keeps
#: their running values everywhere (greeting, Received, EHLO, bounces, ...) until a restart.
RESTART_ONLY: tuple[tuple[str, str | None], ...] = (
    ("server", "listen"),
    ("server", "submission_listen"),
    ("server", "hostname"),
    ("server", "workers"),
    ("spool", None),
    ("delivery", None),
    ("metrics_listen", None),
    ("queue", "max_deliveries"),
    ("queue", "max_per_destination"),
)


def _restart_value(cfg: Config, section: str, key: str | None) -> Any:
    value = getattr(cfg, section)
    return value if key is None else getattr(value, key)


def _restart_name(section: str, key: str | None) -> str:
    return section.replace("_", ".") if key is None else f"{section}.{key}"


def needs_restart(old: Config, new: Config) -> list[str]:
    """The changed keys a reload cannot apply (they need a restart)."""
    return [
        _restart_name(section, key)
        for section, key in RESTART_ONLY
        if _restart_value(old, section, key) != _restart_value(new, section, key)
    ]


def keep_running(old: Config, new: Config) -> Config:
    """``new`` with each ``RESTART_ONLY`` key at its value in ``old``: what a reload applies."""
    import attrs

    for section, key in RESTART_ONLY:
        value = _restart_value(old, section, key)
        if key is not None:
            value = attrs.evolve(getattr(new, section), **{key: value})
        new = attrs.evolve(new, **{section: value})
    return new
