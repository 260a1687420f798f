"""Writing a short SMTP line straight to a plain TCP socket, and half-closing it at the end.

Twisted's ``transport.write`` buffers the bytes, registers the socket for writing (an
``epoll_ctl``) and sends on the next turn of the reactor (another ``epoll_ctl`` to stop
writing): three system calls and a reactor turn for a line that the kernel takes at once. Both
the server's replies and the client's commands are such lines, several per message.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp


def direct_socket(transport: Any) -> socket.socket | None:
    """The socket to write to directly: only a plain (not TLS) Twisted TCP connection has one."""
    if (
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and hasattr(transport, "_tempDataBuffer")
    ):
        return transport.socket  # type: ignore[no-any-return]
    return None


def write(transport: Any, sock: socket.socket | None, data: bytes) -> None:
    """Send ``data`` on ``sock`` now if the transport holds nothing unsent (so the order on the
    wire is kept); what the kernel does not take, and everything else, goes through the transport."""
    if (
        sock is not None
        and transport.connected
        and not transport.disconnecting
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    ):
        try:
            sent = sock.send(data)
        except OSError:  # EAGAIN, or a dead connection: the transport finds out and reports it
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def half_close(transport: Any, sock: socket.socket | None) -> bool:
    """Shut our sending side of ``sock`` now (a FIN after what was sent) if the transport holds
    nothing unsent; whether that is done. ``loseWriteConnection`` does the same a reactor turn
    later, after registering for writing, an empty ``send`` and unregistering: three system calls."""
    if (
        sock is None
        or not transport.connected
        or transport.disconnecting
        or transport.dataBuffer
        or transport._tempDataBuffer
    ):
        return False
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the peer is gone already (ENOTCONN after its reset): the transport's next read ends it
    return True
