"""A dependency of routing goes away under a running relay: the DNS server (NSD) is stopped.

Mail accepted meanwhile is deferred with a temporary status (never bounced) and delivered once the
name server answers again; mail to the relay keeps being accepted all along.
(LDAP down is covered in tests/integration/routing/test_ldap_relay.py; the PostgreSQL queue is not
here yet.)
"""

from __future__ import annotations

import re
import time

import pytest

from tests.support.reliability.helpers import Raw, stuff, wait_for_ids
from tests.support.routing.nsd import NSD

pytestmark = pytest.mark.integration


def send(port: int, mid: str) -> bytes:
    with Raw(port) as c:
        c.greet()
        assert c.cmd("MAIL FROM:<s@example.org>").startswith(b"250")
        assert c.cmd("RCPT TO:<u@example.test>").startswith(b"250")
        assert c.cmd("DATA").startswith(b"354")
        c.send(stuff(f"Message-ID: <{mid}>\r\n\r\nhello\r\n".encode()))
        return c.reply()


def test_dns_server_stopped_defers_and_delivery_resumes_when_it_returns(relays, sinks):
    sink = sinks()  # mx1.example.test is 127.0.0.1: the sink's port is every MX host's port
    nsd = NSD().start()
    try:
        relay = relays(
            f'[queue]\nretry_schedule = ["1s"]\n[[routes]]\ntype = "mx"\n'
            f'nameservers = ["127.0.0.1:{nsd.port}"]\nport = {sink.port}\ntimeout = "1s"\n'
            f'min_ttl = "0s"\nmax_ttl = "1s"\nnegative_ttl = "0s"\n'
        )
        assert send(relay.port, "before@dns.test").startswith(b"250")
        assert wait_for_ids(sink, ["<before@dns.test>"], timeout=20) == {"<before@dns.test>": 1}
        nsd.stop()
        time.sleep(1.5)  # let any cached answer expire (max_ttl 1 s)
        down = [send(relay.port, f"down{i}@dns.test") for i in range(3)]
        deadline = time.monotonic() + 20
        while (
            len(re.findall(r"status=deferred", relay.log_text())) < 6
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        deferred = re.findall(r"dsn=(\S+), status=deferred \((.*)\)", relay.log_text())
        nsd.start()
        want = ["<before@dns.test>"] + [f"<down{i}@dns.test>" for i in range(3)]
        got = wait_for_ids(sink, want, timeout=30)
    finally:
        nsd.stop()
    log = relay.log_text()
    print(
        f"\nDNS down: accepted while down → {sorted({d[:9].decode() for d in down})}; "
        f"{len(deferred)} deferrals ({sorted({d for d, _ in deferred})}, e.g. "
        f"{deferred[0][1] if deferred else '-'}); after NSD returned: {dict(got)}"
    )
    assert all(d.startswith(b"250 2.0.0") for d in down)
    assert len(deferred) >= 6 and all(dsn.startswith("4.") for dsn, _ in deferred)
    assert got == {m: 1 for m in want}
    assert "status=bounced" not in log
