"""The ESMTP client protocol in memory (``Conn``): scripted server replies on a StringTransport,
time on a task.Clock; and the dot-stuffing a receiver undoes (``unstuff``)."""

from __future__ import annotations

import io

from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailrelay.envelope import Envelope, Recipient
from mailrelay.smtp.client import ClientState, ClientTimeouts, SMTPClientProtocol

EHLO_PIPE = b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250 8BITMIME\r\n"
EHLO_LOCK = b"250-mx.test\r\n250 SIZE 100000\r\n"
ENV = Envelope("a@x.test", (Recipient("b@y.test"), Recipient("c@y.test"), Recipient("d@y.test")))


class Conn:
    """A client wired to a StringTransport; ``sent()`` returns and clears what it wrote."""

    def __init__(
        self, ehlo: bytes | None = EHLO_PIPE, timeouts: ClientTimeouts | None = None
    ) -> None:
        self.clock = task.Clock()
        self.client = SMTPClientProtocol("client.test", self.clock, timeouts)
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        self.ready: list[object] = []
        self.client.ready.addBoth(self.ready.append)
        if ehlo is not None:
            self.reply(b"220 mx.test ESMTP\r\n")
            assert self.sent() == b"EHLO client.test\r\n"
            self.reply(ehlo)
            assert self.client.state is ClientState.READY

    def reply(self, data: bytes) -> None:
        self.client.dataReceived(data)

    def sent(self) -> bytes:
        v = self.transport.value()
        self.transport.clear()
        return v

    def lose(self) -> None:
        self.client.connectionLost(Failure(ConnectionError("gone")))

    def send(
        self,
        body: bytes | io.BytesIO = b"Subject: x\r\n\r\nhi\r\n",
        env: Envelope = ENV,
        **kw: object,
    ) -> list[object]:
        out: list[object] = []
        f = body if isinstance(body, io.BytesIO) else io.BytesIO(body)
        self.client.send(env, env.recipients, f, size=len(f.getvalue()), **kw).addBoth(out.append)  # type: ignore[arg-type]
        return out


def unstuff(data: bytes) -> bytes:
    """What a receiver makes of DATA: the text up to CRLF.CRLF, leading dots removed."""
    assert data.endswith(b"\r\n.\r\n") or data == b".\r\n"
    text = b"" if data == b".\r\n" else data[: -len(b".\r\n")]
    lines = text.split(b"\r\n")
    assert lines[-1] == b""  # the text always ends with CRLF
    assert all(ln != b"." for ln in lines)  # no early end of data
    assert all(b"\r" not in ln and b"\n" not in ln for ln in lines)  # only CRLF line endings
    return b"".join((ln[1:] if ln.startswith(b".") else ln) + b"\r\n" for ln in lines[:-1])
