"""LMTP delivery (RFC 2033): LHLO, and one reply per recipient after the final dot.

In memory against scripted replies (through a real relay to Postfix's ``smtp-sink -L``:
tests/integration/delivery/test_lmtp_sink.py).
"""

from __future__ import annotations

import pytest

from mailrelay import config
from mailrelay.envelope import Envelope, Recipient, Reply
from mailrelay.errors import ConfigError
from mailrelay.routing.context import RouterContext
from mailrelay.routing.static import StaticRouter
from mailrelay.smtp.client import SMTPClientProtocol
from tests.support.smtp.client import Conn

ENV = Envelope("a@x.test", (Recipient("b@y.test"), Recipient("c@y.test"), Recipient("d@y.test")))


class LMTPConn(Conn):
    def __init__(self) -> None:  # Conn, but the client speaks LMTP
        from twisted.internet import task
        from twisted.internet.testing import StringTransport

        self.clock = task.Clock()
        self.client = SMTPClientProtocol("client.test", self.clock, lmtp=True)
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        self.ready = []
        self.client.ready.addBoth(self.ready.append)
        self.reply(b"220 mda.test LMTP\r\n")
        assert self.sent() == b"LHLO client.test\r\n"
        self.reply(b"250-mda.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 8BITMIME\r\n")


def test_one_reply_per_accepted_recipient_after_the_dot():
    c = LMTPConn()
    out = c.send(env=ENV)
    sent = c.sent()
    assert b"BDAT" not in sent and sent.endswith(
        b"DATA\r\n"
    )  # CHUNKING offered, not used over LMTP
    c.reply(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n250 2.1.5 ok\r\n354 go\r\n")
    assert c.sent().endswith(b"\r\n.\r\n")
    assert out == []
    c.reply(b"250 2.0.0 <b@y.test> delivered\r\n")
    assert out == []  # one reply per accepted recipient: still waiting for d's
    c.reply(b"452 4.2.2 <d@y.test> mailbox full\r\n")
    [replies] = out
    assert [r.code for r in replies] == [250, 550, 452]
    assert replies[2] == Reply(452, "4.2.2", "<d@y.test> mailbox full")
    # and the session is still in step for the next transaction
    out2 = c.send(env=Envelope("a@x.test", (Recipient("e@y.test"),)))
    assert c.sent() == b"MAIL FROM:<a@x.test>\r\nRCPT TO:<e@y.test>\r\nDATA\r\n"
    c.reply(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go\r\n")
    assert c.sent().endswith(b"\r\n.\r\n")
    c.reply(b"250 2.0.0 <e@y.test> delivered\r\n")
    assert [r.code for r in out2[0]] == [250]


def test_a_connection_lost_between_the_replies_after_the_dot_keeps_the_deliveries_made():
    c = LMTPConn()
    out = c.send(env=ENV)
    c.sent()
    c.reply(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n250 2.1.5 ok\r\n354 go\r\n")
    c.sent()
    c.reply(b"250 2.0.0 <b@y.test> delivered\r\n")
    c.lose()  # before d's reply
    [failure] = out
    f = failure.value
    assert f.final and f.stage == "data-end"
    assert f.replies == [
        Reply(250, "2.0.0", "<b@y.test> delivered"),
        Reply(550, "5.1.1", "no such user"),
        None,
    ]


def test_static_route_protocol_option():
    ctx = RouterContext(reactor=None, threadpool=None, source="t.toml", key="routes[0]")
    router = StaticRouter.from_options(
        {"domains": ["*"], "hosts": ["127.0.0.1:24"], "protocol": "lmtp"}, ctx
    )
    route = router.route("u@example.test", ENV)
    assert route is not None and route.lmtp
    assert not StaticRouter.from_options(
        {"domains": ["*"], "hosts": ["127.0.0.1:24"]}, ctx
    ).route_.lmtp
    with pytest.raises(ConfigError) as e:
        StaticRouter.from_options({"domains": ["*"], "hosts": ["h:24"], "protocol": "uucp"}, ctx)
    assert "routes[0].protocol" in str(e.value)
    config.loads(
        '[[routes]]\ntype = "static"\ndomains = ["*"]\nhosts = ["h:24"]\nprotocol = "lmtp"\n'
    )
