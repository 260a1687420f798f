"""The supervisor of ``[server] workers = N``: binds the listeners, runs N workers, keeps them up.

``twistd mailrelay`` with ``workers > 1`` runs this instead of a ``MailRelayService``. It

* drains the spool shards of workers that no longer exist (``shards.drain``), before any worker
  opens a shard;
* binds every ``listen`` / ``submission_listen`` endpoint (in ``privilegedStartService``, so a
  port below 1024 works with twistd's ``--uid``) and passes them to each worker process as
  inherited file descriptors 3, 4, ...; the kernel spreads the connections over the workers;
* restarts a worker that exits: at once after a healthy run, then with a growing delay while it
  keeps dying young (``restart_delay``), logged loudly from the third quick death on;
* passes SIGHUP on to every worker (each reloads the file itself) and, on SIGTERM, SIGTERM to
  every worker; it waits for them up to ``shutdown_timeout`` plus ``STOP_MARGIN``, then kills
  the rest, and stops when they are gone;
* logs what the workers log (``mailrelay.workers.logs``), and serves the instance's metrics,
  the sum of the workers' (``mailrelay.workers.metrics``).

Time comes from the injected reactor and processes from the injected ``spawn``, so the logic is
tested in memory with ``task.Clock``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure

from mailrelay.config import Config
from mailrelay.errors import ConfigError, cannot_listen, config_errors
from mailrelay.queue.spool.shards import drain
from mailrelay.workers.logs import LineSplitter, decode_line
from mailrelay.workers.sockets import ListenerSpec, bind

log = Logger(namespace="mailrelay.workers")

#: A worker that exits within this many seconds of its start "died young".
MIN_UPTIME = 10.0
#: Extra seconds the workers get, past ``shutdown_timeout``, to stop their queue before SIGKILL.
STOP_MARGIN = 10.0
#: From this many deaths in a row, each at start-up, every further one is logged as critical.
LOUD_AFTER = 3
FIRST_FD = 3


def restart_delay(quick_deaths: int) -> float:
    """Seconds to wait before restarting a worker that died young ``quick_deaths`` times in a row
    (0 for none: at once)."""
    if quick_deaths <= 0:
        return 0.0
    return min(30.0, 0.5 * 2 ** (quick_deaths - 1))


class _Metrics:
    """The supervisor's own figures; also what ``reload_config`` counts reloads in."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.workers = Gauge(
            "mailrelay_workers_running", "Worker processes running", registry=self.registry
        )
        self.restarts = Counter(
            "mailrelay_worker_restarts_total",
            "Worker processes restarted after they exited",
            registry=self.registry,
        )
        self.reloads = Counter(
            "mailrelay_supervisor_reloads_total",
            "Configuration reloads passed on (SIGHUP)",
            ["result"],
            registry=self.registry,
        )


@attrs.define
class Worker:
    """One worker slot: the process now running in it (if any) and its recent history."""

    index: int
    process: Any = None  # an IProcessTransport
    pid: int | None = None  # kept after the process ends (its transport forgets it)
    started: float = 0.0
    quick_deaths: int = 0
    restart_call: Any = None


class WorkerProtocol(protocol.ProcessProtocol):
    """Carries one worker process's output to the log and its end to the supervisor."""

    def __init__(self, supervisor: Supervisor, worker: Worker) -> None:
        self.supervisor = supervisor
        self.worker = worker
        self.lines = {1: LineSplitter(), 2: LineSplitter()}

    def childDataReceived(self, fd: int, data: bytes) -> None:
        splitter = self.lines.get(fd)
        if splitter is None:
            return
        self._lines(fd, splitter.feed(data))

    def _lines(self, fd: int, lines: list[bytes]) -> None:
        if not lines:
            return
        if fd == 1 and self.supervisor.log_stream is not None:
            self.supervisor.write_log(lines)  # finished lines of our log: copied as they are
        elif fd == 1:
            for line in lines:
                self.supervisor.publish(decode_line(line, self.worker.index))
        else:  # stderr: tracebacks of a crash at start-up, warnings of libraries
            for line in lines:
                log.error(
                    "[worker {worker}] {line}",
                    worker=self.worker.index,
                    line=line.decode("utf-8", "replace"),
                )

    def processEnded(self, reason: Failure) -> None:
        for fd, splitter in self.lines.items():
            self._lines(fd, list(splitter.flush()))
        self.supervisor.ended(self.worker, self, reason)


class Supervisor(service.Service):
    """Runs ``config.server.workers`` worker processes of the config file ``config_path``."""

    def __init__(
        self,
        config: Config,
        config_path: str,
        reactor: Any = None,
        *,
        spawn: Callable[[protocol.ProcessProtocol, Worker], Any] | None = None,
        publish: Callable[[dict[str, Any]], None] = globalLogPublisher,
        log_stream: Any = None,
        log_format: str = "text",
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.config_path = os.path.abspath(config_path)
        self.reactor = reactor
        self.spawn = spawn or self._spawn_process
        self.publish = publish
        # Where our own log observer writes (a LogFile or stdout) and in which form ("text" or
        # "json"): workers then send finished lines, copied there. None: events (--syslog).
        self.log_stream = log_stream
        self.log_format = log_format if log_stream is not None else "event"
        self.metrics = _Metrics()
        self.workers = [Worker(i) for i in range(config.server.workers)]
        self.sockets: list[tuple[str, str, socket.socket]] = []  # (kind, description, socket)
        self.stopping = False
        self._stopped: defer.Deferred[None] | None = None
        self.metrics_listener: Any = None
        if config.metrics_listen:
            from mailrelay.workers.metrics import supervisor_metrics_site

            self.metrics_site = supervisor_metrics_site(self)

    # -- starting ------------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        server = self.config.server
        errors = []
        for kind, key in (("smtp", "listen"), ("submission", "submission_listen")):
            for i, description in enumerate(getattr(server, key)):
                try:
                    sock = bind(self.reactor, description)
                except (OSError, ValueError) as e:
                    # as a single relay does (listener.Listener): the key, the endpoint, the reason
                    errors.append(
                        cannot_listen(self.config.source, f"server.{key}[{i}]", description, e)
                    )
                    continue
                self.sockets.append((kind, description, sock))
                log.info(
                    "listening on {description} ({address}) for {n} workers",
                    description=description,
                    address=sock.getsockname(),
                    n=len(self.workers),
                )
        if self.config.metrics_listen and self.metrics_listener is None:
            error = self._listen_metrics(self.config.metrics_listen)
            if error is not None:
                errors.append(error)
        if errors:
            for _, _, bound in self.sockets:
                bound.close()
            self.sockets = []
            if self.metrics_listener is not None:
                self.metrics_listener.stopListening()
                self.metrics_listener = None
            raise config_errors(errors)

    def startService(self) -> None:
        super().startService()
        if not self.sockets:  # started without the privileged step (as in tests)
            self.privilegedStartService()
        if self.config.spool.backend == "filesystem":
            drain(self.config.spool.path, len(self.workers))
        for worker in self.workers:
            self.start_worker(worker)

    def _listen_metrics(self, description: str) -> ConfigError | None:
        """Listen for /metrics; the error if the port cannot be had (a TCP listen fails at once)."""
        from twisted.internet.endpoints import serverFromString

        failed: list[Failure] = []
        d = serverFromString(self.reactor, description).listen(self.metrics_site)
        d.addCallbacks(self._metrics_listening, failed.append)
        if not failed:
            return None
        return cannot_listen(self.config.source, "metrics.listen", description, failed[0].value)

    def _metrics_listening(self, port: Any) -> None:
        self.metrics_listener = port
        log.info(
            "metrics on {listen} ({address})",
            listen=self.config.metrics_listen,
            address=port.getHost(),
        )

    def listener_specs(self) -> list[ListenerSpec]:
        return [
            ListenerSpec(kind, description, FIRST_FD + i, sock.family)
            for i, (kind, description, sock) in enumerate(self.sockets)
        ]

    def worker_spec(self, worker: Worker) -> dict[str, Any]:
        return {
            "index": worker.index,
            "workers": len(self.workers),
            "config": self.config_path,
            "listeners": [s.to_dict() for s in self.listener_specs()],
            "log": self.log_format,
        }

    def write_log(self, lines: list[bytes]) -> None:
        """Workers' finished log lines, into our log as they are (one write for a chunk of them)."""
        self.log_stream.write(b"\n".join(lines).decode("utf-8", "replace") + "\n")
        self.log_stream.flush()

    def start_worker(self, worker: Worker) -> None:
        worker.restart_call = None
        if self.stopping:
            return
        worker.started = self.reactor.seconds()
        worker.process = self.spawn(WorkerProtocol(self, worker), worker)
        worker.pid = getattr(worker.process, "pid", None)
        self.metrics.workers.set(sum(w.process is not None for w in self.workers))
        log.info("worker {index} started (pid {pid})", index=worker.index, pid=worker.pid)

    def _spawn_process(self, proto: protocol.ProcessProtocol, worker: Worker) -> Any:
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for i, (_, _, sock) in enumerate(self.sockets):
            child_fds[FIRST_FD + i] = sock.fileno()
        args = [
            sys.executable,
            "-m",
            "mailrelay.workers.worker",
            json.dumps(self.worker_spec(worker)),
        ]
        return self.reactor.spawnProcess(
            proto, sys.executable, args, env=os.environ, childFDs=child_fds
        )

    # -- a worker ends -------------------------------------------------------------------------

    def ended(self, worker: Worker, proto: WorkerProtocol, reason: Failure) -> None:
        if proto.worker is not worker or worker.process is None:
            return
        pid = worker.pid
        worker.process = None
        self.metrics.workers.set(sum(w.process is not None for w in self.workers))
        status = _status(reason)
        if self.stopping:
            log.info(
                "worker {index} (pid {pid}) stopped: {status}",
                index=worker.index,
                pid=pid,
                status=status,
            )
            self._check_all_stopped()
            return
        lived = self.reactor.seconds() - worker.started
        worker.quick_deaths = worker.quick_deaths + 1 if lived < MIN_UPTIME else 0
        delay = restart_delay(worker.quick_deaths)
        if worker.quick_deaths >= LOUD_AFTER:
            log.critical(
                "worker {index} keeps dying at start-up ({n} times in a row, last: {status}); "
                "next try in {delay:.1f}s: see its log lines above",
                index=worker.index,
                n=worker.quick_deaths,
                status=status,
                delay=delay,
            )
        else:
            log.error(
                "worker {index} (pid {pid}) exited after {lived:.1f}s: {status}; "
                "restarting in {delay:.1f}s",
                index=worker.index,
                pid=pid,
                lived=lived,
                status=status,
                delay=delay,
            )
        self.metrics.restarts.inc()
        worker.restart_call = self.reactor.callLater(delay, self.start_worker, worker)

    # -- signals ---------------------------------------------------------------------------------

    def signal_workers(self, signum: int) -> list[int | None]:
        """Send ``signum`` to every running worker; the pids it went to."""
        sent: list[int | None] = []
        for worker in self.workers:
            if worker.process is not None:
                try:
                    worker.process.signalProcess(signum)
                except Exception as e:  # ProcessExitedAlready: its end is on its way to ``ended``
                    log.debug("worker {index}: {error}", index=worker.index, error=repr(e))
                    continue
                sent.append(worker.pid)
        return sent

    def reconfigure(self, new: Config) -> defer.Deferred[list[str]]:
        """SIGHUP (via ``reload_config``): each worker reloads the file; say what must restart."""
        from mailrelay.service import needs_restart

        restart = [
            key
            for key in needs_restart(self.config, new)
            if key
            in (
                "server.listen",
                "server.submission_listen",
                "server.workers",
                "spool",
                "metrics.listen",
            )
        ]
        pids = self.signal_workers(signal.SIGHUP)
        log.info("SIGHUP passed on to {n} workers (pids {pids})", n=len(pids), pids=pids)
        self.config = attrs.evolve(
            new,
            server=attrs.evolve(
                new.server,
                listen=self.config.server.listen,
                submission_listen=self.config.server.submission_listen,
                workers=self.config.server.workers,
            ),
            spool=self.config.spool,
            metrics_listen=self.config.metrics_listen,
        )
        return defer.succeed(restart)

    # -- stopping -------------------------------------------------------------------------------

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self.stopping = True
        for worker in self.workers:
            if worker.restart_call is not None and worker.restart_call.active():
                worker.restart_call.cancel()
            worker.restart_call = None
        for _, _, sock in self.sockets:
            sock.close()  # the workers' copies stay open until each has stopped listening
        self.sockets = []
        self._stopped = defer.Deferred()
        grace = self.config.server.shutdown_timeout + STOP_MARGIN
        pids = self.signal_workers(signal.SIGTERM)
        if pids:
            log.info(
                "stopping {n} workers (pids {pids}); killed if still running in {grace:.0f}s",
                n=len(pids),
                pids=pids,
                grace=grace,
            )
        self._kill_call = self.reactor.callLater(grace, self._kill_remaining)
        d = self._stopped
        self._check_all_stopped()
        if self.metrics_listener is not None:
            port, self.metrics_listener = self.metrics_listener, None
            d.addCallback(lambda _: port.stopListening())
        return d

    def _kill_remaining(self) -> None:
        pids = self.signal_workers(signal.SIGKILL)
        if pids:
            log.error(
                "workers still running after the shutdown timeout, killed: pids {pids}", pids=pids
            )

    def _check_all_stopped(self) -> None:
        if self._stopped is None or any(w.process is not None for w in self.workers):
            return
        if self._kill_call.active():
            self._kill_call.cancel()
        d, self._stopped = self._stopped, None
        log.info("all workers stopped")
        d.callback(None)


def _status(reason: Failure) -> str:
    value = reason.value
    sig = getattr(value, "signal", None)
    if sig:
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exit status {getattr(value, 'exitCode', '?')}"
