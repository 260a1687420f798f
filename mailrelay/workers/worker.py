"""One worker process: an ordinary ``MailRelayService`` on its own spool shard and adopted sockets.

Started by the supervisor (``mailrelay.workers.supervisor``) as
``python -m mailrelay.workers.worker SPEC`` where SPEC is JSON: ``index``, ``workers``, ``config``
(the file), ``listeners`` (``ListenerSpec`` dicts: the inherited file descriptors), ``log`` (the
form of its log lines, see ``mailrelay.workers.logs``). It logs on stdout for the supervisor,
reloads on SIGHUP and stops gracefully on SIGTERM like the standalone relay, and also stops when
its stdin closes (the supervisor is gone: no orphan keeps accepting mail). Exit status: 0 stopped,
2 bad config, 3 its shard is run by another process, 64 no SPEC.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import attrs
from twisted.internet import protocol
from twisted.logger import Logger

from mailrelay.config import Config
from mailrelay.queue.spool.shards import shard_path
from mailrelay.service import MailRelayService
from mailrelay.workers.sockets import AdoptedEndpoint, ListenerSpec

log = Logger(namespace="mailrelay.workers")

EXIT_CONFIG = 2
EXIT_SHARD_BUSY = 3
EXIT_USAGE = 64  # sysexits.h EX_USAGE: not a SPEC (a person trying the module by hand)


def worker_config(config: Config, index: int, listeners: list[ListenerSpec]) -> Config:
    """``config`` as worker ``index`` runs it: the supervisor's listeners, its shard, no metrics.

    Applied to every config the worker loads (at start and on SIGHUP), so a reload compares like
    with like and only reports what really changed.
    """
    server = attrs.evolve(
        config.server,
        listen=tuple(s.description for s in listeners if s.kind == "smtp"),
        submission_listen=tuple(s.description for s in listeners if s.kind == "submission"),
    )
    spool = attrs.evolve(config.spool, path=shard_path(config.spool.path, index))
    return attrs.evolve(config, server=server, spool=spool, metrics_listen=None)


class WorkerRelayService(MailRelayService):
    """A relay whose listeners adopt inherited sockets and whose queue ids carry its number."""

    def __init__(
        self, config: Config, reactor: Any, *, index: int, listeners: list[ListenerSpec]
    ) -> None:
        self.index = index
        self.listener_specs = listeners
        self._adopt = {s.description: s for s in listeners}
        super().__init__(worker_config(config, index, listeners), reactor)

    def _endpoint(self, description: str) -> Any:
        return AdoptedEndpoint(self.reactor, self._adopt[description])

    def _make_store(self) -> Any:
        from mailrelay.queue.store import QueueIdGenerator

        store = super()._make_store()
        if hasattr(store, "new_id"):
            store.new_id = QueueIdGenerator(self.reactor, shard=self.index)
        return store

    def reconfigure(self, new: Config) -> Any:
        return super().reconfigure(worker_config(new, self.index, self.listener_specs))


class _ParentWatch(protocol.Protocol):
    """Our stdin is a pipe from the supervisor: when it closes, the supervisor is gone, so stop."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def connectionLost(self, reason: Any = None) -> None:
        if self.reactor.running:
            log.warn("the supervisor is gone (stdin closed): stopping")
            self.reactor.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not argv[0].startswith("{"):
        # run by the supervisor only; a person trying it (--help) gets the docstring, no traceback
        asked = argv in (["-h"], ["--help"])
        print(
            f"usage: python -m mailrelay.workers.worker SPEC\n\n{__doc__}",
            file=sys.stdout if asked else sys.stderr,
        )
        return 0 if asked else EXIT_USAGE
    spec = json.loads(argv[0])
    index = int(spec["index"])
    listeners = [ListenerSpec.from_dict(d) for d in spec["listeners"]]

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from mailrelay.workers.logs import worker_observer

    log_fd = os.dup(1)  # stdout is the supervisor's pipe; keep print() and friends off it
    os.dup2(2, 1)
    observer = worker_observer(log_fd, index, spec.get("log", "event"), reactor)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    from mailrelay import config as configmod
    from mailrelay.errors import ConfigError
    from mailrelay.queue.spool.shards import ShardBusy, ShardLock
    from mailrelay.reload import SignalService

    try:
        cfg = configmod.load(spec["config"])
    except ConfigError as e:
        log.critical("worker {index}: {error}", index=index, error=str(e))
        return EXIT_CONFIG
    lock = None
    if cfg.spool.backend == "filesystem":
        try:
            lock = ShardLock(shard_path(cfg.spool.path, index)).acquire()
        except ShardBusy as e:
            log.critical("worker {index}: {error}", index=index, error=str(e))
            return EXIT_SHARD_BUSY
    try:
        relay = WorkerRelayService(cfg, reactor, index=index, listeners=listeners)
    except ConfigError as e:
        log.critical("worker {index}: {error}", index=index, error=str(e))
        return EXIT_CONFIG
    from twisted.application.service import MultiService
    from twisted.internet import stdio

    top = MultiService()
    relay.setServiceParent(top)
    SignalService(relay, spec["config"], reactor).setServiceParent(top)
    # mypy reads the Windows StandardIO (twisted.internet.stdio picks one by platform at run time)
    stdio.StandardIO(  # type: ignore[call-arg]
        _ParentWatch(reactor), stdin=0, stdout=os.open(os.devnull, os.O_WRONLY), reactor=reactor
    )
    reactor.callWhenRunning(top.startService)
    reactor.callWhenRunning(
        log.info,
        "worker {index} running (pid {pid}, spool {spool})",
        index=index,
        pid=os.getpid(),
        spool=relay.config.spool.path,
    )
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    if lock is not None:
        lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
