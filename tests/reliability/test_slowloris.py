"""Slowloris: 1,000 idle connections and clients that send one byte at a time.

The connection limits (total and per client address) hold with a clear 421 4.7.0, the idle timeout
closes every idle connection with 421 4.4.2, the relay's memory stays bounded, and a well-behaved
client is served all along. Loopback has a whole /8, so the idle crowd comes from many addresses.
"""

from __future__ import annotations

import resource
import socket
import threading
import time

import pytest

from tests.reliability.helpers import Raw, route_to, rss_kib, stuff, wait_for_ids

pytestmark = pytest.mark.integration

IDLE = 1000
PER_IP = 50
LIMITS = f'[server]\nidle_timeout = "4s"\ndata_timeout = "4s"\nmax_connections = {IDLE + 10}\n' \
         f"max_connections_per_ip = {PER_IP}\n"


def source(i: int) -> str:
    """The address of the i-th idle connection: PER_IP connections from each."""
    return f"127.0.{10 + i // PER_IP}.1"


def connect(port: int, src: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(src, 0))


def first_line(s: socket.socket) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        out += chunk
    return out


def deliver_one(port: int, mid: str, src: str = "127.0.0.1") -> bytes:
    with Raw(port, source=src) as c:
        c.greet()
        assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
        assert c.cmd("RCPT TO:<b@example.test>").startswith(b"250")
        assert c.cmd("DATA").startswith(b"354")
        c.send(stuff(f"Message-ID: <{mid}>\r\n\r\nwell-behaved\r\n".encode()))
        return c.reply()


def enough_descriptors(n: int) -> None:
    """Raise our (and so the relay child's) open-file limit to ``n`` or skip."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.skip(f"needs {n} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def test_thousand_idle_connections_limits_and_timeouts_hold(relays, sinks):
    enough_descriptors(4096)
    sink = sinks()
    relay = relays(LIMITS + route_to(sink.port))
    assert relay.proc is not None
    rss_before, _ = rss_kib(relay.proc.pid)
    idle: list[socket.socket] = []
    try:
        greetings = []
        for i in range(IDLE):  # 20 addresses × 50 connections, each greeted, then silent
            s = connect(relay.port, source(i))
            idle.append(s)
            greetings.append(first_line(s))
        assert all(g.startswith(b"220") for g in greetings), {g for g in greetings if not g.startswith(b"220")}
        rss_full, _ = rss_kib(relay.proc.pid)
        # the per-address limit: a 51st connection from a busy address is turned away
        with connect(relay.port, source(0)) as extra:
            per_ip = first_line(extra)
        # a well-behaved client from elsewhere is served while the crowd sits there
        during = deliver_one(relay.port, "during@slowloris.test")
        # fill the rest of the total, then one more is turned away
        fillers = [connect(relay.port, f"127.0.200.{i + 1}") for i in range(10)]
        assert all(first_line(s).startswith(b"220") for s in fillers)
        idle += fillers
        with connect(relay.port, "127.0.201.1") as over:
            total = first_line(over)
        # the idle timeout closes every one of them with 421 4.4.2
        for s in idle:
            s.settimeout(15)
        timeouts = [first_line(s) for s in idle]
        closed = sum(1 for s in idle if s.recv(1) == b"")
        after = deliver_one(relay.port, "after@slowloris.test")
        rss_after, peak = rss_kib(relay.proc.pid)
    finally:
        for s in idle:
            s.close()
    got = wait_for_ids(sink, ["<during@slowloris.test>", "<after@slowloris.test>"], timeout=20)
    kinds = {t[:9] for t in timeouts}
    print(f"\nslowloris: {IDLE} idle connections from {IDLE // PER_IP} addresses; 51st from one address → "
          f"{per_ip.decode().strip()}; over the total → {total.decode().strip()}; well-behaved client during "
          f"the crowd → {during.decode().strip()[:30]}; idle timeout → {len(idle)} × {sorted(kinds)}, "
          f"{closed} closed; RSS {rss_before} KiB idle, {rss_full} KiB with {IDLE} connections, "
          f"{rss_after} KiB after, peak {peak} KiB")
    assert per_ip.startswith(b"421 4.7.0"), per_ip
    assert total.startswith(b"421 4.7.0"), total
    assert during.startswith(b"250 2.0.0") and after.startswith(b"250 2.0.0")
    assert kinds == {b"421 4.4.2"}, kinds
    assert closed == len(idle)
    assert got == {"<during@slowloris.test>": 1, "<after@slowloris.test>": 1}
    assert peak - rss_before < 64 * 1024, "more than 64 MiB for a thousand idle sessions"


class Trickler(threading.Thread):
    """Sends a valid session one byte every ``gap`` seconds; records when the server hung up."""

    def __init__(self, port: int, src: str, gap: float, prefix: bytes = b"",
                 script: bytes = b"EHLO trickle.example\r\n" + b"NOOP\r\n" * 1000) -> None:
        super().__init__(daemon=True)
        self.port, self.src, self.gap = port, src, gap
        self.prefix, self.script = prefix, script
        self.received = b""
        self.start_time = 0.0
        self.lasted: float | None = None
        self.sent = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        s = connect(self.port, self.src)
        s.settimeout(0.01)
        self.start_time = time.monotonic()
        try:
            if self.prefix:
                s.sendall(self.prefix)
            for byte in self.script:
                if self.stopping.is_set():
                    return
                s.sendall(bytes([byte]))
                self.sent += 1
                time.sleep(self.gap)
                try:
                    while True:  # drain replies; an EOF means we were cut off
                        data = s.recv(65536)
                        self.received += data
                        if data == b"":
                            self.lasted = time.monotonic() - self.start_time
                            return
                except (TimeoutError, BlockingIOError):
                    pass
        except OSError:
            self.lasted = time.monotonic() - self.start_time
        finally:
            s.close()


def test_one_byte_a_second_clients_do_not_starve_well_behaved_ones(relays, sinks):
    """Tricklers never idle long enough to time out; the per-address limit caps them and the rest
    of the relay keeps serving."""
    sink = sinks()
    relay = relays(LIMITS + route_to(sink.port))
    tricklers = [Trickler(relay.port, "127.0.50.1", 0.5) for _ in range(PER_IP)]
    for t in tricklers:
        t.start()
    time.sleep(1.0)
    try:
        with connect(relay.port, "127.0.50.1") as extra:
            refused = first_line(extra)
        replies = [deliver_one(relay.port, f"fine{i}@trickle.test") for i in range(5)]
    finally:
        for t in tricklers:
            t.stopping.set()
        for t in tricklers:
            t.join(5)
    got = wait_for_ids(sink, [f"<fine{i}@trickle.test>" for i in range(5)], timeout=20)
    print(f"\ntricklers: {PER_IP} clients at 2 bytes/s from one address; one more → {refused.decode().strip()}; "
          f"5 well-behaved messages meanwhile → {sorted({r[:9].decode() for r in replies})}")
    assert refused.startswith(b"421 4.7.0")
    assert all(r.startswith(b"250 2.0.0") for r in replies)
    assert got == {f"<fine{i}@trickle.test>": 1 for i in range(5)}


def test_a_command_line_trickled_slower_than_the_idle_timeout_is_cut_off(relays):
    """The timeout counts from the last complete command line, not the last byte (slowloris)."""
    relay = relays(LIMITS.replace('"4s"', '"1s"') + route_to(1))
    t = Trickler(relay.port, "127.0.60.1", 0.4)  # 2.4 s for each "NOOP\r\n" against a 1 s idle timeout
    # the same in DATA: each text line takes longer than the (1 s) DATA timeout
    d = Trickler(relay.port, "127.0.60.2", 0.4, prefix=b"EHLO x\r\nMAIL FROM:<a@example.org>\r\n"
                 b"RCPT TO:<b@example.test>\r\nDATA\r\n", script=b"Subject: slow\r\n" * 100 + b".\r\n")
    for x in (t, d):
        x.start()
    for x in (t, d):
        x.join(6)
        x.stopping.set()
        x.join(5)
    print(f"\ntricklers at 1 byte per 0.4 s against a 1 s timeout: commands cut off after {t.lasted} s "
          f"({t.sent} bytes), DATA cut off after {d.lasted} s ({d.sent} bytes), last reply "
          f"{d.received.splitlines()[-1:]}")
    assert t.lasted is not None, "a trickling client outlived five idle timeouts"
    assert d.lasted is not None, "a trickling DATA client outlived five DATA timeouts"
    assert b"421 4.4.2" in t.received and b"421 4.4.2" in d.received
    assert b"queued" not in d.received
