"""DKIM signing per sender domain, RSA and Ed25519: what reaches smtp-sink passes independent
verifiers (Perl's Mail::DKIM, OpenDKIM) that fetch the keys from a real DNS server."""

from __future__ import annotations

import smtplib
from typing import Any

import attrs
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import threads

from mailrelay import config
from mailrelay.errors import ConfigError
from mailrelay.service import MailRelayService
from tests.support.dkim import pem_key
from tests.support.dkimverify import dkim_zone, mail_dkim, opendkim
from tests.support.relay import run_in_process
from tests.support.routing.nsd import NSD


def make_key(path, kind: str = "rsa") -> bytes:  # type: ignore[no-untyped-def]
    """Write a fresh private key (PEM, as ``openssl genpkey`` does) to ``path``; → the DKIM key
    record that publishes it (RFC 6376 3.6.1, RFC 8463 4)."""
    pem, record = pem_key(kind)
    path.write_bytes(pem)
    return record


def relay_config(tmp_path, sink_port: int, key_file: str) -> config.Config:
    return config.loads(
        f"""
[server]
hostname = "dkim.mailrelay.test"
listen = ["tcp:0:interface=127.0.0.1"]
[spool]
path = "{tmp_path / "spool"}"
[dkim]
domains = ["example.org", "other.example"]
selector = "s2026"
key_file = "{key_file}"
[[routes]]
type = "static"
domains = ["*"]
hosts = ["127.0.0.1:{sink_port}"]
""",
        "dkim.toml",
    )


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_outgoing_mail_is_signed_per_sender_domain_with_rsa_or_ed25519_and_verifies(
    tmp_path, smtp_sink
):
    keys = tmp_path / "keys"
    keys.mkdir()
    records = {
        "example.org": make_key(keys / "example.org.pem", "rsa"),
        "other.example": make_key(keys / "other.example.pem", "ed25519"),
    }
    relay = MailRelayService(relay_config(tmp_path, smtp_sink.port, str(keys / "{domain}.pem")))

    def send(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            for sender, header_from, n in (
                ("a@example.org", "A <a@example.org>", 1),
                ("bounces@unsigned.test", "b@other.example", 2),
                ("c@unsigned.test", "c@unsigned.test", 3),
            ):
                client.sendmail(
                    sender,
                    ["rcpt@example.test"],
                    f"From: {header_from}\r\nTo: rcpt@example.test\r\nSubject: m{n}\r\n"
                    f"Message-ID: <m{n}@example>\r\n\r\nbody {n}\r\n.dot line\r\n".encode(),
                )

    yield run_in_process(relay, send, lambda: threads.deferToThread(smtp_sink.wait_for, 3, 20))

    by_id = {}
    for t in smtp_sink.transactions():
        mid = [ln for ln in t.data.split(b"\r\n") if ln.startswith(b"Message-ID:")][0]
        by_id[mid.split()[1].decode()] = t.data

    signed1, signed2, unsigned = by_id["<m1@example>"], by_id["<m2@example>"], by_id["<m3@example>"]
    head1, head2 = signed1.split(b"\r\n\r\n")[0], signed2.split(b"\r\n\r\n")[0]
    assert (
        signed1.startswith(b"DKIM-Signature:")
        and b"d=example.org" in head1
        and b"a=rsa-sha256" in head1
    )
    # the From domain chooses the key (DMARC alignment), not the envelope sender's; its type the
    # algorithm
    assert b"d=other.example" in head2 and b"a=ed25519-sha256" in head2
    assert b"DKIM-Signature" not in unsigned
    tampered1, tampered2 = (
        signed1.replace(b"body 1", b"body X"),
        signed2.replace(b"body 2", b"body X"),
    )

    dns = NSD(zones={d: dkim_zone(d, "s2026", r.decode()) for d, r in records.items()}).start()
    try:
        verdicts = yield threads.deferToThread(
            lambda: (
                mail_dkim(signed1, dns.port),
                mail_dkim(tampered1, dns.port),
                [
                    opendkim(m, dns.port, list(records))
                    for m in (signed1, signed2, tampered1, tampered2, unsigned)
                ],
            )
        )
    finally:
        dns.cleanup()
    rsa_ok, rsa_tampered, by_opendkim = verdicts
    # Mail::DKIM (Debian 12's knows no ed25519-sha256) and OpenDKIM; neither is a rubber stamp
    assert rsa_ok == ["example.org rsa-sha256 pass"]
    assert rsa_tampered == ["example.org rsa-sha256 fail (body has been altered)"]
    assert by_opendkim == [
        [("example.org", "succeeded")],
        [("other.example", "succeeded")],
        [("example.org", "failed")],
        [("other.example", "failed")],
        [],
    ]


def test_a_key_that_is_neither_rsa_nor_ed25519_is_a_config_error(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "example.org.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    make_key(tmp_path / "other.example.pem", "ed25519")
    with pytest.raises(ConfigError) as e:
        MailRelayService(relay_config(tmp_path, 2600, str(tmp_path / "{domain}.pem")))
    assert "dkim.key_file" in str(e.value) and "example.org.pem: not a usable private key" in str(
        e.value
    )
    assert "RSA or an Ed25519 key" in str(e.value)


def test_a_missing_key_is_a_config_error_naming_the_key(tmp_path):
    cfg = relay_config(tmp_path, 2600, str(tmp_path / "{domain}.pem"))
    with pytest.raises(ConfigError) as e:
        MailRelayService(cfg)
    assert "dkim.key_file" in str(e.value) and "example.org.pem" in str(e.value)


def test_dkim_domains_need_a_key_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.loads('[dkim]\ndomains = ["example.org"]\n', "d.toml")
    assert "dkim.key_file" in str(e.value)


def test_a_look_alike_sender_domain_does_not_choose_our_key():
    """str.lower() folds the Kelvin sign (U+212A) to "k": k\u212aey.test must not sign as
    kkey.test."""
    from mailrelay.dkim import DKIMSigner, DomainKey
    from mailrelay.envelope import Envelope, Recipient

    signer = DKIMSigner({"key.test": DomainKey("key.test", "s1", b"")})
    for domain in ("\u212aey.test", "ｋｅｙ.test", "key。test"):
        head = f"From: a@{domain}\r\nSubject: x\r\n\r\n".encode()
        envelope = Envelope(f"a@{domain}", (Recipient("b@example.org"),))
        assert signer.key_for(envelope, head) is None
    assert (
        signer.key_for(Envelope("a@KEY.test", (Recipient("b@example.org"),)), b"\r\n\r\n")
        is not None
    )


def test_a_message_without_a_header_section_goes_out_unsigned_and_unchanged(tmp_path):
    """Text that begins with whitespace has no header section (the session puts an empty line after
    its Received header then): nothing may be put on top of it that its first line would continue.
    With no From: header there is nothing to sign for, so it goes out as it is, with a log line."""
    from twisted.logger import globalLogPublisher

    from mailrelay.dkim import DKIMSigner, SigningSink, domain_key
    from mailrelay.envelope import Envelope, Recipient
    from mailrelay.queue.body import prefixed
    from mailrelay.testing import MemoryQueueStore
    from tests.support.dkim import SyncPool, SyncReactor

    make_key(tmp_path / "k.pem")
    signer = DKIMSigner(
        {"example.org": domain_key("example.org", "s1", (tmp_path / "k.pem").read_bytes())}
    )
    store = MemoryQueueStore()
    intake = SigningSink(store, signer, SyncReactor(), SyncPool())
    envelope = Envelope("a@example.org", (Recipient("b@example.test"),))
    logged: list[str] = []

    def observe(event: dict) -> None:  # type: ignore[type-arg]
        if "DKIM: cannot sign" in event.get("log_format", ""):
            logged.append(event["error"])

    globalLogPublisher.addObserver(observe)
    try:
        for body in (
            b" h=from; b=forged\r\nFrom: a@example.org\r\n\r\nbody\r\n",
            b"\tx\r\n",
            b"Received: by us\r\n\r\n h=from; b=forged\r\nFrom: a@example.org\r\n\r\nx\r\n",
        ):
            writer = intake.open(envelope)
            writer.write(body)
            writer.commit()
            message = store.messages[writer.queue_id]
            assert message.prefix == b""  # the stored text goes out as it is
            assert prefixed(message.prefix, store.open_body(message.queue_id)).read() == body
    finally:
        globalLogPublisher.removeObserver(observe)
    assert len(logged) == 3 and "no header section" in logged[0]
    assert "no From header field" in logged[2]


@pytest.mark.integration
def test_a_message_is_signed_once_when_received_and_every_attempt_sends_that_signature(tmp_path):
    """The first attempt is refused at the final dot (smtp-sink dumps what it got), the relay
    restarts over its spool, the next attempt is taken: the same text, one DKIM-Signature, made
    when the message was received (its t= is from before the restart)."""
    import re
    import time

    from mailrelay.queue.spool import FilesystemSpool
    from tests.support.peers import SMTPSink, free_port
    from tests.support.relay import RelayProcess

    make_key(tmp_path / "example.org.pem", "rsa")
    port = free_port()
    refusing = SMTPSink(port=port, flags=["-r", "."]).start()
    relay = RelayProcess(
        f'[queue]\nretry_schedule = ["2s"]\n'
        f'[dkim]\ndomains = ["example.org"]\nselector = "s2026"\n'
        f'key_file = "{tmp_path}/{{domain}}.pem"\n'
        f'[[routes]]\ntype = "static"\ndomains = ["*"]\nhosts = ["127.0.0.1:{port}"]\n'
    ).start()
    taking = None
    try:
        received = int(time.time())
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=20) as client:
            client.sendmail(
                "a@example.org",
                ["rcpt@example.test"],
                b"From: a@example.org\r\nSubject: once\r\n\r\nsigned once\r\n",
            )
        relay.wait_log("status=deferred")
        refusing.wait_for(1)
        assert relay.stop() == 0
        spool = FilesystemSpool(str(relay.spool), None)  # as `mailrelay queue show` reads it
        (queued,) = [spool.read_message(qid) for qid in spool.scan_ids()]
        refusing.stop()
        taking = SMTPSink(port=port).start()
        relay.start()  # a new spool instance over the same directory
        taking.wait_for(1)
        relay.wait_log("status=sent")
        tried = [t.data for t in refusing.transactions()]
        (sent,) = [t.data for t in taking.transactions()]
    finally:
        relay.cleanup()
        refusing.cleanup()
        if taking is not None:
            taking.cleanup()
    assert tried and all(text == sent for text in tried)
    assert sent.startswith(queued.prefix) and sent.count(b"DKIM-Signature:") == 1
    assert queued.prefix.startswith(b"DKIM-Signature:")  # kept with the queued message
    assert b"d=example.org" in sent and b"\r\nReceived: " in sent
    t = re.search(rb"\bt=(\d+);", sent)
    assert t is not None and received - 1 <= int(t.group(1)) <= received + 5


def test_a_reload_swaps_the_keys_and_a_message_keeps_the_signature_it_was_received_with(tmp_path):
    from twisted.internet.task import Clock

    from mailrelay.envelope import Envelope, Recipient
    from mailrelay.testing import MemoryQueueStore
    from tests.support.dkim import SyncPool, SyncReactor

    make_key(tmp_path / "example.org.pem", "rsa")
    make_key(tmp_path / "other.example.pem", "ed25519")
    key_file = str(tmp_path / "{domain}.pem")
    store = MemoryQueueStore()
    relay = MailRelayService(relay_config(tmp_path, 2600, key_file), Clock(), store=store)
    relay.intake.reactor, relay.intake.threadpool = SyncReactor(), SyncPool()  # sign at once
    envelope = Envelope("a@example.org", (Recipient("b@example.test"),))

    def receive() -> Any:
        writer = relay.intake.open(envelope)
        writer.write(b"From: a@example.org\r\n\r\nbody\r\n")
        return writer

    before = receive()
    cfg = relay_config(tmp_path, 2600, key_file)
    new = attrs.evolve(cfg, dkim=attrs.evolve(cfg.dkim, selector="s2027"))
    assert relay.reconfigure(new).result == []
    before.commit()
    after = receive()
    after.commit()
    assert b" s=s2026;" in store.messages[before.queue_id].prefix  # opened before the reload
    assert b" s=s2027;" in store.messages[after.queue_id].prefix
