"""``twistd mailrelay``: command-line options and ``makeService``.

With ``[server] workers`` above 1 the service is a supervisor of that many worker processes
(``mailrelay.workers``); otherwise it is one ``MailRelayService`` holding the spool's lock.
The standalone relay also answers signals (``mailrelay.reload.SignalService``): SIGHUP reloads
``--config``, SIGTERM stops gracefully and exits 0. ``--log-format json`` writes one JSON object
per log line (``mailrelay._log``) where twistd would write text (``--logfile``, or stdout).
"""

from __future__ import annotations

import signal
import sys
from typing import Any, NoReturn

from twisted.application.service import IService, MultiService
from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.python.components import Componentized

from mailrelay import config as configmod
from mailrelay.errors import ConfigError

#: Used when no ``--config`` is given: a loopback-only relay that routes by MX.
DEFAULT_CONFIG = """\
[server]
listen = ["tcp:2525:interface=127.0.0.1"]

[spool]
path = "var/spool"

[[routes]]
type = "mx"
"""

LOG_FORMATS = ("text", "json")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the mailrelay mail transfer agent. Without --config it listens on "
        "127.0.0.1:2525, spools under var/spool and routes by MX. SIGHUP reloads the config "
        "file (routes, policies, TLS certificates); SIGTERM stops gracefully."
    )
    optParameters = [
        ["config", "c", None, "The TOML configuration file."],
        [
            "log-format",
            None,
            "text",
            "Log as 'text' (twistd's usual lines) or 'json' (one object per line).",
        ],
    ]

    def postOptions(self) -> None:
        if self["log-format"] not in LOG_FORMATS:
            raise usage.UsageError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
        try:
            if self["config"]:
                from mailrelay.preflight import load_file

                # every error of the file at once; what it names and its routes, once all its
                # values are right, as the service is built (makeService)
                self.loaded = load_file(self["config"])
            else:
                self.loaded = configmod.loads(DEFAULT_CONFIG, "<built-in default>")
        except ConfigError as e:
            exit_config_error(e)  # not a UsageError: twistd would print its usage text first


def exit_config_error(error: ConfigError) -> NoReturn:
    """One ``mailrelay: file: key: reason`` line per error on stderr, and exit 1 (no traceback)."""
    from mailrelay.cli import print_config_error

    # the terminal twistd was started from (once twistd logs, sys.stderr goes to the log: there too)
    print_config_error(error, sys.__stderr__)
    if sys.stderr is not sys.__stderr__:
        print_config_error(error, sys.stderr)
    raise SystemExit(1)


class _Standalone(MultiService):
    """The relay plus its signal handling; sets the JSON log observer on twistd's application."""

    def __init__(self, log_observer: Any = None) -> None:
        super().__init__()
        self.log_observer = log_observer
        self.relay: Any = None  # the MailRelayService, or with workers:
        self.supervisor: Any = None  # the Supervisor
        self.spool_lock: Any = None  # held for the life of the process

    def setServiceParent(self, parent: Any) -> Any:
        # twistd asks the application for an ILogObserver component before it starts logging
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()  # the listeners: a port in use is an error of the file
        except ConfigError as e:
            exit_config_error(e)


def _twistd_option(options: Options, name: str, default: Any = None) -> Any:
    twistd = options.parent if options.parent is not None else {}
    return twistd.get(name, default) if hasattr(twistd, "get") else default


def _log_stream(options: Options) -> Any:
    """Where twistd would write its text log: ``--logfile`` (rotated, also on SIGUSR1) or stdout."""
    from twisted.python.logfile import LogFile

    path = _twistd_option(options, "logfile")
    if path == "-" or (not path and _twistd_option(options, "nodaemon", True)):
        return sys.stdout
    stream = LogFile.fromFullPath(path or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):  # as twistd does for its own log file
        from twisted.internet import reactor
        from twisted.internet.interfaces import IReactorFromThreads

        threads = IReactorFromThreads(reactor)
        signal.signal(signal.SIGUSR1, lambda signum, frame: threads.callFromThread(stream.rotate))
    return stream


def _observer(options: Options, stream: Any, per_turn: bool = False) -> Any:
    """Our observer for twistd's log on ``stream``: JSON lines, or twistd's text lines made faster;
    ``per_turn``: the lines of one turn of the reactor written together (``TurnStream``)."""
    from mailrelay._log import JSONLineObserver, TextLineObserver, TurnStream

    if per_turn:
        from twisted.internet import reactor

        stream = TurnStream(stream, reactor)
    return JSONLineObserver(stream) if options["log-format"] == "json" else TextLineObserver(stream)


def makeService(options: Options) -> IService:
    from mailrelay.reload import SignalService

    cfg = options.loaded
    if cfg.server.workers > 1:
        from mailrelay.preflight import check
        from mailrelay.workers.supervisor import Supervisor

        try:
            check(
                cfg
            )  # the workers build the routes; their errors come from the file before they start
        except ConfigError as e:
            exit_config_error(e)

        # Our own observer on our own stream, so the workers' finished lines are copied into it
        # (with --syslog, twistd's observer; the workers then send events).
        stream = None if _twistd_option(options, "syslog") else _log_stream(options)
        top = _Standalone(None if stream is None else _observer(options, stream))
        # [server] workers comes from a file: --config is set
        supervisor = Supervisor(
            cfg, options["config"], log_stream=stream, log_format=options["log-format"]
        )
        supervisor.setServiceParent(top)
        SignalService(supervisor, options["config"]).setServiceParent(top)
        top.supervisor = supervisor
        return top

    from mailrelay.service import MailRelayService

    # --syslog: twistd's syslog observer for text lines (JSON lines still go to the log stream)
    syslog = _twistd_option(options, "syslog") and options["log-format"] != "json"
    top = _Standalone(None if syslog else _observer(options, _log_stream(options), per_turn=True))
    try:
        relay = MailRelayService(cfg)
    except ConfigError as e:
        # twistd would print a traceback; an operator wants the file, key and reason.
        exit_config_error(e)
    if cfg.spool.backend == "filesystem":
        top.spool_lock = _lock_spool(cfg.spool.path)
    relay.setServiceParent(top)
    SignalService(relay, options["config"]).setServiceParent(top)
    top.relay = relay
    return top


def _lock_spool(path: str) -> Any:
    """Hold the spool's lock for the life of the process, and take in the mail of the worker
    spools a run with ``[server] workers > 1`` left (mailrelay.queue.spool.shards)."""
    from mailrelay.queue.spool.shards import ShardBusy, ShardLock, drain

    try:
        lock = ShardLock(path).acquire()
    except (ShardBusy, OSError) as e:
        sys.stderr.write(f"mailrelay: {e}\n")
        raise SystemExit(1) from None
    drain(path, 1, held={0: lock})
    return lock
