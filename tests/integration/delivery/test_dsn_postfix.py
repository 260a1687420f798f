"""Reports end to end against a real Postfix. NOTIFY=SUCCESS (RFC 3461 5.2.2): one success
notice, from whoever ends our part; an SMTPUTF8 message's report through a hop without it.

A real Postfix (which offers DSN) takes the request and reports itself, so we send nothing;
an smtp-sink without DSN (``-N``) cannot, so we send the "relayed" report. Postfix relays to
that same sink, which also takes every report: the sink holds all the mail that was sent.
"""

from __future__ import annotations

import smtplib
from email import message_from_bytes

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from mailrelay import config
from mailrelay.service import MailRelayService
from tests.support.delivery.postfix import PostfixRelay
from tests.support.peers import SMTPSink
from tests.support.relay import run_in_process, wait_until
from tests.support.reliability.helpers import route_to

pytestmark = pytest.mark.integration


@pytest.fixture
def peers():
    sink = SMTPSink(flags=["-N"]).start()  # no DSN
    postfix = PostfixRelay(sink.port, name="postfix.mailrelay.test")
    try:
        postfix.start()
        yield postfix, sink
    finally:
        postfix.cleanup()
        sink.cleanup()


def reports(sink: SMTPSink) -> list[tuple[str, list[str], str]]:
    """``(Reporting-MTA, [(Final-Recipient, Action)], To)`` of every report the sink got."""
    out = []
    for raw in sink.messages():
        message = message_from_bytes(raw)
        if message.get_content_type() != "multipart/report":
            continue
        status = message.get_payload()[1].get_payload()
        head, *blocks = status
        out.append(
            (
                head["Reporting-MTA"],
                [(b["Final-Recipient"], b["Action"]) for b in blocks],
                message["To"],
            )
        )
    return out


def relay_config(tmp_path, routes: dict[str, int]) -> config.Config:  # type: ignore[no-untyped-def]
    """relay.mailrelay.test on a free loopback port; a static route per domain pattern, in order."""
    return config.loads(
        f'[server]\nhostname = "relay.mailrelay.test"\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
        f'[spool]\npath = "{tmp_path / "spool"}"\n'
        + "".join(route_to(port, f'["{domain}"]') for domain, port in routes.items())
    )


@pytest_twisted.inlineCallbacks
def test_one_success_notice_postfix_with_dsn_reports_and_a_hop_without_it_gets_ours(
    tmp_path, peers
):
    postfix, sink = peers
    relay = MailRelayService(
        relay_config(tmp_path, {"with-dsn.test": postfix.port, "*": sink.port})
    )

    def send(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port) as client:
            for rcpt in ("a@with-dsn.test", "b@without-dsn.test"):
                client.sendmail(
                    "sender@example.org",
                    [rcpt],
                    f"Subject: to {rcpt}\r\n\r\nhi\r\n".encode(),
                    rcpt_options=["NOTIFY=SUCCESS"],
                )

    @defer.inlineCallbacks
    def settled():  # type: ignore[no-untyped-def]
        # both originals, Postfix's report and ours
        yield threads.deferToThread(sink.wait_for, 4, 60)
        # and nothing of ours is left to send
        yield wait_until(lambda: relay.store.list_ids().addCallback(lambda ids: not ids), 30)
        yield threads.deferToThread(sink.wait_for, len(sink.messages()), 10)

    yield run_in_process(relay, send, settled)
    got = sorted(reports(sink))
    assert got == [
        (
            "dns; postfix.mailrelay.test",
            [("rfc822; a@with-dsn.test", "relayed")],
            "sender@example.org",
        ),
        (
            "dns; relay.mailrelay.test",
            [("rfc822; b@without-dsn.test", "relayed")],
            "<sender@example.org>",
        ),
    ], got
    originals = [t for t in sink.transactions() if t.sender == "sender@example.org"]
    assert sorted(r for t in originals for r in t.recipients) == [
        "a@with-dsn.test",
        "b@without-dsn.test",
    ]


@pytest.fixture
def no_smtputf8(tmp_path):
    refusing = SMTPSink(flags=["-f", "RCPT"]).start()  # 5xx to every recipient
    sink = SMTPSink().start()
    postfix = PostfixRelay(
        sink.port, name="postfix.mailrelay.test", main_cf=("smtputf8_enable = no",)
    )
    try:
        postfix.start()
        yield refusing, postfix, sink
    finally:
        postfix.cleanup()
        refusing.cleanup()
        sink.cleanup()


@pytest_twisted.inlineCallbacks
def test_the_report_of_an_smtputf8_message_reaches_its_ascii_sender_via_a_postfix_without_smtputf8(
    tmp_path, no_smtputf8
):
    """RFC 6533: the original comes back as message/global; the report is not marked SMTPUTF8
    (the sender's address is ASCII), and a message marked so without need goes without it, so a
    Postfix with smtputf8_enable = no takes it (before: 553 5.6.7 here, the sender never told)."""
    refusing, postfix, sink = no_smtputf8
    relay = MailRelayService(
        relay_config(tmp_path, {"fails.test": refusing.port, "*": postfix.port})
    )
    original = "From: sender@example.org\r\nSubject: Grüße\r\n\r\nHallo.\r\n".encode()

    def send(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.ehlo()
            client.sendmail(
                "sender@example.org", ["jürgen@fails.test"], original, mail_options=["SMTPUTF8"]
            )

    (raw,) = yield run_in_process(relay, send, lambda: threads.deferToThread(sink.wait_for, 1, 60))
    report = message_from_bytes(raw)
    assert (
        report.get_content_type() == "multipart/report" and report["To"] == "<sender@example.org>"
    )
    kinds = [p.get_content_type() for p in report.get_payload()]
    assert kinds == ["text/plain", "message/global-delivery-status", "message/global"]
