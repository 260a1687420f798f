"""LDAPRouter against a real slapd (and NSD for mailHost names), ldap3 running in a thread pool."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool

from mailrelay.envelope import Envelope
from mailrelay.errors import PermanentFailure, TemporaryFailure
from mailrelay.routing.context import RouterContext
from mailrelay.routing.ldap import LDAPRouter
from tests.support.routing.nsd import NSD
from tests.support.routing.slapd import BASE, BIND_DN, BIND_PASSWORD, Slapd

pytestmark = pytest.mark.integration

ENV = Envelope("s@example.org", ())


@pytest.fixture
def threadpool() -> Iterator[ThreadPool]:
    pool = ThreadPool(minthreads=0, maxthreads=4, name="test-ldap")
    pool.start()
    yield pool
    pool.stop()


def ldap_router(
    slapd: Slapd, nsd: NSD, threadpool: ThreadPool, drop: tuple[str, ...] = (), **options: Any
) -> LDAPRouter:
    options = {
        "uri": slapd.uri,
        "bind_dn": BIND_DN,
        "bind_password": BIND_PASSWORD,
        "base": BASE,
        "nameservers": [f"127.0.0.1:{nsd.port}"],
        "port": 2525,
        **options,
    }
    for key in drop:
        del options[key]
    context = RouterContext(
        reactor,
        threadpool=threadpool,
        source="relay.toml",
        key="routes[0]",
        random=random.Random(1),
    )
    return LDAPRouter.from_options(options, context)


class ThreadRecorder:
    """Wraps a directory to record which thread each search ran in."""

    def __init__(self, directory: Any) -> None:
        self.directory, self.threads = directory, []

    def search(self, address: str) -> Any:
        self.threads.append(threading.current_thread())
        return self.directory.search(address)


async def answer(
    router: LDAPRouter, recipient: str
) -> tuple[str | None, list[tuple[str, int]]] | None:
    route = await router.route(recipient, ENV)
    if route is None:
        return None
    return route.recipient, [(h.host, h.port) for h in route.hops]


@pytest_twisted.ensureDeferred
async def test_routing_attributes_from_the_directory(
    slapd: Slapd, nsd: NSD, threadpool: ThreadPool
) -> None:
    router = ldap_router(slapd, nsd, threadpool)
    recorder = router.directory = ThreadRecorder(router.directory)  # type: ignore[assignment]
    assert await answer(router, "alice@example.test") == (
        "alice@mailstore1.example.test",
        [("127.0.0.1", 2525), ("::1", 2525)],
    )
    assert await answer(router, "A.Smith@example.test") == (
        "alice@mailstore1.example.test",
        [("127.0.0.1", 2525), ("::1", 2525)],
    )
    assert await answer(router, "bob@example.test") == (None, [("127.0.0.2", 2525)])
    assert await answer(router, "carol@example.test") == ("carol@other.test", [("127.0.0.2", 2525)])
    assert await answer(router, "dave@example.org") == ("dave@example.org", [("127.0.0.1", 2525)])
    assert await answer(router, "whoever@example.net") == (
        "postmaster@example.test",
        [("127.0.0.1", 2525), ("::1", 2525), ("127.0.0.2", 2525)],
    )
    # an entry with mailLocalAddress but no routing attributes: the next router decides
    assert await answer(router, "frank@example.test") is None
    # erin has no mail attributes at all: not found by mailLocalAddress
    assert await answer(router, "erin@example.test") is None
    assert recorder.threads and threading.main_thread() not in recorder.threads
    router.directory = recorder.directory  # type: ignore[assignment]
    assert router.directory._idle  # type: ignore[attr-defined]
    await router.close()
    assert not router.directory._idle  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_missing_entries_rejected_and_injection_finds_nothing(
    slapd: Slapd, nsd: NSD, threadpool: ThreadPool
) -> None:
    router = ldap_router(slapd, nsd, threadpool, missing="reject", catch_all=False)
    for recipient in (
        "nobody@example.test",
        "*@example.test",
        "*)(objectClass=*@example.test",
        "alice@example.test)(|(mailLocalAddress=*",
    ):
        with pytest.raises(PermanentFailure) as info:
            await answer(router, recipient)
        assert info.value.reply.enhanced == "5.1.1", recipient


@pytest_twisted.ensureDeferred
async def test_slapd_stopped_is_temporary_and_it_reconnects_when_back(
    nsd: NSD, threadpool: ThreadPool
) -> None:
    slapd = Slapd().start()
    try:
        router = ldap_router(slapd, nsd, threadpool, positive_ttl=0, negative_ttl=0)
        assert await answer(router, "bob@example.test") == (None, [("127.0.0.2", 2525)])
        slapd.stop()
        with pytest.raises(TemporaryFailure) as info:
            await answer(router, "bob@example.test")
        assert (info.value.reply.code, info.value.reply.enhanced) == (451, "4.4.3")
        slapd.start()
        # the pooled connection died with the old server: the router reconnects by itself
        assert await answer(router, "bob@example.test") == (None, [("127.0.0.2", 2525)])
    finally:
        slapd.cleanup()


@pytest_twisted.ensureDeferred
async def test_wrong_bind_password_is_temporary(
    slapd: Slapd, nsd: NSD, threadpool: ThreadPool
) -> None:
    router = ldap_router(slapd, nsd, threadpool, bind_password="wrong")
    with pytest.raises(TemporaryFailure):
        await answer(router, "bob@example.test")


@pytest_twisted.ensureDeferred
async def test_second_uri_used_when_the_first_is_down(
    slapd: Slapd, nsd: NSD, threadpool: ThreadPool
) -> None:
    from tests.support.peers import free_port

    router = ldap_router(slapd, nsd, threadpool, uri=[f"ldap://127.0.0.1:{free_port()}", slapd.uri])
    assert await answer(router, "bob@example.test") == (None, [("127.0.0.2", 2525)])


@pytest.fixture(scope="module")
def tls_slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Slapd, str]]:
    """slapd with a certificate for 127.0.0.1 from a test CA: StartTLS on ldap://, and ldaps://."""
    from tests.support.delivery.certs import CertificateAuthority

    ca = CertificateAuthority()
    key, cert = ca.server("127.0.0.1")
    ca_file = tmp_path_factory.mktemp("ldap-ca") / "ca.pem"
    ca_file.write_bytes(ca.ca_pem)
    server = Slapd(tls=(ca.ca_pem, cert, key)).start()
    try:
        yield server, str(ca_file)
    finally:
        server.cleanup()


@pytest_twisted.ensureDeferred
async def test_starttls_and_ldaps_verified_against_the_ca(
    tls_slapd: tuple[Slapd, str], nsd: NSD, threadpool: ThreadPool
) -> None:
    server, ca_file = tls_slapd
    for options in (
        {"starttls": True, "tls_ca_file": ca_file},
        {"uri": server.ldaps_uri, "tls_ca_file": ca_file},
    ):
        router = ldap_router(server, nsd, threadpool, **options)
        assert await answer(router, "bob@example.test") == (None, [("127.0.0.2", 2525)])


@pytest_twisted.ensureDeferred
async def test_a_certificate_from_another_ca_is_refused_never_used_in_clear(
    tls_slapd: tuple[Slapd, str], nsd: NSD, threadpool: ThreadPool, tmp_path: Any
) -> None:
    from tests.support.delivery.certs import CertificateAuthority

    server, _ = tls_slapd
    other = tmp_path / "other-ca.pem"
    other.write_bytes(CertificateAuthority("another CA").ca_pem)
    for options in (
        {"starttls": True, "tls_ca_file": str(other)},
        {"uri": server.ldaps_uri, "tls_ca_file": str(other)},
    ):
        router = ldap_router(server, nsd, threadpool, **options)
        with pytest.raises(TemporaryFailure):
            await answer(router, "bob@example.test")


@pytest_twisted.ensureDeferred
async def test_a_base_that_is_not_there_is_temporary_never_no_such_user(
    slapd: Slapd, nsd: NSD, threadpool: ThreadPool
) -> None:
    wrong_base = ldap_router(slapd, nsd, threadpool, missing="reject", base="dc=nowhere,dc=test")
    # an anonymous bind may bind here but sees nothing: slapd answers noSuchObject for the base
    anonymous = ldap_router(
        slapd, nsd, threadpool, missing="reject", drop=("bind_dn", "bind_password")
    )
    for router in (wrong_base, anonymous):
        with pytest.raises(TemporaryFailure):
            await answer(router, "bob@example.test")
