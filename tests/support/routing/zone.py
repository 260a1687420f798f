"""The DNS zone of the routing tests, in memory: the MX router's and the LDAP router's tests
resolve through it."""

from __future__ import annotations

from mailrelay.testing import FakeResolver


def zone() -> FakeResolver:
    """The same records as the NSD zone the integration tests serve (``nsd.py`` here)."""
    r = FakeResolver(ttl=300)
    r.add(
        "example.test",
        "MX",
        (10, "mx1.example.test"),
        (20, "mx2.example.test"),
        (30, "mx3.example.test"),
    )
    r.add("example.test", "A", "127.0.0.1")
    r.add("mx1.example.test", "A", "127.0.0.1").add("mx1.example.test", "AAAA", "::1")
    r.add("mx2.example.test", "A", "127.0.0.2")
    r.add("mx3.example.test", "AAAA", "::1")
    r.add("equal.test", "MX", (10, "mx1.example.test"), (10, "mx2.example.test"))
    r.add("nullmx.test", "MX", (0, "")).add("nullmx.test", "A", "127.0.0.1")
    r.add("nomx.test", "A", "127.0.0.2")
    r.add("nomx6.test", "AAAA", "::1")
    r.add("badmx.test", "MX", (10, "nowhere.badmx.test"))
    r.add("cnamemx.test", "MX", (10, "alias.cnamemx.test"))
    r.add("alias.cnamemx.test", "CNAME", "mx1.example.test")
    r.add("empty.test", "TXT", "nothing here")
    return r
