"""Writing to and half-closing a plain TCP socket without a turn of the reactor (``_direct``)."""

from __future__ import annotations

import socket

import pytest

from mailrelay.smtp import _fast as _direct


class _Transport:
    """What ``_direct`` reads of a Twisted TCP transport: its state and its unsent bytes."""

    def __init__(self, unsent: bytes = b"") -> None:
        self.connected = True
        self.disconnecting = False
        self.dataBuffer = unsent  # noqa: N815 - Twisted's name
        self._tempDataBuffer: list[bytes] = []
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


@pytest.fixture
def pair():  # type: ignore[no-untyped-def]
    ours, theirs = socket.socketpair()
    theirs.settimeout(5)
    yield ours, theirs
    ours.close()
    theirs.close()


def test_a_half_close_sends_what_was_written_then_the_end_and_still_reads(pair):  # type: ignore[no-untyped-def]
    ours, theirs = pair
    transport = _Transport()
    _direct.write(transport, ours, b"221 2.0.0 Bye\r\n")
    assert _direct.half_close(transport, ours)
    assert theirs.recv(100) == b"221 2.0.0 Bye\r\n"
    assert theirs.recv(100) == b""  # our FIN
    theirs.sendall(b"QUIT\r\n")  # our reading side stays open: the client's bytes are drained
    assert ours.recv(100) == b"QUIT\r\n"


def test_no_half_close_while_the_transport_holds_bytes_unsent(pair):  # type: ignore[no-untyped-def]
    ours, theirs = pair
    transport = _Transport(unsent=b"250 2.0.0 Ok\r\n")
    assert not _direct.half_close(
        transport, ours
    )  # they would follow our FIN: the transport does it
    theirs.setblocking(False)
    with pytest.raises(BlockingIOError):
        theirs.recv(100)  # no FIN (an EOF would read b"")
    assert not _direct.half_close(_Transport(), None)  # TLS: no socket to shut
