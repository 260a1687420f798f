"""A relay for end-to-end tests: a real ``twistd -n mailrelay`` child process in a temp dir on a
free
port, or a MailRelayService in the test's own reactor (``run_in_process``)."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task, threads

from mailrelay.service import MailRelayService
from tests.support.peers import free_port, stop_child, wait_listening


class RelayProcess:
    """Writes ``mailrelay.toml`` (``[server] listen`` and ``[spool] path`` filled in) and runs
    twistd.

    ``config_body`` is the rest of the TOML (routes, queue, ...), without ``listen``/``path``.
    ``args`` are extra ``twistd mailrelay`` options (``["--log-format", "json"]``).
    ``spool_keys`` are more ``[spool]`` lines (``backend = "postgresql"``, ``dsn = ...``).
    The directory (spool, log) survives ``kill()``/``stop()`` so the same relay can be restarted.
    """

    def __init__(
        self,
        config_body: str = "",
        port: int | None = None,
        hostname: str = "relay.mailrelay.test",
        directory: Path | None = None,
        args: Sequence[str] = (),
        spool_keys: str = "",
    ) -> None:
        self.args = list(args)
        self.port = port or free_port()
        self.dir = directory or Path(tempfile.mkdtemp(prefix="mailrelay-relay-"))
        self.spool = self.dir / "spool"
        self.log = self.dir / "twistd.log"
        self.config = self.dir / "mailrelay.toml"
        self.hostname = hostname
        server_keys, rest = _split_server(config_body)
        self.config.write_text(
            "[server]\n"
            f'hostname = "{hostname}"\n'
            f'listen = ["tcp:{self.port}:interface=127.0.0.1"]\n'
            + server_keys
            + f'\n[spool]\npath = "{self.spool}"\n{spool_keys}\n'
            + rest
        )
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> RelayProcess:
        twistd = str(Path(sys.executable).parent / "twistd")
        args = [
            twistd,
            "-n",
            "--pidfile=",
            f"--logfile={self.log}",
            "mailrelay",
            "--config",
            str(self.config),
            *self.args,
        ]
        self.proc = subprocess.Popen(
            args,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_listening("127.0.0.1", self.port, timeout=timeout, proc=self.proc)
        except Exception as e:
            raise RuntimeError(
                f"{e}\n--- log ---\n{self.log_text()}\n--- output ---\n{self.output()}"
            ) from None
        return self

    def output(self) -> str:
        if self.proc is None or self.proc.poll() is None or self.proc.stdout is None:
            return ""
        return self.proc.stdout.read().decode(errors="replace")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to tidy up."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> int | None:
        """SIGTERM and wait: returns the exit status."""
        if self.proc is None:
            return None
        stop_child(self.proc, timeout=15)
        rc = self.proc.returncode
        self.proc = None
        return rc

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def wait_log(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text():
                return
            time.sleep(0.05)
        raise TimeoutError(
            f"{text!r} not in the relay's log after {timeout}s:\n{self.log_text()[-3000:]}"
        )

    def queue_files(self) -> list[Path]:
        """The spool's files, less tmp/spare.<n> (files of removed messages kept for new ones)."""
        return sorted(
            p
            for p in self.spool.rglob("*")
            if p.is_file() and not (p.parent.name == "tmp" and p.name.startswith("spare."))
        )


def _split_server(body: str) -> tuple[str, str]:
    """Lift the keys of a leading ``[server]`` table out of ``body`` to merge them with ours."""
    if not body.lstrip().startswith("[server]"):
        return "", body
    text = body.lstrip()[len("[server]") :]
    idx = text.find("\n[")
    if idx < 0:
        return text, ""
    return text[: idx + 1], text[idx + 1 :]


class Sender(threading.Thread):
    """Sends numbered messages over fresh sessions until stopped, through relay restarts and kills.

    ``acked`` gets each Message-ID only after its 250; ``tried`` (if given) gets it before DATA, so
    a crash test can tell a message the relay never confirmed from one it lost.
    """

    def __init__(
        self,
        port: int,
        tag: str,
        acked: list[str],
        tried: list[str] | None = None,
        *,
        per_session: int = 5,
        recipients: tuple[str, ...] = ("r@example.test",),
        size: int = 500,
        pause: float = 0.05,
    ) -> None:
        super().__init__(daemon=True)
        self.port, self.tag, self.acked, self.tried = port, tag, acked, tried
        self.per_session, self.recipients, self.size, self.pause = (
            per_session,
            list(recipients),
            size,
            pause,
        )
        self.stopping = threading.Event()
        self.n = 0

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
                    for _ in range(self.per_session):
                        self.n += 1
                        mid = f"<{self.tag}.{self.n}@crash.test>"
                        body = f"Message-ID: {mid}\r\nSubject: crash\r\n\r\n{'z' * self.size}\r\n"
                        if self.tried is not None:
                            self.tried.append(mid)
                        client.sendmail("s@example.org", self.recipients, body.encode())
                        self.acked.append(mid)  # only after the 250
            except (OSError, smtplib.SMTPException):
                time.sleep(self.pause)  # the relay is down, or was killed mid-session


@defer.inlineCallbacks
def run_in_process(
    relay: MailRelayService, client: Callable[[int], object], then: Callable[[], Any] = lambda: None
) -> Generator[Any, Any, Any]:
    """Start ``relay``, run ``client(port)`` (its first listener's port) in a thread, then wait for
    ``then()`` (a value or a Deferred) and stop the relay whatever happened; → ``then()``'s
    result."""
    relay.startService()
    try:
        yield relay.listeners[0].listening
        yield threads.deferToThread(client, relay.ports[0].getHost().port)
        result = yield defer.maybeDeferred(then)
    finally:
        yield relay.stopService()
    return result


@defer.inlineCallbacks
def wait_until(condition: Callable[[], Any], timeout: float) -> Generator[Any, Any, bool]:
    """Poll ``condition()`` (a value or a Deferred) without blocking the reactor until it is true or
    ``timeout`` seconds have passed; → whether it came true (the caller asserts, with its
    context)."""
    deadline = time.monotonic() + timeout
    while not (yield defer.maybeDeferred(condition)):
        if time.monotonic() > deadline:
            return False
        yield task.deferLater(reactor, 0.05, lambda: None)
    return True
