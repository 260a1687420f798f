"""The CLI's side of the control channel: connect to a running instance's UNIX socket."""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.protocols import amp

from mailrelay._quiet import connect_protocol


def is_listening(path: str) -> bool:
    """Whether an instance answers on ``path`` (a quick blocking probe, for the CLI only)."""
    if not os.path.exists(path):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def connect(reactor: Any, path: str, timeout: float = 10) -> defer.Deferred[Any]:
    """A Deferred of an ``amp.AMP`` connected to the instance on ``path``."""
    return connect_protocol(UNIXClientEndpoint(reactor, path, timeout=timeout), amp.AMP())
