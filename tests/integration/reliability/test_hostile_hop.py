"""A hostile next hop floods our client: an endless multiline greeting, one endless line, an endless
answer to the final dot. The relay gives up on that session with a temporary failure, its memory
stays bounded (RSS of the relay process), and nothing is bounced.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.support.reliability.helpers import Raw, route_to, rss_kib, stuff

pytestmark = pytest.mark.integration

FLOOD = 64 * 1024 * 1024  # octets a hostile hop is willing to send per connection


MODES = ["greeting lines", "endless line", "endless final reply"]


class FloodingHop(threading.Thread):
    """Floods each connection in the next of ``MODES`` and counts what it managed to send."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.connections = 0
        self.sent = 0

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            mode = MODES[self.connections % len(MODES)]
            self.connections += 1
            threading.Thread(target=self.serve, args=(conn, mode), daemon=True).start()
        self.listener.close()

    def flood(self, conn: socket.socket, head: bytes, unit: bytes) -> None:
        conn.sendall(head)
        block = unit * (65536 // len(unit))
        sent = 0
        while sent < FLOOD and not self.stopping.is_set():
            conn.sendall(block)
            sent += len(block)
            self.sent += len(block)

    def serve(self, conn: socket.socket, mode: str) -> None:
        conn.settimeout(10)
        try:
            if mode == "greeting lines":
                self.flood(conn, b"", b"220-flood flood flood flood flood\r\n")
            elif mode == "endless line":
                self.flood(conn, b"220 ", b"x")
            elif mode == "endless final reply":
                f = conn.makefile("rb")
                conn.sendall(b"220 hostile ESMTP\r\n")
                f.readline()
                conn.sendall(b"250 hostile\r\n")
                while (line := f.readline()) and not line.startswith(b"DATA"):
                    conn.sendall(b"250 ok\r\n")
                conn.sendall(b"354 go\r\n")
                while (line := f.readline()) not in (b".\r\n", b""):
                    pass
                self.flood(conn, b"", b"250-still going\r\n")
        except OSError:
            pass  # the client hung up on us: what we want
        finally:
            conn.close()


def test_a_flooding_next_hop_is_cut_off_with_bounded_memory(relays):
    hop = FloodingHop()
    hop.start()
    try:
        relay = relays(route_to(hop.port, extra='[queue]\nretry_schedule = ["1s"]\n'))
        assert relay.proc is not None
        base, _ = rss_kib(relay.proc.pid)
        with Raw(relay.port) as c:
            c.greet()
            assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
            assert c.cmd("RCPT TO:<b@example.test>").startswith(b"250")
            assert c.cmd("DATA").startswith(b"354")
            c.send(stuff(b"Message-ID: <flood@client.example>\r\n\r\nhi\r\n"))
            assert c.reply().startswith(b"250 2.0.0")
        deadline = time.monotonic() + 20
        while (
            relay.log_text().count("status=deferred") < len(MODES) and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        _, peak = rss_kib(relay.proc.pid)
        log = relay.log_text()
    finally:
        hop.stopping.set()
        hop.join(5)
    deferred = [ln.split("status=")[1] for ln in log.splitlines() if "status=deferred" in ln]
    print(
        f"\nhostile hop ({', '.join(MODES)}): {hop.connections} connections, it got "
        f"{hop.sent // 1024} KiB out before we hung up "
        f"({hop.sent // max(1, hop.connections) // 1024} KiB each); relay peak RSS "
        f"+{(peak - base) // 1024} MiB; deferrals:"
    )
    for d in deferred:
        print(f"  {d[:150]}")
    assert len(deferred) >= len(MODES) and all("(451 4.5.0" in d for d in deferred)
    assert all(
        any(why in d for d in deferred)
        for why in (
            "too many lines in one reply in reply to GREETING",
            "reply line longer than",
            "too many lines in one reply in reply to DATA-END",
        )
    )
    assert "status=bounced" not in log and "status=sent" not in log
    assert hop.sent < hop.connections * FLOOD, "the client read a whole flood instead of hanging up"
    assert peak - base < 32 * 1024
