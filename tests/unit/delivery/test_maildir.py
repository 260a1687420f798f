"""MaildirDeliverer and ByRouteDeliverer: a maildir route's message lands in ``new/``, whole, once
per
recipient; a file that cannot be written is a 451 to retry; other routes go to the network."""

from __future__ import annotations

import io
import os
from pathlib import Path

from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from mailrelay.delivery import ByRouteDeliverer, MaildirDeliverer
from mailrelay.envelope import Envelope, Recipient, Reply, Route
from mailrelay.interfaces import IDeliverer
from mailrelay.testing import RecordingDeliverer, route_to

BODY = b"Subject: hello\r\n\r\nhello\r\n"
ENV = Envelope("you@example.org", (Recipient("a@demo.test"), Recipient("b@demo.test")))


def counter() -> object:
    n = iter(range(1000))
    return lambda k: next(n).to_bytes(k, "big")


def deliver(directory: Path) -> list[tuple[Reply, str | None]]:
    clock = Clock()
    clock.advance(1700000000)
    deliverer = MaildirDeliverer(clock, None, "relay.example.test", randbytes=counter())
    d = deliverer.deliver(
        ENV, ENV.recipients, Route(hops=(), maildir=str(directory)), lambda: io.BytesIO(BODY)
    )
    results: list[tuple[Reply, str | None]] = []
    d.addCallback(results.extend)
    return results


def test_each_recipient_gets_a_file_in_new(tmp_path: Path) -> None:
    verifyObject(IDeliverer, MaildirDeliverer(Clock(), None, "h"))
    results = deliver(tmp_path / "mail")
    assert [r.code for r, _ in results] == [250, 250]
    files = sorted((tmp_path / "mail" / "new").iterdir())
    assert [f.name for f in files] == [
        "1700000000.0000000000000000.relay.example.test",
        "1700000000.0000000000000001.relay.example.test",
    ]
    assert (
        files[0].read_bytes() == b"Return-Path: <you@example.org>\nDelivered-To: a@demo.test\n"
        b"Subject: hello\n\nhello\n"
    )
    assert b"Delivered-To: b@demo.test\n" in files[1].read_bytes()
    assert not list((tmp_path / "mail" / "tmp").iterdir())
    assert results[0][1] == f"maildir:{tmp_path / 'mail'}"


def test_a_directory_that_cannot_be_written_is_a_temporary_failure(tmp_path: Path) -> None:
    blocker = tmp_path / "mail"
    blocker.write_text("a file where the maildir should be")
    results = deliver(blocker)
    assert [(r.code, r.enhanced) for r, _ in results] == [(451, "4.3.0")] * 2
    assert "cannot write to" in results[0][0].text
    os.remove(blocker)


def test_by_route_sends_maildir_routes_to_the_maildir_and_the_rest_to_the_network(
    tmp_path: Path,
) -> None:
    network = RecordingDeliverer()
    by_route = ByRouteDeliverer(network, MaildirDeliverer(Clock(), None, "h"))
    verifyObject(IDeliverer, by_route)
    by_route.deliver(ENV, ENV.recipients[:1], route_to("127.0.0.1", 2526), lambda: io.BytesIO(BODY))
    by_route.deliver(
        ENV, ENV.recipients[1:], Route(hops=(), maildir=str(tmp_path)), lambda: io.BytesIO(BODY)
    )
    assert [c.addresses for c in network.calls] == [["a@demo.test"]]
    assert len(list((tmp_path / "new").iterdir())) == 1
    assert (
        by_route.capabilities is None and by_route.stop().called
    )  # the network deliverer's: none, nothing to stop
