"""The SMTP code's speed tricks, all here: each exists only for speed, with what it saved.

Nothing outside this module reads Twisted's private attributes or bypasses the logger.

- ``write`` / ``half_close``: a short SMTP line goes straight to a plain TCP socket. Twisted's
  ``transport.write`` buffers it, registers the socket for writing (an ``epoll_ctl``) and sends
  on the next reactor turn (another ``epoll_ctl``): three system calls and a turn for a line the
  kernel takes at once. ``strace``: 8 -> 4 ``epoll_ctl`` per relayed message for the client's
  writes, and the half-close 4 -> 2 (docs/benchmarks.rst, ``409714c``). They read the transport's
  private ``_tempDataBuffer`` (unsent bytes of this turn) so the order on the wire is kept.
- ``wire``: the encoded form of each fixed reply of ``replies``, by identity: ~0.12 us against
  ~0.9 us for ``Reply.encode()`` (timeit, Python 3.11, this machine), three or four per message.
- ``log_info``: ``log.info`` without its per-call level validation and ``Logger.emit``'s
  indirections: ~2.7 us against ~5.0 us a call (timeit, same), two lines per message.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from twisted.internet import tcp
from twisted.logger import Logger, LogLevel

from mailrelay.envelope import Reply
from mailrelay.smtp import replies


def direct_socket(transport: Any) -> socket.socket | None:
    """The socket to write to directly: only a plain (not TLS) Twisted TCP connection has one."""
    if (
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and hasattr(transport, "_tempDataBuffer")
    ):
        return transport.socket
    return None


def write(transport: Any, sock: socket.socket | None, data: bytes) -> None:
    """Send ``data`` on ``sock`` now if the transport holds nothing unsent (so the order on the
    wire is kept); what the kernel does not take, and all else, goes through the transport."""
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
    later, after registering for writing, an empty ``send`` and unregistering: 3 system calls."""
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
        pass  # the peer is gone (ENOTCONN after its reset): the transport's next read ends it
    return True


#: The wire form of each fixed reply in ``replies``, by identity (a dict lookup on an int; the
#: constants live as long as the process, so no other object can share their id).
_WIRE: dict[int, bytes] = {
    id(r): r.encode() for r in vars(replies).values() if isinstance(r, Reply)
}


def wire(reply: Reply) -> bytes:
    """``reply.encode()``, precomputed for the constants of ``replies``."""
    encoded = _WIRE.get(id(reply))
    return encoded if encoded is not None else reply.encode()


def log_info(log: Logger, fmt: str, **fields: Any) -> None:
    """``log.info(fmt, **fields)`` without its per-call level validation."""
    fields.update(
        log_logger=log,
        log_level=LogLevel.info,
        log_namespace=log.namespace,
        log_source=None,
        log_format=fmt,
        log_time=time.time(),
    )
    observer: Any = log.observer  # an ILogObserver: called with the event
    observer(fields)
