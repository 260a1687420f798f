"""A real authoritative DNS server (NLnet Labs NSD) on loopback for MX routing tests.

Writes the zone and an ``nsd.conf`` into a temp dir and runs ``nsd -d`` (foreground, so the PID we
hold is the main process; SIGTERM stops its children too) on a free port of 127.0.0.1 and ::1.
Authoritative only: names outside the zone get REFUSED, which the tests use too.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.names import dns

from tests.support.peers import free_port, require, stop_child

# The zone of the integration tests: every MX host is on 127.0.0.x or ::1, so one SMTP port serves
# all.
ZONE = """\
$ORIGIN test.
$TTL 60
@                 SOA   ns.test. hostmaster.test. 2024010101 3600 600 86400 60
@                 NS    ns.test.
ns                A     127.0.0.1
example           MX    10 mx1.example.test.
example           MX    20 mx2.example.test.
example           MX    30 mx3.example.test.
example           A     127.0.0.1
mx1.example       A     127.0.0.1
mx1.example       AAAA  ::1
mx2.example       A     127.0.0.2
mx3.example       AAAA  ::1
mailstore1.example A    127.0.0.1
equal             MX    10 mx1.example.test.
equal             MX    10 mx2.example.test.
nullmx            MX    0 .
nullmx            A     127.0.0.1
nomx              A     127.0.0.2
nomx6             AAAA  ::1
fallback          MX    10 dead.fallback.test.
fallback          MX    20 mx1.example.test.
dead.fallback     A     127.0.0.3
badmx             MX    10 nowhere.badmx.test.
cnamemx           MX    10 alias.cnamemx.test.
alias.cnamemx     CNAME mx1.example.test.
other             MX    10 mx2.example.test.
empty             TXT   "exists, but no MX, A or AAAA"
"""


class NSD:
    """``NSD(zones={"test": ZONE}).start()``; ``.port``; ``.stop()`` (and start again: same
    port)."""

    def __init__(self, zones: dict[str, str] | None = None, port: int | None = None) -> None:
        self.binary = require("nsd")
        self.zones = zones if zones is not None else {"test": ZONE}
        self.port = port or _free_udp_and_tcp_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mailrelay-nsd-"))
        self.proc: subprocess.Popen | None = None
        self._write()

    def _write(self) -> None:
        d = self.dir
        zones = ""
        for name, text in self.zones.items():
            (d / f"{name}.zone").write_text(text)
            zones += f'zone:\n    name: "{name}"\n    zonefile: "{d / name}.zone"\n'
        (d / "nsd.conf").write_text(f"""\
server:
    ip-address: 127.0.0.1@{self.port}
    ip-address: ::1@{self.port}
    username: ""
    chroot: ""
    zonesdir: "{d}"
    database: ""
    zonelistfile: "{d}/zone.list"
    xfrdfile: "{d}/xfrd.state"
    xfrdir: "{d}"
    pidfile: "{d}/nsd.pid"
    logfile: "{d}/nsd.log"
    server-count: 1
    verbosity: 1
    hide-version: yes
remote-control:
    control-enable: no
{zones}""")

    def start(self, timeout: float = 10.0) -> NSD:
        self.out = open(self.dir / "nsd.out", "wb")
        self.proc = subprocess.Popen(
            [self.binary, "-d", "-c", str(self.dir / "nsd.conf")],
            stdout=self.out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nsd exited with {self.proc.returncode}: {self.log()}")
            if _answers_soa(self.port, next(iter(self.zones))):
                return self
            time.sleep(0.05)
        raise TimeoutError(f"nsd did not answer on port {self.port}: {self.log()}")

    def log(self) -> str:
        return "".join(
            p.read_text(errors="replace")
            for p in (self.dir / "nsd.out", self.dir / "nsd.log")
            if p.exists()
        )

    def stop(self) -> None:
        if self.proc is not None:
            stop_child(self.proc)
            self.proc = None
            self.out.close()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_udp_and_tcp_port() -> int:
    for _ in range(50):
        port = free_port()
        try:
            for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                with socket.socket(family, socket.SOCK_DGRAM) as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port for both UDP and TCP")


def _answers_soa(port: int, zone: str) -> bool:
    query = dns.Message(id=4242)
    query.addQuery(f"{zone}.", dns.SOA)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        try:
            s.sendto(query.toStr(), ("127.0.0.1", port))
            data = s.recv(4096)
        except OSError:
            return False
    answer = dns.Message()
    answer.fromStr(data)
    return answer.id == 4242 and answer.rCode == dns.OK and bool(answer.answers)


@pytest.fixture(scope="module")
def nsd() -> Iterator[NSD]:
    """NSD serving ``ZONE`` (zone ``test.``) on 127.0.0.1 and ::1, one free port, for a whole
    module."""
    server = NSD().start()
    try:
        yield server
    finally:
        server.cleanup()
