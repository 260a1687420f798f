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

from tests.support.reliability.helpers import Raw, route_to, rss_kib, stuff, wait_for_ids

pytestmark = pytest.mark.integration

IDLE = 1000
PER_IP = 50
LIMITS = (
    f'[server]\nidle_timeout = "4s"\ndata_timeout = "4s"\nmax_connections = {IDLE + 10}\n'
    f"max_connections_per_ip = {PER_IP}\nlimit_trusted_clients = true\n"
)  # loopback is trusted


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


def open_crowd(port: int, n: int) -> list[socket.socket]:
    """``n`` connections, PER_IP from each address, each read up to its greeting, then silent."""
    crowd = []
    for i in range(n):
        s = connect(port, source(i))
        crowd.append(s)
        greeting = first_line(s)
        assert greeting.startswith(b"220"), (i, greeting)
    return crowd


def test_thousand_idle_connections_the_limits_hold(relays, sinks):
    """With a long idle timeout, so that a slow machine cannot blur the limits with timeouts."""
    enough_descriptors(4096)
    sink = sinks()
    relay = relays(LIMITS.replace('"4s"', '"120s"') + route_to(sink.port))
    assert relay.proc is not None
    rss_before, _ = rss_kib(relay.proc.pid)
    crowd: list[socket.socket] = []
    try:
        crowd = open_crowd(relay.port, IDLE)
        rss_full, _ = rss_kib(relay.proc.pid)
        # the per-address limit: a 51st connection from a busy address is turned away
        with connect(relay.port, source(0)) as extra:
            per_ip = first_line(extra)
        # a well-behaved client from elsewhere is served while the crowd sits there
        during = deliver_one(relay.port, "during@slowloris.test")
        # fill the rest of the total, then one more is turned away
        fillers = [connect(relay.port, f"127.0.200.{i + 1}") for i in range(10)]
        crowd += fillers
        assert all(first_line(s).startswith(b"220") for s in fillers)
        with connect(relay.port, "127.0.201.1") as over:
            total = first_line(over)
        _, peak = rss_kib(relay.proc.pid)
    finally:
        for s in crowd:
            s.close()
    got = wait_for_ids(sink, ["<during@slowloris.test>"], timeout=20)
    print(
        f"\nslowloris: {IDLE} idle connections from {IDLE // PER_IP} addresses; 51st from one "
        f"address → {per_ip.decode().strip()}; over the total → {total.decode().strip()}; "
        f"well-behaved client during the crowd → {during.decode().strip()[:30]}; RSS {rss_before} "
        f"KiB before, {rss_full} KiB with {IDLE} connections, peak {peak} KiB "
        f"(+{(peak - rss_before) // 1024} MiB)"
    )
    assert per_ip.startswith(b"421 4.7.0"), per_ip
    assert total.startswith(b"421 4.7.0"), total
    assert during.startswith(b"250 2.0.0")
    assert got == {"<during@slowloris.test>": 1}
    assert peak - rss_before < 64 * 1024, "more than 64 MiB for a thousand idle sessions"


def test_thousand_idle_connections_all_time_out(relays, sinks):
    enough_descriptors(4096)
    sink = sinks()
    relay = relays(LIMITS.replace('"4s"', '"2s"') + route_to(sink.port))
    crowd: list[socket.socket] = []
    try:
        crowd = open_crowd(relay.port, IDLE)
        for s in crowd:
            s.settimeout(30)
        timeouts = [first_line(s) for s in crowd]  # each after its own idle timeout
        closed = sum(1 for s in crowd if s.recv(1) == b"")
        after = deliver_one(relay.port, "after@slowloris.test")
    finally:
        for s in crowd:
            s.close()
    got = wait_for_ids(sink, ["<after@slowloris.test>"], timeout=20)
    kinds = {t[:9] for t in timeouts}
    print(
        f"\nslowloris timeouts: {len(crowd)} idle connections → {sorted(kinds)}, {closed} closed "
        f"by the relay; "
        f"a well-behaved client afterwards → {after.decode().strip()[:30]}"
    )
    assert kinds == {b"421 4.4.2"}, kinds
    assert closed == len(crowd)
    assert after.startswith(b"250 2.0.0") and got == {"<after@slowloris.test>": 1}


class Trickler(threading.Thread):
    """Sends a valid session one byte every ``gap`` seconds; records when the server hung up."""

    def __init__(
        self,
        port: int,
        src: str,
        gap: float,
        prefix: bytes = b"",
        script: bytes = b"EHLO trickle.example\r\n" + b"NOOP\r\n" * 1000,
    ) -> None:
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
    relay = relays(
        LIMITS.replace('"4s"', '"60s"') + route_to(sink.port)
    )  # no timeout blurs the limit
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
    print(
        f"\ntricklers: {PER_IP} clients at 2 bytes/s from one address; one more → "
        f"{refused.decode().strip()}; 5 well-behaved messages meanwhile → "
        f"{sorted({r[:9].decode() for r in replies})}"
    )
    assert refused.startswith(b"421 4.7.0")
    assert all(r.startswith(b"250 2.0.0") for r in replies)
    assert got == {f"<fine{i}@trickle.test>": 1 for i in range(5)}


def test_a_command_line_trickled_slower_than_the_idle_timeout_is_cut_off(relays):
    """The timeout counts from the last complete command line, not the last byte (slowloris)."""
    relay = relays(LIMITS.replace('"4s"', '"1s"') + route_to(1))
    t = Trickler(
        relay.port, "127.0.60.1", 0.4
    )  # 2.4 s for each "NOOP\r\n" against a 1 s idle timeout
    # the same in DATA: each text line takes longer than the (1 s) DATA timeout
    d = Trickler(
        relay.port,
        "127.0.60.2",
        0.4,
        prefix=b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n",
        script=b"Subject: slow\r\n" * 100 + b".\r\n",
    )
    for x in (t, d):
        x.start()
    for x in (t, d):
        x.join(6)
        x.stopping.set()
        x.join(5)
    print(
        f"\ntricklers at 1 byte per 0.4 s against a 1 s timeout: commands cut off after {t.lasted} "
        f"s ({t.sent} bytes), DATA cut off after {d.lasted} s ({d.sent} bytes), last reply "
        f"{d.received.splitlines()[-1:]}"
    )
    assert t.lasted is not None, "a trickling client outlived five idle timeouts"
    assert d.lasted is not None, "a trickling DATA client outlived five DATA timeouts"
    assert b"421 4.4.2" in t.received and b"421 4.4.2" in d.received
    assert b"queued" not in d.received
