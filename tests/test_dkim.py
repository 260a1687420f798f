"""DKIM signing per sender domain: what reaches smtp-sink passes dkimpy's own verifier."""

from __future__ import annotations

import base64
import smtplib
import time

import dkim
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import threads

from mailrelay import config
from mailrelay.errors import ConfigError
from mailrelay.service import MailRelayService


def make_key(path) -> bytes:  # type: ignore[no-untyped-def]
    """Write a fresh RSA private key to ``path``; → the TXT record that publishes it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def relay_config(tmp_path, sink_port: int, key_file: str) -> config.Config:
    return config.loads(
        f"""
[server]
hostname = "dkim.mailrelay.test"
listen = ["tcp:0:interface=127.0.0.1"]
[spool]
path = "{tmp_path / 'spool'}"
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
def test_outgoing_mail_is_signed_per_sender_domain_and_verifies(tmp_path, smtp_sink):
    keys = tmp_path / "keys"
    keys.mkdir()
    txt = {b"s2026._domainkey.example.org.": make_key(keys / "example.org.pem"),
           b"s2026._domainkey.other.example.": make_key(keys / "other.example.pem")}
    relay = MailRelayService(relay_config(tmp_path, smtp_sink.port, str(keys / "{domain}.pem")))
    relay.startService()
    try:
        yield relay.listeners[0].listening
        port = relay.ports[0].getHost().port

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
                for sender, header_from, n in (("a@example.org", "A <a@example.org>", 1),
                                               ("bounces@unsigned.test", "b@other.example", 2),
                                               ("c@unsigned.test", "c@unsigned.test", 3)):
                    client.sendmail(sender, ["rcpt@example.test"],
                                    f"From: {header_from}\r\nTo: rcpt@example.test\r\nSubject: m{n}\r\n"
                                    f"Message-ID: <m{n}@example>\r\n\r\nbody {n}\r\n.dot line\r\n".encode())

        yield threads.deferToThread(send)
        yield threads.deferToThread(smtp_sink.wait_for, 3, 20)
        yield threads.deferToThread(lambda: _wait_counted(smtp_sink, 3))
    finally:
        yield relay.stopService()

    by_id = {}
    for t in smtp_sink.transactions():
        mid = [ln for ln in t.data.split(b"\r\n") if ln.startswith(b"Message-ID:")][0]
        by_id[mid.split()[1].decode()] = t.data

    def dns(name: bytes, timeout: int = 5) -> bytes | None:
        return txt.get(name)

    signed1, signed2, unsigned = by_id["<m1@example>"], by_id["<m2@example>"], by_id["<m3@example>"]
    assert signed1.startswith(b"DKIM-Signature:") and b"d=example.org" in signed1.split(b"\r\n\r\n")[0]
    # the From domain chooses the key (DMARC alignment), not the envelope sender's
    assert b"d=other.example" in signed2.split(b"\r\n\r\n")[0]
    assert dkim.verify(signed1, dnsfunc=dns) and dkim.verify(signed2, dnsfunc=dns)
    assert b"DKIM-Signature" not in unsigned
    # and the verifier is not a rubber stamp: a changed body fails
    assert not dkim.verify(signed1.replace(b"body 1", b"body X"), dnsfunc=dns)


def _wait_counted(sink, n: int) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 20
    while sink.count() < n and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_missing_key_is_a_config_error_naming_the_key(tmp_path):
    cfg = relay_config(tmp_path, 2600, str(tmp_path / "{domain}.pem"))
    with pytest.raises(ConfigError) as e:
        MailRelayService(cfg)
    assert "dkim.key_file" in str(e.value) and "example.org.pem" in str(e.value)


def test_dkim_domains_need_a_key_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.loads('[dkim]\ndomains = ["example.org"]\n', "d.toml")
    assert "dkim.key_file" in str(e.value)


def test_a_message_without_a_header_section_goes_out_unsigned_and_unchanged(tmp_path):
    """Text that begins with whitespace has no header section (the session puts an empty line after
    its Received header then): nothing may be put on top of it that its first line would continue.
    With no From: header there is nothing to sign for, so it goes out as it is."""
    import io

    from mailrelay.dkim import DKIMSigner, DKIMSigningDeliverer, DomainKey
    from mailrelay.envelope import Envelope, Recipient

    make_key(tmp_path / "k.pem")
    signer = DKIMSigner({"example.org": DomainKey("example.org", "s1", (tmp_path / "k.pem").read_bytes())})
    signing = DKIMSigningDeliverer(object(), signer, None, None)  # type: ignore[arg-type]
    envelope = Envelope("a@example.org", (Recipient("b@example.test"),))
    for body in (b" h=from; b=forged\r\nFrom: a@example.org\r\n\r\nbody\r\n", b"\tx\r\n"):
        assert signing._signed(envelope, lambda body=body: io.BytesIO(body)) is None
