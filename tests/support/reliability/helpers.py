"""Small tools shared by the campaign: a raw SMTP client, sink counting by Message-ID, RSS."""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Iterable

from tests.support.peers import SMTPSink


def route_to(port: int, domains: str = '["*"]', extra: str = "", route_extra: str = "") -> str:
    """Config body: ``extra`` tables first, then one static route to ``127.0.0.1:port``."""
    return (
        f'{extra}\n[[routes]]\ntype = "static"\ndomains = {domains}\n'
        f'hosts = ["127.0.0.1:{port}"]\n{route_extra}'
    )


class Raw:
    """A byte-level SMTP client: send exactly what an attacker would, read replies one by one."""

    def __init__(self, port: int, source: str | None = None, timeout: float = 20.0) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.file = self.sock.makefile("rb")

    def reply(self) -> bytes:
        """One whole (possibly multiline) reply; b"" when the server closed the connection."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                return b"".join(lines)
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    def code(self) -> int:
        r = self.reply()
        return int(r[:3]) if r[:3].isdigit() else 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: bytes | str) -> bytes:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def greet(self, name: str = "client.example.org") -> bytes:
        assert self.reply().startswith(b"220"), "no greeting"
        ehlo = self.cmd(f"EHLO {name}")
        assert ehlo.startswith(b"250"), ehlo
        return ehlo

    def closed(self, wait: float = 5.0) -> bool:
        """True when the server has closed (EOF or reset) within ``wait`` seconds."""
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(65536) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stuff(data: bytes) -> bytes:
    """Dot-stuff CRLF text and end it with CRLF "." CRLF."""
    out = b"".join(
        b"." + ln if ln.startswith(b".") else ln for ln in data.splitlines(keepends=True)
    )
    return out + b".\r\n"


def message_ids(sink: SMTPSink) -> Counter[str]:
    """How many times each Message-ID arrived at the sink (a message without one counts as "?")."""
    got: Counter[str] = Counter()
    for t in sink.transactions():
        mid = "?"
        for line in t.data.split(b"\r\n"):
            if line.lower().startswith(b"message-id: "):
                mid = line[12:].decode(errors="replace")
                break
            if line == b"":
                break
        got[mid] += 1
    return got


def wait_for_ids(sink: SMTPSink, expected: Iterable[str], timeout: float = 60.0) -> Counter[str]:
    """Poll the sink until every expected Message-ID has arrived (or the time is up)."""
    want = set(expected)
    deadline = time.monotonic() + timeout
    while True:
        got = message_ids(sink)
        if want <= set(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB: its resident memory now and at its peak."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name] = value
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
