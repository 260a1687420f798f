"""MTA-STS against real peers: NSD serves the TXT, A and MX records, a real HTTPS server the
policies
(certificate from a test CA), a private Postfix with STARTTLS stands for the MX hosts (smtp-sink
behind it). The router and the deliverer run in this process, on the real reactor.

Every name is on 127.0.0.1: the policy hosts on the HTTPS server's port, the MX hosts on Postfix's.
Postfix's certificate is for ``mx.good.test`` only, so ``mx.badcert.test`` fails verification.
"""

from __future__ import annotations

import io
import shutil
import smtplib
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from mailrelay.config import DeliveryConfig
from mailrelay.delivery import SMTPDeliverer
from mailrelay.envelope import Envelope, Recipient, Reply, Route, TLSPolicy
from mailrelay.errors import TemporaryFailure
from mailrelay.routing.context import RouterContext
from mailrelay.routing.mtasts import HTTPSFetcher, Mode, PolicyError
from mailrelay.routing.mx import MXRouter
from tests.support.delivery.certs import CertificateAuthority
from tests.support.delivery.postfix import PostfixRelay
from tests.support.peers import SMTPSink
from tests.support.relay import RelayProcess
from tests.support.routing.nsd import NSD
from tests.support.routing.policyserver import PolicyServer

pytestmark = pytest.mark.integration

ZONE = """\
$ORIGIN test.
$TTL 60
@                    SOA   ns.test. hostmaster.test. 2024010101 3600 600 86400 60
@                    NS    ns.test.
ns                   A     127.0.0.1
mx.good              A     127.0.0.1
mx.badcert           A     127.0.0.1
; enforce, the MX is listed and its certificate is good (the record in two strings, joined)
good                 MX    10 mx.good.test.
_mta-sts.good        TXT   "v=STSv1; " "id=good1;"
mta-sts.good         A     127.0.0.1
; enforce, the MX is not listed
unlisted             MX    10 mx.good.test.
_mta-sts.unlisted    TXT   "v=STSv1; id=u1"
mta-sts.unlisted     A     127.0.0.1
; enforce, the MX is listed but its certificate is for another name
badcert              MX    10 mx.badcert.test.
_mta-sts.badcert     TXT   "v=STSv1; id=b1"
mta-sts.badcert      A     127.0.0.1
; testing, the MX is not listed (and its certificate is for another name)
testing              MX    10 mx.badcert.test.
_mta-sts.testing     TXT   "v=STSv1; id=t1"
mta-sts.testing      A     127.0.0.1
; enforce, but the policy host's certificate is not for its name: no policy
wrongname            MX    10 mx.badcert.test.
_mta-sts.wrongname   TXT   "v=STSv1; id=w1"
mta-sts.wrongname    A     127.0.0.1
; policy hosts for the fetcher's refusals
mta-sts.misc         A     127.0.0.1
mta-sts.nowhere      A     127.0.0.3
"""

POLICIES = {
    "mta-sts.good.test": (
        "version: STSv1\r\nmode: enforce\r\nmx: mx.good.test\r\nmx: *.other.test\r\nmax_age: "
        "86400\r\n"
    ),
    "mta-sts.unlisted.test": (
        "version: STSv1\nmode: enforce\nmx: *.elsewhere.test\nmax_age: 86400\n"
    ),
    "mta-sts.badcert.test": "version: STSv1\nmode: enforce\nmx: mx.badcert.test\nmax_age: 86400\n",
    "mta-sts.testing.test": "version: STSv1\nmode: testing\nmx: *.elsewhere.test\nmax_age: 86400\n",
    "mta-sts.wrongname.test": (
        "version: STSv1\nmode: enforce\nmx: *.elsewhere.test\nmax_age: 86400\n"
    ),
}


class World:
    def __init__(
        self,
        directory: Path,
        ca: Path,
        nsd: NSD,
        https: PolicyServer,
        postfix: PostfixRelay,
        sink: SMTPSink,
    ) -> None:
        self.dir, self.ca, self.nsd, self.https, self.postfix, self.sink = (
            directory,
            ca,
            nsd,
            https,
            postfix,
            sink,
        )

    def router(self, **options: Any) -> MXRouter:
        options = {
            "nameservers": [f"127.0.0.1:{self.nsd.port}"],
            "port": self.postfix.port,
            "mta_sts": True,
            "mta_sts_port": self.https.port,
            "mta_sts_ca_file": str(self.ca),
            "mta_sts_timeout": "5s",
            **options,
        }
        return MXRouter.from_options(options, RouterContext(reactor, key="routes[0]"))


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    directory = Path(tempfile.mkdtemp(prefix="mailrelay-mtasts-"))
    directory.chmod(0o755)
    authority = CertificateAuthority()
    ca, mx_key, mx_chain = authority.write(directory, "mx.good.test")
    web = directory / "web"
    web.mkdir()
    _, web_key, web_chain = authority.write(
        web, *[h for h in POLICIES if h != "mta-sts.wrongname.test"], "mta-sts.misc.test"
    )
    nsd = NSD(zones={"test": ZONE})
    https = PolicyServer(web_key, web_chain)
    for host, body in POLICIES.items():
        https.set(host, body)
    sink = SMTPSink().start()
    postfix = PostfixRelay(sink.port, tls_key=mx_key, tls_chain=mx_chain)
    try:
        nsd.start()
        https.start()
        postfix.start()
        yield World(directory, ca, nsd, https, postfix, sink)
    finally:
        postfix.stop()
        https.stop()
        nsd.cleanup()
        sink.stop()
        for d in (sink.dir, postfix.dir, directory):
            shutil.rmtree(d, ignore_errors=True)


async def send(world: World, route: Route, tag: str) -> list[tuple[Reply, str | None]]:
    d = SMTPDeliverer(
        reactor,
        DeliveryConfig(connect_timeout=5, tls_ca_file=str(world.ca)),
        "relay.mailrelay.test",
    )
    env = Envelope(f"{tag}@example.org", (Recipient(f"rcpt@{tag}.test"),))
    body = f"Subject: {tag}\r\n\r\nvia MTA-STS\r\n".encode()
    try:
        return await d.deliver(env, env.recipients, route, lambda: io.BytesIO(body))
    finally:
        await d.stop()


def arrived(world: World, tag: str, timeout: float = 20.0) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while True:
        found = [t.data for t in world.sink.transactions() if t.sender == f"{tag}@example.org"]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest_twisted.ensureDeferred
async def test_enforce_with_a_listed_mx_and_a_good_certificate_delivers_over_verified_tls(
    world: World,
) -> None:
    router = world.router(tls="none")  # the policy raises the route's own level to verify
    route = await router.route("rcpt@good.test", None)
    assert route.tls is TLSPolicy.VERIFY
    assert [(h.host, h.name) for h in route.hops] == [("127.0.0.1", "mx.good.test")]
    assert world.https.fetched("mta-sts.good.test") == 1
    assert await router.route("other@good.test", None) is route  # cached: not fetched again
    assert world.https.fetched("mta-sts.good.test") == 1
    results = await send(world, route, "good")
    assert [r.code for r, _ in results] == [250], results
    [data] = arrived(world, "good")
    assert b"with ESMTPS" in data  # Postfix's Received header: the message came over TLS


@pytest_twisted.ensureDeferred
async def test_enforce_without_a_listed_mx_is_a_temporary_failure(world: World) -> None:
    with pytest.raises(TemporaryFailure) as info:
        await world.router().route("rcpt@unlisted.test", None)
    assert (info.value.reply.code, info.value.reply.enhanced) == (451, "4.7.5")
    assert "mx.good.test" in info.value.reply.text


@pytest_twisted.ensureDeferred
async def test_enforce_with_a_bad_certificate_is_not_delivered(world: World) -> None:
    route = await world.router().route("rcpt@badcert.test", None)
    assert route.tls is TLSPolicy.VERIFY
    [(reply, remote)] = await send(world, route, "badcert")
    assert (reply.code, reply.enhanced) == (451, "4.7.5") and "TLS handshake" in reply.text
    assert remote is not None and remote.startswith("mx.badcert.test[127.0.0.1]")
    assert arrived(world, "badcert", timeout=0.3) == []


@pytest_twisted.ensureDeferred
async def test_testing_mode_delivers_as_usual(world: World) -> None:
    route = await world.router().route("rcpt@testing.test", None)
    assert route.tls is TLSPolicy.MAY  # the route's own level: testing changes nothing
    assert world.https.fetched("mta-sts.testing.test") >= 1
    results = await send(world, route, "testing")
    assert [r.code for r, _ in results] == [250], results
    assert arrived(world, "testing")


@pytest_twisted.ensureDeferred
async def test_a_policy_host_with_a_certificate_for_another_name_gives_no_policy(
    world: World,
) -> None:
    router = world.router()
    assert router.mta_sts is not None
    assert await router.mta_sts.policy("wrongname.test") is None
    assert world.https.fetched("mta-sts.wrongname.test") == 0  # TLS failed before any request
    route = await router.route("rcpt@wrongname.test", None)  # ordinary delivery, not a refusal
    assert route.tls is TLSPolicy.MAY
    # the same policy host trusted through another CA file (not the test CA): refused as well
    other = world.dir / "other-ca.pem"
    other.write_bytes(CertificateAuthority("another CA").ca_pem)
    assert await world.router(mta_sts_ca_file=str(other)).mta_sts.policy("good.test") is None  # type: ignore[union-attr]


def fetcher(world: World, port: int | None = None, timeout: float = 5.0) -> HTTPSFetcher:
    router = world.router()
    return HTTPSFetcher(
        reactor,
        router.addresses,
        port=port or world.https.port,
        ca_file=str(world.ca),
        timeout=timeout,
    )


@pytest_twisted.ensureDeferred
async def test_the_policy_is_fetched_over_https_from_the_address_our_nameservers_give(
    world: World,
) -> None:
    body = await fetcher(world)("good.test")
    assert body == POLICIES["mta-sts.good.test"].encode()
    policy = await world.router().mta_sts.policy("good.test")  # type: ignore[union-attr]
    assert policy is not None and (policy.id, policy.mode) == ("good1", Mode.ENFORCE)


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (
            {
                "body": "",
                "status": 301,
                "headers": (("Location", "https://mta-sts.good.test/.well-known/mta-sts.txt"),),
            },
            "HTTP 301 (redirects are not followed)",
        ),
        ({"body": "not here", "status": 404}, "HTTP 404"),
        ({"body": "<html>version: STSv1</html>", "content_type": "text/html"}, "not text/plain"),
        ({"body": "version: STSv1\n" + "x: y\n" * 20000}, "more than 65536"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_what_the_fetcher_refuses(world: World, answer: dict[str, Any], why: str) -> None:
    world.https.set("mta-sts.misc.test", **answer)
    with pytest.raises(PolicyError) as info:
        await fetcher(world)("misc.test")
    assert why in str(info.value)


@pytest_twisted.ensureDeferred
async def test_a_policy_host_that_never_answers_times_out(world: World) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does) but never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        started = time.monotonic()
        with pytest.raises(defer.TimeoutError):
            await fetcher(world, port=silent.getsockname()[1], timeout=0.5)("misc.test")
        assert time.monotonic() - started < 5


@pytest_twisted.ensureDeferred
async def test_an_unreachable_policy_host_is_an_error_not_a_hang(world: World) -> None:
    with pytest.raises(PolicyError) as info:  # 127.0.0.3: nothing listens there
        await fetcher(world)("nowhere.test")
    assert "127.0.0.3" in str(info.value)


def test_through_a_relay_process_configured_for_mta_sts(world: World) -> None:
    """``twistd -n mailrelay`` with ``mta_sts = true``: the config reaches the router, enforce
    delivers over verified TLS, testing delivers, an unlisted MX keeps the mail queued (4.7.5)."""
    relay = RelayProcess(f"""
[delivery]
tls_ca_file = "{world.ca}"

[[routes]]
type = "mx"
nameservers = ["127.0.0.1:{world.nsd.port}"]
port = {world.postfix.port}
mta_sts = true
mta_sts_port = {world.https.port}
mta_sts_ca_file = "{world.ca}"
""")
    try:
        relay.start()
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            for tag in ("relaygood", "relaytesting", "relayunlisted"):
                domain = tag.removeprefix("relay")
                client.sendmail(
                    f"{tag}@example.org",
                    [f"rcpt@{domain}.test"],
                    f"Subject: {tag}\r\n\r\nthrough the relay\r\n".encode(),
                )
        [good] = arrived(world, "relaygood")
        assert b"with ESMTPS" in good
        assert arrived(world, "relaytesting")
        relay.wait_log(
            "MTA-STS enforce policy u1 of unlisted.test lists none of its MX hosts (mx.good.test)"
        )
        log = relay.log_text()
        assert (
            "TLS established (verify)" in log and "enforce would refuse MX mx.badcert.test" in log
        )
        assert arrived(world, "relayunlisted", timeout=0.5) == []
        assert relay.queue_files()  # still queued, not bounced
    finally:
        relay.cleanup()
