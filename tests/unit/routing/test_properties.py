"""Properties over generated input: filter escaping is injection-proof; MX order respects
preferences."""

from __future__ import annotations

import random
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from mailrelay.envelope import Envelope
from mailrelay.routing.ldap import DEFAULT_FILTER, make_filter
from mailrelay.routing.mx import MXRouter
from mailrelay.testing import FakeResolver
from tests.support.routing.helpers import result_of


def unescape(value: str) -> str:
    return re.sub(r"\\([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


@given(st.text(min_size=0, max_size=60))
def test_any_address_stays_one_assertion_value(address: str) -> None:
    f = make_filter("(mailLocalAddress={address})", address)
    value = f[len("(mailLocalAddress=") : -1]
    assert not set(value) & set("*()\x00")  # nothing that could end the value or add a wildcard
    assert not re.search(r"\\(?![0-9a-f]{2})", value)  # every backslash starts an escape
    assert unescape(value) == address  # and it still means exactly the address


@given(st.text(max_size=30), st.text(max_size=30))
def test_default_filter_keeps_its_shape(local: str, domain: str) -> None:
    f = make_filter(DEFAULT_FILTER, f"{local}@{domain}")
    assert f.startswith("(&(objectClass=inetLocalMailRecipient)(mailLocalAddress=") and f.endswith(
        "))"
    )
    assert f.count("(") == 3 and f.count(")") == 3


@settings(max_examples=60)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3)), min_size=1, max_size=6),
    st.integers(0, 2**32),
)
def test_mx_hops_follow_preferences_and_keep_every_address(
    mxs: list[tuple[int, int]], seed: int
) -> None:
    """``mxs``: (preference, number of addresses) per MX host, in the order DNS gave them."""
    resolver = FakeResolver()
    expected = []
    for i, (pref, n) in enumerate(mxs):
        resolver.add("gen.test", "MX", (pref, f"mx{i}.gen.test"))
        for j in range(n):
            address = f"127.0.{i}.{j + 1}"
            resolver.add(f"mx{i}.gen.test", "A", address)
            expected.append(address)
    route = result_of(
        MXRouter(resolver, Clock(), random=random.Random(seed), max_hosts=100).route(
            "u@gen.test", Envelope("", ())
        )
    )
    prefs = [h.preference for h in route.hops]
    assert prefs == sorted(prefs)
    assert sorted(h.host for h in route.hops) == sorted(expected)
    for hop in route.hops:  # every address of one host together, in DNS order
        same = [h.host for h in route.hops if h.name == hop.name]
        assert same == sorted(same, key=lambda a: int(a.rsplit(".", 1)[1]))
