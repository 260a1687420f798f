"""MXRouter against a real NSD zone over UDP on loopback (the resolver asks exactly that server)."""

from __future__ import annotations

import random
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from mailrelay.envelope import Envelope
from mailrelay.errors import PermanentFailure, TemporaryFailure
from mailrelay.routing.context import RouterContext
from mailrelay.routing.mx import MXRouter
from tests.support.routing.nsd import NSD

pytestmark = pytest.mark.integration

ENV = Envelope("s@example.org", ())


def mx_router(server: NSD, seed: int = 1, **options: Any) -> MXRouter:
    options = {
        "nameservers": [f"127.0.0.1:{server.port}"],
        "port": 2525,
        "timeout": "2s",
        **options,
    }
    return MXRouter.from_options(
        options, RouterContext(reactor, key="routes[0]", random=random.Random(seed))
    )


async def hops(router: MXRouter, recipient: str) -> list[tuple[str, int, str | None]]:
    route = await router.route(recipient, ENV)
    return [(h.host, h.preference, h.name) for h in route.hops]


async def failure(router: MXRouter, recipient: str) -> tuple[type, int, str | None]:
    try:
        await router.route(recipient, ENV)
    except (PermanentFailure, TemporaryFailure) as e:
        return type(e), e.reply.code, e.reply.enhanced
    raise AssertionError(f"{recipient} was routed")


@pytest_twisted.ensureDeferred
async def test_preferences_in_order_all_addresses(nsd: NSD) -> None:
    assert await hops(mx_router(nsd), "u@example.test") == [
        ("127.0.0.1", 10, "mx1.example.test"),
        ("::1", 10, "mx1.example.test"),
        ("127.0.0.2", 20, "mx2.example.test"),
    ]


@pytest_twisted.ensureDeferred
async def test_equal_preferences_in_random_order(nsd: NSD) -> None:
    firsts = set()
    for seed in range(12):
        firsts.add((await hops(mx_router(nsd, seed), "u@equal.test"))[0][2])
    assert firsts == {"mx1.example.test", "mx2.example.test"}


@pytest_twisted.ensureDeferred
async def test_implicit_mx(nsd: NSD) -> None:
    router = mx_router(nsd)
    assert await hops(router, "u@nomx.test") == [("127.0.0.2", 0, "nomx.test")]
    assert await hops(router, "u@nomx6.test") == [("::1", 0, "nomx6.test")]


@pytest_twisted.ensureDeferred
async def test_mx_to_cname_and_dead_first_mx_kept_in_order(nsd: NSD) -> None:
    router = mx_router(nsd)
    assert await hops(router, "u@cnamemx.test") == [
        ("127.0.0.1", 10, "alias.cnamemx.test"),
        ("::1", 10, "alias.cnamemx.test"),
    ]
    assert [h[0] for h in await hops(router, "u@fallback.test")] == [
        "127.0.0.3",
        "127.0.0.1",
        "::1",
    ]


@pytest_twisted.ensureDeferred
async def test_permanent_answers(nsd: NSD) -> None:
    router = mx_router(nsd)
    assert await failure(router, "u@nullmx.test") == (PermanentFailure, 556, "5.1.10")
    assert await failure(router, "u@nxdomain.test") == (PermanentFailure, 550, "5.1.2")
    assert await failure(router, "u@badmx.test") == (PermanentFailure, 550, "5.4.4")
    assert await failure(router, "u@empty.test") == (PermanentFailure, 550, "5.4.4")


@pytest_twisted.ensureDeferred
async def test_refused_is_temporary(nsd: NSD) -> None:
    # NSD is authoritative for test. only: any other name is REFUSED
    assert await failure(mx_router(nsd), "u@example.org") == (TemporaryFailure, 451, "4.4.3")


@pytest_twisted.ensureDeferred
async def test_server_down_is_temporary_then_routes_when_it_returns() -> None:
    server = NSD()
    try:
        router = mx_router(server, timeout="0.6s")
        assert await failure(router, "u@example.test") == (TemporaryFailure, 451, "4.4.3")
        server.start()
        assert (await hops(router, "u@example.test"))[0][0] == "127.0.0.1"
    finally:
        server.cleanup()


@pytest_twisted.ensureDeferred
async def test_over_ipv6_nameserver(nsd: NSD) -> None:
    router = mx_router(nsd, nameservers=[f"[::1]:{nsd.port}"])
    assert (await hops(router, "u@example.test"))[0] == ("127.0.0.1", 10, "mx1.example.test")
