"""Real external peers for integration tests, started on loopback in temp dirs, stopped by PID.

Only the project's own code: nothing here depends on ../shared. Each helper finds the binary on
PATH and skips the test (``pytest.skip``) when the Debian package is missing and cannot be
installed;
``make test`` installs them first, so in CI they are always there.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from email import message_from_bytes
from email.message import Message
from pathlib import Path

import pytest


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (bound then released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_listening(
    host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"process exited with {proc.returncode} before listening on {host}:{port}"
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def flood_unread(
    s: socket.socket, data: bytes, stall: float = 1.0, done: Callable[[], bool] | None = None
) -> int:
    """A client that never reads its replies: after the greeting, write ``data`` and read nothing
    until
    all is sent or the server takes no more, which ``done()`` tells where the test sees the server's
    state, else no byte taken for ``stall`` seconds does; → bytes sent. Leaves ``s``
    non-blocking."""
    s.recv(1024)  # the greeting
    s.setblocking(False)
    sent, stuck_since = 0, None
    while sent < len(data):
        try:
            sent += s.send(data[sent : sent + 65536])
            stuck_since = None
        except BlockingIOError:
            if done is not None and done():
                break
            stuck_since = stuck_since or time.monotonic()
            if time.monotonic() - stuck_since > stall:  # the server reads no more
                break
            time.sleep(
                0.01
            )  # poll: select() would wait for more room than a server reading a little frees
    return sent


def require(binary: str) -> str:
    path = shutil.which(binary) or (
        f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None
    )
    if not path:
        pytest.skip(f"{binary} not installed (make test installs it)")
    return path


def stop_pid(pid: int, timeout: float = 5.0, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to a daemon we did not start as a child, wait until it is gone, else SIGKILL."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Transaction:
    """One message as smtp-sink dumped it: ``sender``, ``recipients`` and ``data``.

    smtp-sink writes its X-* and Received headers first, ends lines with LF and adds one LF at
    the end (it has already undone the dot-stuffing); ``data`` undoes that, giving the message bytes
    as the client meant them (CRLF line endings) — exact for messages without bare LF or CR.
    """

    def __init__(self, sender: str, recipients: list[str], data: bytes) -> None:
        self.sender, self.recipients, self.data = sender, recipients, data

    @classmethod
    def from_dump(cls, raw: bytes) -> Transaction:
        lines = raw.split(b"\n")
        sender, rcpts, i = "", [], 0
        while i < len(lines) and lines[i].startswith(b"X-"):
            name, _, value = lines[i].partition(b": ")
            if name == b"X-Mail-Args":
                sender = value.decode().split()[0].strip("<>")
            elif name == b"X-Rcpt-Args":
                rcpts.append(value.decode().split()[0].strip("<>"))
            i += 1
        if i < len(lines) and lines[i].startswith(b"Received: "):  # smtp-sink's own, folded
            i += 1
            while i < len(lines) and lines[i][:1] in (b"\t", b" "):
                i += 1
        body = lines[i:]
        if body and body[-1] == b"":
            body = body[:-1]  # the LF smtp-sink adds
        if body and body[-1] == b"":
            body = body[:-1]
        return cls(sender, rcpts, b"".join(ln + b"\r\n" for ln in body))


def stop_child(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, a child we started (waited for, so no zombie is left)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


class SMTPSink:
    """Postfix's ``smtp-sink``: accepts (or rejects, per flags) and optionally dumps each message.

    ``flags`` are extra smtp-sink options, e.g. ``["-r", "RCPT"]`` (450 every RCPT), ``["-p"]``
    (no PIPELINING), ``["-Q", "MAIL"]`` (421 and hang up at MAIL).
    """

    def __init__(
        self,
        port: int | None = None,
        flags: Sequence[str] = (),
        dump: bool = True,
        host: str = "127.0.0.1",
    ) -> None:
        self.binary = require("smtp-sink")
        self.host = host
        self.port = port or free_port(host)
        self.flags = list(flags)
        self.dump = dump
        self.dir = Path(tempfile.mkdtemp(prefix="mailrelay-sink-"))
        os.chmod(self.dir, 0o755)
        self.mail_dir = self.dir / "mail"
        self.proc: subprocess.Popen | None = None

    def start(self) -> SMTPSink:
        args = [self.binary, "-u", "nobody", "-c", "-m", "1000"]
        if self.dump:
            self.mail_dir.mkdir(exist_ok=True)
            shutil.chown(self.mail_dir, "nobody")
            # %s-like unique names: smtp-sink appends a counter after the strftime prefix
            args += ["-d", str(self.mail_dir / "%Y%m%d%H%M%S.")]
        listen = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        args += self.flags + [listen, "1024"]
        self.counters = open(self.dir / "counters", "wb")
        self.proc = subprocess.Popen(
            args,
            stdout=self.counters,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_listening(self.host, self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_child(self.proc)
            self.proc = None
            self.counters.close()

    def cleanup(self) -> None:
        """Stop it and delete its directory (what it received goes too)."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def count(self) -> int:
        """Messages the sink has counted (at the final dot)."""
        data = (self.dir / "counters").read_bytes()[-400:].replace(b"\r", b"\n").split(b"\n")
        for line in reversed(data):
            if b"mesg=" in line:
                return int(line.split(b"mesg=")[1].split()[0])
        return 0

    def messages(self) -> list[bytes]:
        """Raw dumped transactions (X-Mail-Args/X-Rcpt-Args headers first, then the message)."""
        if not self.mail_dir.exists():
            return []
        return [p.read_bytes() for p in sorted(self.mail_dir.iterdir())]

    def _dump_sizes(self) -> dict[str, int]:
        if not self.mail_dir.exists():
            return {}
        return {p.name: p.stat().st_size for p in self.mail_dir.iterdir()}

    def transactions(self) -> list[Transaction]:
        """Each dumped transaction decoded back to its envelope and the exact message bytes."""
        return [Transaction.from_dump(raw) for raw in self.messages()]

    def parsed(self) -> list[Message]:
        return [message_from_bytes(m) for m in self.messages()]

    def wait_for(self, n: int, timeout: float = 30.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # The counter moves at the final dot, but smtp-sink may still be flushing the dump file
            # then (and a file exists half-written before it): wait for both, and for the files
            # to stop changing.
            if self.count() >= n:
                if not self.dump:
                    return []
                before = self._dump_sizes()
                if len(before) >= n:
                    time.sleep(0.1)
                    if self._dump_sizes() == before:
                        return self.messages()
            time.sleep(0.05)
        got = len(self.messages()) if self.dump else self.count()
        raise TimeoutError(f"smtp-sink on port {self.port} got {got} of {n} messages in {timeout}s")


@pytest.fixture
def smtp_sink() -> Iterator[SMTPSink]:
    """A started, dumping smtp-sink on a free port; ``smtp_sink.wait_for(n)`` waits for n
    messages."""
    sink = SMTPSink().start()
    try:
        yield sink
    finally:
        sink.cleanup()
