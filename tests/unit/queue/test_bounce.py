"""Bounces, delay warnings, success reports and expiry (RFC 3464/3461), parsed back with
``email``."""

from __future__ import annotations

import base64
import email
import email.policy
from email.message import Message

import attrs
from twisted.internet.task import Clock

from mailrelay.config import QueueConfig
from mailrelay.envelope import Envelope, Recipient, Reply
from mailrelay.queue.manager import QueueManager
from mailrelay.testing import FakeRouter, MemoryQueueStore, RecordingDeliverer, route_to

T0 = 1_700_000_000.0
OK = Reply(250, "2.0.0", "Ok")
LATER = Reply(451, "4.4.1", "mailbox busy")
NOUSER = Reply(550, "5.1.1", "<b@example.test>: Recipient address rejected: User unknown")
BODY = (
    b"From: sender@example.org\r\nSubject: the original\r\nMessage-ID: <orig@example.org>\r\n"
    b"\r\nHello there.\r\n"
)
DAY = 86400.0


class World:
    def __init__(self, deliverer: RecordingDeliverer, **config) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = MemoryQueueStore(self.clock)
        self.deliverer = deliverer
        cfg = QueueConfig(retry_schedule=(3600.0,), max_lifetime=DAY, **config)
        self.router = FakeRouter({"*": route_to("127.0.0.1", 2526)})
        self.manager = QueueManager(
            self.store,
            self.router,
            deliverer,
            self.clock,
            cfg,
            "relay.example.test",
            jitter=lambda d: d,
        )
        self.manager.start()

    def send(
        self, *rcpts: Recipient, sender: str = "sender@example.org", body: bytes = BODY, **env
    ) -> str:
        e = Envelope(sender, tuple(rcpts), received_at=self.clock.seconds(), **env)
        qid = self.store.inject(e, body)
        self.clock.advance(0)
        return qid

    def reports(self) -> list[tuple[Envelope, Message]]:
        return [
            (c.envelope, email.message_from_bytes(c.body, policy=email.policy.default))
            for c in self.deliverer.calls
            if c.envelope.sender == ""
        ]


def parts(report: Message) -> tuple[Message, list[Message], Message | None]:
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    sub = report.get_payload()
    assert sub[0].get_content_type() == "text/plain"
    assert sub[1].get_content_type() == "message/delivery-status"
    blocks = sub[1].get_payload()
    return sub[0], blocks, (sub[2] if len(sub) > 2 else None)


def test_failed_recipients_get_one_report_with_the_original_message():
    w = World(RecordingDeliverer([{"b@example.test": NOUSER, "c@example.test": NOUSER}]))
    qid = w.send(
        Recipient("a@example.test"),
        Recipient("b@example.test"),
        Recipient("c@example.test"),
        envid="ENV-42",
    )
    ((env, report),) = w.reports()
    assert env.sender == "" and [r.address for r in env.recipients] == ["sender@example.org"]
    assert env.recipients[0].notify == ("NEVER",)
    assert report["To"].addresses[0].addr_spec == "sender@example.org"
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    assert report["Auto-Submitted"] == "auto-replied"
    human, blocks, original = parts(report)
    assert "<b@example.test>" in human.get_content() and "User unknown" in human.get_content()
    head, *rcpts = blocks
    assert head["Reporting-MTA"] == "dns; relay.example.test"
    assert head["Original-Envelope-Id"] == "ENV-42"
    assert head["X-Mailrelay-Queue-ID"] == qid
    assert [b["Final-Recipient"] for b in rcpts] == [
        "rfc822; b@example.test",
        "rfc822; c@example.test",
    ]
    assert {b["Action"] for b in rcpts} == {"failed"}
    assert {b["Status"] for b in rcpts} == {"5.1.1"}
    assert rcpts[0]["Remote-MTA"] == "dns; 127.0.0.1"
    assert rcpts[0]["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    assert original is not None and original.get_content_type() == "message/rfc822"
    inner = original.get_payload()[0]
    assert inner["Subject"] == "the original" and "Hello there." in inner.get_content()
    assert qid not in w.store.messages  # a delivered, b and c bounced: done


def test_text_from_elsewhere_cannot_end_or_add_a_field_of_the_report():
    """ENVID, ORCPT and a next hop's reply are copied into the report's fields: no control character
    (CR, LF, NUL, ...) gets there, whatever the envelope holds (one spooled by an older version)."""
    hostile = Reply(550, "5.1.1", "no such user\x00\x1b[31m\x7f\x85X-Injected: reply")
    w = World(RecordingDeliverer([{"b@example.test": hostile}]))
    w.send(
        Recipient("b@example.test", (), "rfc\x85822;b@x\r\nX-Injected: orcpt\x00"),
        envid="E\rX-Injected: envid\x00",
    )
    ((env, report),) = w.reports()
    _, (head, block), _ = parts(report)
    assert head["Original-Envelope-Id"] == "E X-Injected: envid"
    assert block["Original-Recipient"] == "rfc 822; b@x X-Injected: orcpt"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user [31m X-Injected: reply"
    raw = w.deliverer.calls[-1].body
    assert not any(c in raw for c in (b"\x00", b"\x1b", b"\x7f", b"\xc2\x85", b"\nX-Injected"))


def test_ret_hdrs_and_large_messages_return_only_the_headers():
    w = World(RecordingDeliverer([NOUSER, NOUSER]))
    w.send(Recipient("b@example.test"), ret="HDRS")
    big = BODY + b"x" * 998 + b"\r\n" + (b"y" * 100 + b"\r\n") * 1000
    w.send(Recipient("b@example.test"), body=big)
    for _, report in w.reports():
        *_, original = parts(report)
        assert original.get_content_type() == "text/rfc822-headers"
        text = (
            original.get_payload()
            if isinstance(original.get_payload(), str)
            else original.as_string()
        )
        assert "Subject: the original" in text and "Hello there" not in text and "yyyy" not in text


def test_notify_never_and_delay_only_suppress_failure_reports():
    w = World(RecordingDeliverer([NOUSER, NOUSER]))
    w.send(Recipient("b@example.test", ("NEVER",)))
    w.send(Recipient("b@example.test", ("DELAY",)))
    assert w.reports() == []


def test_notify_success_gets_a_relayed_report_with_orcpt():
    w = World(RecordingDeliverer())
    w.send(
        Recipient("a@example.test", ("SUCCESS", "FAILURE"), "rfc822;Original@Example.TEST"),
        Recipient("z@example.test"),
    )
    ((env, report),) = w.reports()
    assert report["Subject"] == "Successful Mail Delivery Report"
    _, (head, block), _ = parts(report)
    assert block["Action"] == "relayed" and block["Status"] == "2.0.0"
    assert block["Final-Recipient"] == "rfc822; a@example.test"
    assert block["Original-Recipient"] == "rfc822; Original@Example.TEST"


def test_never_a_report_to_the_null_sender_and_double_bounces_go_to_the_postmaster():
    w = World(RecordingDeliverer([NOUSER]))
    w.send(Recipient("b@example.test"), sender="")
    assert w.reports() == [] or all(e.recipients[0].address != "" for e, _ in w.reports())
    assert [c.envelope.sender for c in w.deliverer.calls] == [""]  # only the original attempt

    w2 = World(RecordingDeliverer([NOUSER, NOUSER]), postmaster="postmaster@relay.example.test")
    w2.send(Recipient("b@example.test"), sender="")
    reports = [
        (e, r)
        for e, r in w2.reports()
        if e.recipients[0].address == "postmaster@relay.example.test"
    ]
    assert len(reports) == 1
    # and when the report to the postmaster fails too, it is dropped: no loop
    assert len(w2.deliverer.calls) == 2
    w2.clock.advance(DAY)
    assert len(w2.deliverer.calls) == 2 and w2.store.messages == {}


def test_expiry_bounces_what_is_still_pending_with_5_4_7_and_the_last_error():
    w = World(RecordingDeliverer(default=LATER))
    w.router.mapping["example.org"] = route_to("127.0.0.1", 2999)
    qid = w.send(Recipient("a@example.test"))
    attempts = 1
    while qid in w.store.messages and attempts < 100:
        w.clock.advance(3600)
        attempts += 1
    assert qid not in w.store.messages
    assert 24 <= attempts <= 26  # hourly for a day, one last try at expiry
    ((env, report),) = w.reports()
    _, (head, block), _ = parts(report)
    assert block["Action"] == "failed" and block["Status"] == "5.4.7"
    assert "451 4.4.1 mailbox busy" in block["Diagnostic-Code"]


def test_delay_warning_is_sent_once():
    w = World(RecordingDeliverer(default=LATER), delay_warning=4 * 3600.0)
    w.router.mapping["example.org"] = route_to("127.0.0.1", 2999)
    w.deliverer.script = []
    w.send(Recipient("a@example.test"), Recipient("b@example.test", ("FAILURE",)))
    for _ in range(10):
        w.clock.advance(3600)
    # (the warning itself is retried against the same busy host: count distinct reports)
    delayed = list(
        {r["Message-ID"]: r for _, r in w.reports() if r["Subject"].startswith("Delayed")}.values()
    )
    assert len(delayed) == 1
    _, (head, block), _ = parts(delayed[0])
    assert block["Action"] == "delayed" and block["Final-Recipient"] == "rfc822; a@example.test"
    assert block["Status"] == "4.4.1" and block["Will-Retry-Until"]


def test_report_bytes_are_crlf_and_streamed_in_chunks():
    from mailrelay.queue.bounce import Action, build_report
    from mailrelay.queue.store import new_message

    env = Envelope("s@example.org", (Recipient("r@example.test"),), received_at=T0)
    m = new_message("01ABCDEFGHJKMNPQRS", env)
    m = attrs.evolve(m, statuses=(attrs.evolve(m.statuses[0], last_reply=NOUSER),))
    import io

    chunks = list(
        build_report(
            m,
            m.statuses,
            Action.FAILED,
            to="s@example.org",
            hostname="h.test",
            now=T0,
            body=io.BytesIO(BODY),
        )
    )
    data = b"".join(chunks)
    assert len(chunks) > 2
    assert b"\n" not in data.replace(b"\r\n", b"")


def test_binary_originals_return_headers_and_long_diagnostics_are_cut():
    long_reply = Reply(550, "5.7.1", "policy " + "blah " * 400)
    w = World(RecordingDeliverer([long_reply]))
    w.send(Recipient("b@example.test"))
    ((env, report),) = w.reports()
    _, (head, block), original = parts(report)
    assert len(block["Diagnostic-Code"]) < 998 and block["Diagnostic-Code"].endswith("...")

    w2 = World(RecordingDeliverer([NOUSER]))
    e = Envelope(
        "sender@example.org", (Recipient("b@example.test"),), received_at=T0, body="BINARYMIME"
    )
    w2.store.inject(e, BODY)
    w2.clock.advance(0)
    ((env, report),) = w2.reports()
    *_, original = parts(report)
    assert original.get_content_type() == "text/rfc822-headers"


NO_UTF8 = Reply(
    553, "5.6.7", "127.0.0.1[127.0.0.1]:2526 does not support SMTPUTF8, which this message needs"
)


def test_a_failure_for_what_the_next_hop_cannot_take_is_reported_only_to_a_trusted_sender():
    """Any client can send what the next hop lacks (SMTPUTF8, BINARYMIME, size) with a forged
    sender: that report would carry its text to a victim (backscatter). Who the recipient is
    (5.1.1) is still reported to anyone."""
    script = [{"b@example.test": NO_UTF8, "c@example.test": NOUSER}]
    untrusted = World(RecordingDeliverer(list(script)))
    untrusted.send(
        Recipient("b@example.test"),
        Recipient("c@example.test"),
        trusted=False,
        client_address="192.0.2.7",
    )
    ((_, report),) = untrusted.reports()
    _, (_, block), original = parts(report)
    assert block["Final-Recipient"] == "rfc822; c@example.test"  # b's 5.6.7 withheld
    assert original.get_content_type() == "text/rfc822-headers"  # never a text of its choosing
    assert untrusted.store.messages == {} or all(
        m.envelope.sender == "" for m in untrusted.store.messages.values()
    )

    trusted = World(RecordingDeliverer(list(script)))
    trusted.send(
        Recipient("b@example.test"),
        Recipient("c@example.test"),
        trusted=True,
        client_address="192.0.2.7",
    )
    ((_, report),) = trusted.reports()
    _, (_, *blocks), original = parts(report)
    assert [b["Status"] for b in blocks] == ["5.6.7", "5.1.1"]
    assert original.get_content_type() == "message/rfc822"

    for reply in (
        Reply(554, "5.6.3", "cannot take a BINARYMIME message"),
        Reply(552, "5.3.4", "too big"),
    ):
        w = World(RecordingDeliverer([reply]))
        w.send(Recipient("b@example.test"), trusted=False, client_address="192.0.2.7")
        assert w.reports() == []


def test_a_message_queued_before_trust_was_recorded_is_judged_by_its_client_address_and_auth():
    def reported(client: str, auth: str | None = None) -> bool:
        w = World(RecordingDeliverer([NO_UTF8]))
        w.manager.notifier.trusted_client = lambda address: address.startswith("10.")
        w.send(Recipient("b@example.test"), client_address=client, auth=auth)  # trusted=None
        return bool(w.reports())

    assert not reported("192.0.2.7")
    assert reported("10.0.0.5") and reported("192.0.2.7", auth="alice")
    assert reported("")  # not from the network: an embedder's own message


def test_no_success_report_of_ours_when_the_next_hop_took_the_dsn_request():
    """RFC 3461 5.2.2: it reports from there on; ours too would be a second notice."""
    w = World(RecordingDeliverer(dsn=True))
    w.send(Recipient("a@example.test", ("SUCCESS",)))
    assert w.reports() == []


def test_an_lmtp_delivery_is_final_and_reported_as_delivered():
    w = World(RecordingDeliverer(dsn=True))
    w.router.mapping["*"] = attrs.evolve(route_to("127.0.0.1", 24), lmtp=True)
    w.send(Recipient("a@example.test", ("SUCCESS",)), Recipient("b@example.test"))
    ((env, report),) = w.reports()
    human, (head, block), _ = parts(report)
    assert block["Action"] == "delivered" and block["Final-Recipient"] == "rfc822; a@example.test"
    assert "successfully delivered" in human.get_content()


UTF8_BODY = "From: sender@example.org\r\nSubject: Grüße aus Köln\r\n\r\nHallo.\r\n".encode()


def test_an_smtputf8_original_comes_back_as_message_global_in_a_report_any_hop_takes():
    """RFC 6533: message/global and message/global-delivery-status. The sender's address is
    ASCII, so the report is not marked SMTPUTF8 (a hop without it would refuse it, and the
    sender would never learn); its UTF-8 parts go base64 (7-bit) to such a return path."""
    w = World(RecordingDeliverer([Reply(550, "5.1.1", "no such user")]))
    w.send(Recipient("jürgen@example.test"), body=UTF8_BODY, smtputf8=True)
    ((env, report),) = w.reports()
    assert not env.smtputf8 and env.body == "8BITMIME"
    sub = report.get_payload()
    assert sub[1].get_content_type() == "message/global-delivery-status"
    assert sub[1]["Content-Transfer-Encoding"] == "base64"
    assert (
        sub[2].get_content_type() == "message/global"
        and sub[2]["Content-Transfer-Encoding"] == "base64"
    )
    raw = w.deliverer.calls[-1].body
    _, _, status, original, _ = raw.split(b"--" + report.get_boundary().encode())
    assert (
        "Final-Recipient: utf-8; jürgen@example.test"
        in base64.b64decode(status.split(b"\r\n\r\n", 1)[1]).decode()
    )
    assert base64.b64decode(original.split(b"\r\n\r\n", 1)[1]) == UTF8_BODY
    assert status.isascii() and original.isascii()  # 7-bit: any return path takes them


def test_a_report_to_an_smtputf8_sender_is_marked_so_and_keeps_8bit_parts():
    w = World(RecordingDeliverer([Reply(550, "5.1.1", "no such user")]))
    w.send(
        Recipient("jürgen@example.test"),
        sender="änne@example.org",
        body=UTF8_BODY,
        smtputf8=True,
        ret="HDRS",
    )
    ((env, report),) = w.reports()
    assert env.smtputf8 and env.recipients[0].address == "änne@example.org"
    sub = report.get_payload()
    assert (
        sub[2].get_content_type() == "message/global-headers"
        and sub[2]["Content-Transfer-Encoding"] == "8bit"
    )
    assert (
        "Grüße".encode() in w.deliverer.calls[-1].body
        and b"Hallo." not in w.deliverer.calls[-1].body
    )


def test_a_report_of_an_ascii_message_to_an_ascii_sender_is_unchanged_by_it():
    w = World(RecordingDeliverer([NOUSER]))
    w.send(Recipient("b@example.test"))
    ((env, report),) = w.reports()
    assert not env.smtputf8 and env.body is None
    sub = report.get_payload()
    assert [p.get_content_type() for p in sub] == [
        "text/plain",
        "message/delivery-status",
        "message/rfc822",
    ]


def test_a_success_report_to_an_untrusted_sender_returns_only_the_header():
    """NOTIFY=SUCCESS RET=FULL with a forged sender would have us mail any text to anyone."""
    w = World(RecordingDeliverer())
    w.send(
        Recipient("a@example.test", ("SUCCESS",)),
        ret="FULL",
        trusted=False,
        client_address="192.0.2.7",
    )
    ((_, report),) = w.reports()
    *_, original = parts(report)
    assert original.get_content_type() == "text/rfc822-headers"
    assert b"Hello there" not in w.deliverer.calls[-1].body
