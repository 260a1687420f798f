"""Never an open relay: ≥ 30 address tricks from an untrusted, unauthenticated client over a real
socket to a real relay, each refused; the control recipients accepted; and at the sink, proof that
nothing but our own domain's mail arrived.

Each form gets its own session: MAIL, the attack RCPT, then a control RCPT to the local domain and
DATA, so the message that reaches smtp-sink shows the exact envelope the relay kept.
"""

from __future__ import annotations

import pytest

from tests.support.reliability.helpers import Raw, route_to, stuff

pytestmark = pytest.mark.integration

HOSTNAME = "relay.mailrelay.test"
LOCAL = "example.test"

# (MAIL parameters, the whole argument after "RCPT TO:") — every one must be refused with a 5xx.
ATTACKS: list[tuple[str, str]] = [
    ("", "<victim@elsewhere.example>"),
    ("", "<VICTIM@ELSEWHERE.EXAMPLE>"),
    ("", "<victim@ElseWhere.Example>"),
    ("", "<user%elsewhere.example@example.test>"),  # percent hack
    ("", "<user%elsewhere.example%example.test@example.test>"),
    ("", "<user%40elsewhere.example@example.test>"),  # URL-encoded @
    ("", '<"user%elsewhere.example"@example.test>'),
    ("", "<elsewhere.example!user@example.test>"),  # bang path
    ("", '<"elsewhere.example!user"@example.test>'),
    ("", "<elsewhere.example!user>"),
    ("", '<"user@elsewhere.example"@example.test>'),  # quoted @
    ("", '<"user\\@elsewhere.example"@example.test>'),
    ("", '<"user@elsewhere.example">'),
    ("", "<user\\@elsewhere.example@example.test>"),
    ("", '<"elsewhere.example:user"@example.test>'),
    ("", '<"victim@example.test"@elsewhere.example>'),
    ("", "<@example.test:victim@elsewhere.example>"),  # source route through us
    ("", "<@example.test,@example.test:victim@elsewhere.example>"),
    ("", "<@[127.0.0.1]:victim@elsewhere.example>"),
    ("", "<victim@[192.0.2.1]>"),  # address literals
    ("", "<victim@[127.0.0.1]>"),
    ("", "<postmaster@[127.0.0.1]>"),
    ("", "<user@[IPv6:::1]>"),
    ("", "<user@[IPv6:2001:db8::1]>"),
    ("", "<user@[IPv6:::ffff:127.0.0.1]>"),
    ("", "<victim@[example.test]>"),
    ("", "<victim@elsewhere.example.>"),  # trailing dots
    ("", "<victim@example.test.>"),
    ("", "<victim@example.test..>"),
    ("", "<victim@example.test.elsewhere.example>"),  # look-alike domains
    ("", "<victim@elsewhere.example.example.test>"),  # subdomain of a local (exact) domain
    ("", "<victim@notexample.test>"),
    ("", "<victim@localhost>"),
    ("", f"<victim@{HOSTNAME}>"),  # our own host name is not a local domain here
    ("", "<victim@xn--xample-2of.test>"),  # ACE of a homograph of example.test
    ("SMTPUTF8", "<victim@\u0435xample.test>"),  # Cyrillic е: a homograph, with SMTPUTF8
    ("", "<victim@\u0435xample.test>"),  # ... and without it
    ("", "<postmaster@elsewhere.example>"),
    ("", "<POSTMASTER@ELSEWHERE.EXAMPLE>"),
    ("", '<"postmaster"@elsewhere.example>'),
    ("", "<victim@elsewhere.example> NOTIFY=NEVER ORCPT=rfc822;user@example.test"),
    ("", "<victim@example.test@elsewhere.example>"),
    ("", "<victim@elsewhere.example:25>"),
    ("", "victim@elsewhere.example"),  # no brackets
    ("", "< victim@elsewhere.example>"),
    ("", "<victim@elsewhere.example>>"),
    ("", "<victim@elsewhere.example\x00>"),
    ("", "<victim>"),  # unqualified
]

# Accepted from anyone, and delivered to our own domain only.
CONTROLS: list[tuple[str, str]] = [
    ("<user@example.test>", "user@example.test"),
    ("<USER@EXAMPLE.TEST>", "USER@EXAMPLE.TEST"),
    ("<postmaster>", f"postmaster@{HOSTNAME}"),
    ("<Postmaster>", f"postmaster@{HOSTNAME}"),
    ("<@elsewhere.example:user@example.test>", "user@example.test"),  # route dropped, RFC 5321 C
    # an encoded word is just atext in an envelope: a local mailbox, never decoded into an @
    (
        "<=?utf-8?q?victim=40elsewhere.example?=@example.test>",
        "=?utf-8?q?victim=40elsewhere.example?=@example.test",
    ),
]


def is_local(address: str) -> bool:
    domain = address.rpartition("@")[2].lower()
    return domain == LOCAL or address.lower() == f"postmaster@{HOSTNAME}"


def test_no_address_form_is_relayed_for_an_untrusted_client(relays, sinks):
    assert len(ATTACKS) >= 30
    sink = sinks()
    relay = relays(
        '[server]\ntrusted_networks = ["192.0.2.0/24"]\n'
        f'local_domains = ["{LOCAL}"]\n' + route_to(sink.port)
    )
    outcomes: list[tuple[str, bytes]] = []
    for i, (params, rcpt) in enumerate(ATTACKS):
        with Raw(relay.port) as c:
            c.greet()
            assert c.cmd(f"MAIL FROM:<a@example.org>{' ' + params if params else ''}").startswith(
                b"250"
            )
            reply = c.cmd(f"RCPT TO:{rcpt}".encode())
            outcomes.append((rcpt, reply.strip()))
            assert reply[:1] == b"5", f"RCPT TO:{rcpt!r} was not refused: {reply!r}"
            if params:  # smtp-sink has no SMTPUTF8: send the control in a plain transaction
                assert c.cmd("RSET").startswith(b"250")
                assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
            assert c.cmd(f"RCPT TO:<control{i}@{LOCAL}>").startswith(b"250")
            assert c.cmd("DATA").startswith(b"354")
            c.send(
                stuff(
                    f"Message-ID: <attack{i}@relay.test>\r\nSubject: {i}\r\n\r\nbody\r\n".encode()
                )
            )
            assert c.reply().startswith(b"250 2.0.0")
            c.cmd("QUIT")
    for j, (rcpt, _) in enumerate(CONTROLS):
        with Raw(relay.port) as c:
            c.greet()
            assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"250")
            reply = c.cmd(f"RCPT TO:{rcpt}")
            outcomes.append((rcpt, reply.strip()))
            assert reply.startswith(b"250"), (rcpt, reply)
            assert c.cmd("DATA").startswith(b"354")
            c.send(stuff(f"Message-ID: <control{j}@relay.test>\r\n\r\nbody\r\n".encode()))
            assert c.reply().startswith(b"250 2.0.0")

    sink.wait_for(len(ATTACKS) + len(CONTROLS))
    by_id = {}
    for t in sink.transactions():
        assert all(is_local(r) for r in t.recipients), f"relayed outside {LOCAL}: {t.recipients}"
        mid = next(ln for ln in t.data.split(b"\r\n") if ln.startswith(b"Message-ID: "))[
            12:
        ].decode()
        by_id[mid] = t.recipients
    for i in range(len(ATTACKS)):
        assert by_id[f"<attack{i}@relay.test>"] == [f"control{i}@{LOCAL}"]
    for j, (_, expected) in enumerate(CONTROLS):
        assert by_id[f"<control{j}@relay.test>"] == [expected]
    assert len(by_id) == len(ATTACKS) + len(CONTROLS)
    print(
        f"\nopen relay table: {len(ATTACKS)} forms refused, {len(CONTROLS)} controls accepted; "
        f"{len(by_id)} messages at the sink, all to {LOCAL}"
    )
    for rcpt, reply in outcomes:
        print(f"  {rcpt!r:75} {reply.decode(errors='replace')[:70]}")
