"""What no next hop can carry is refused at DATA to an untrusted client (not bounced later)."""

from __future__ import annotations

import ipaddress

from twisted.internet.task import Clock

from mailrelay.config import ServerConfig
from mailrelay.delivery.capabilities import HopCapabilities
from mailrelay.envelope import Envelope, NextHop, Recipient, Route
from mailrelay.policy import build_policy
from mailrelay.policy.onward import OnwardCapabilities
from mailrelay.testing import FakeRouter, route_to
from tests.support.smtp.fakes import Conn, stuff

CONFIG = ServerConfig(
    hostname="mx.example.test",
    local_domains=("example.test", "other.test"),
    trusted_networks=(ipaddress.ip_network("10.0.0.0/8"),),
)
MSG = b"Subject: hello\r\n\r\nbody\r\n"
PLAIN = route_to("127.0.0.1", 2526)  # a hop without SMTPUTF8, SIZE 1000
UNKNOWN = route_to("127.0.0.1", 2999)  # never seen


def known() -> HopCapabilities:
    caps = HopCapabilities()
    caps.saw(NextHop("127.0.0.1", 2526), {"PIPELINING": "", "SIZE": "1000"}, 1000)
    caps.saw(NextHop("127.0.0.1", 2527), {"SMTPUTF8": ""}, None)
    return caps


def conn(client: str, router: FakeRouter) -> Conn:
    policy = build_policy(CONFIG, extra=[OnwardCapabilities(router, known(), Clock())])
    c = Conn(config=CONFIG, policy=policy, client=client)
    c.send(b"EHLO client.example.org\r\n")
    c.replies()
    return c


def test_an_untrusted_client_hears_at_data_that_the_next_hop_lacks_smtputf8():
    c = conn("192.0.2.7", FakeRouter({"example.test": PLAIN}))
    c.send(
        "MAIL FROM:<a@example.org> SMTPUTF8\r\nRCPT TO:<jürgen@example.test>\r\nDATA\r\n".encode()
    )
    (_, _, (code, text)) = c.replies()
    assert (code, text[:5]) == (553, "5.6.7") and "<jürgen@example.test>" in text
    assert not c.sink.committed
    c.send(
        b"RSET\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n" + stuff(MSG)
    )
    assert c.codes() == [250, 250, 250, 354, 250]  # the session goes on; ASCII mail passes


def test_too_big_for_every_known_hop_is_refused_at_the_end_of_data():
    c = conn("192.0.2.7", FakeRouter({"example.test": PLAIN}))
    c.send(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
        + stuff(MSG + (b"x" * 78 + b"\r\n") * 30)
    )
    (_, _, _, (code, text)) = c.replies()
    assert (code, text[:5]) == (552, "5.3.4")
    c.send(b"MAIL FROM:<a@example.org> SIZE=5000\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    assert c.codes() == [250, 250, 552]  # the declared SIZE: at DATA already
    assert not c.sink.committed


def test_trusted_clients_unknown_hops_and_hops_that_take_it_pass():
    routes = FakeRouter(
        {
            "example.test": UNKNOWN,
            "other.test": Route((NextHop("127.0.0.1", 2526), NextHop("127.0.0.1", 2527))),
        }
    )
    for client, rcpt in (
        ("10.1.2.3", "jürgen@example.test"),
        ("192.0.2.7", "jürgen@example.test"),
        ("192.0.2.7", "jürgen@other.test"),
    ):
        c = conn(client, routes)
        c.send(
            f"MAIL FROM:<a@example.org> SMTPUTF8\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode()
            + stuff(MSG)
        )
        assert c.codes() == [250, 250, 354, 250], (client, rcpt)


def test_the_memory_is_bounded_and_judges_a_route_only_when_every_hop_is_known():
    caps = HopCapabilities(max_hops=2)
    env = Envelope("a@example.org", (Recipient("jürgen@example.test"),), smtputf8=True)
    for port in (1, 2, 3):
        caps.saw(NextHop("h.test", port), {}, None)
    assert caps.offer(NextHop("h.test", 1)) is None and caps.offer(NextHop("H.TEST", 3)) is not None
    assert (
        caps.refusal(env, Route((NextHop("h.test", 2), NextHop("h.test", 3)))).enhanced == "5.6.7"
    )
    assert caps.refusal(env, Route((NextHop("h.test", 2), NextHop("h.test", 1)))) is None


def test_smtputf8_with_ascii_addresses_is_left_to_the_delivery_which_reads_the_header():
    c = conn("192.0.2.7", FakeRouter({"example.test": PLAIN}))
    c.send(
        b"MAIL FROM:<a@example.org> SMTPUTF8\r\nRCPT TO:<b@example.test>\r\nDATA\r\n" + stuff(MSG)
    )
    assert c.codes() == [250, 250, 354, 250]


def test_the_cheap_first_look_agrees_with_the_hops_remembered():
    caps = HopCapabilities(max_hops=2)
    utf8 = Envelope("a@example.org", (Recipient("jürgen@example.test"),), smtputf8=True)
    plain = Envelope("a@example.org", (Recipient("b@example.test"),))
    caps.saw(NextHop("h.test", 1), {}, 1000)
    assert (
        caps.refuses_any(utf8, None)
        and caps.refuses_any(plain, 1001)
        and not caps.refuses_any(plain, 1000)
    )
    caps.saw(NextHop("h.test", 1), {"SMTPUTF8": ""}, None)  # the same hop again, now with both
    assert not caps.refuses_any(utf8, None) and not caps.refuses_any(plain, 10**9)
    caps.saw(NextHop("h.test", 2), {}, 500)
    caps.saw(NextHop("h.test", 3), {"SMTPUTF8": ""}, None)
    caps.saw(NextHop("h.test", 4), {"SMTPUTF8": ""}, None)  # port 2 forgotten
    assert not caps.refuses_any(utf8, None) and not caps.refuses_any(plain, 10**9)
