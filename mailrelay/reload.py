"""Signals of a standalone relay: SIGHUP reloads the config file, SIGTERM stops gracefully.

Only ``twistd mailrelay`` installs these (an embedding program owns its process's signals); an
embedder can call ``reload_config`` itself. A config that does not load or build is refused with
its ``ConfigError`` text in the log, and the running config stays.
"""

from __future__ import annotations

import signal
from collections.abc import Generator
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from mailrelay import config as configmod
from mailrelay.errors import ConfigError

log = Logger(namespace="mailrelay.reload")


@defer.inlineCallbacks
def reload_config(relay: Any, path: str) -> Generator[defer.Deferred[Any], Any, bool]:
    """Load ``path`` and apply it to the ``MailRelayService`` ``relay``; True when applied."""
    try:
        new = configmod.load(path)
        restart = yield relay.reconfigure(new)
    except ConfigError as e:
        log.error("reload refused, keeping the running config: {error}", error=str(e))
        relay.metrics.reloads.labels("refused").inc()
        return False
    except Exception as e:  # a certificate that does not load, a plugin that fails to build
        log.failure("reload refused, keeping the running config: {error}", error=f"{path}: {e}")
        relay.metrics.reloads.labels("refused").inc()
        return False
    relay.metrics.reloads.labels("applied").inc()
    log.info("reloaded {path}: {routes} routes", path=path, routes=len(new.routes))
    if restart:
        log.warn(
            "changed in {path} but only applied after a restart: {keys}",
            path=path,
            keys=", ".join(restart),
        )
    return True


class SignalService(service.Service):
    """While running: SIGHUP → ``reload_config``; SIGTERM → stop the reactor (exit status 0).

    SIGTERM stops the reactor as ``reactor.stop()`` does, so the service tree stops gracefully
    (see ``MailRelayService.stopService``); twistd then exits 0 instead of re-raising the signal.
    """

    def __init__(self, relay: Any, config_path: str | None, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.relay = relay
        self.config_path = config_path
        self.reactor = reactor
        self._previous: dict[int, Any] = {}
        self._reloading: defer.Deferred[Any] | None = None
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        # after the reactor's own handlers (installed as it starts running), so ours win
        self.reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        if not self.running:
            return
        for signum, handler in ((signal.SIGHUP, self._on_hup), (signal.SIGTERM, self._on_term)):
            self._previous[signum] = signal.signal(signum, handler)

    def stopService(self) -> None:
        # SIGHUP while stopping is ignored rather than left to its default (which kills)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self._previous.clear()
        super().stopService()

    def _on_hup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def _on_term(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._stop)

    def reload(self) -> defer.Deferred[Any]:
        """Reload now, or after the reload in progress (one at a time)."""
        if self.config_path is None:
            log.info("SIGHUP: started without --config, nothing to reload")
            return defer.succeed(False)
        previous = self._reloading or defer.succeed(None)
        path = self.config_path

        def run(_: object) -> defer.Deferred[Any]:
            log.info("SIGHUP: reloading {path}", path=path)
            return reload_config(self.relay, path)

        d = previous.addBoth(run)
        self._reloading = d
        return d

    def _stop(self) -> None:
        if self._stopping:
            log.info("SIGTERM again: already stopping")
            return
        self._stopping = True
        log.info(
            "SIGTERM: stopping (sessions may finish for up to {t:.0f}s)",
            t=self.relay.config.server.shutdown_timeout,
        )
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass
