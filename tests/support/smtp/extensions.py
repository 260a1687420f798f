"""Server connections set up for the extensions' tests: AUTH against an in-memory user database
(``auth_conn``), CHUNKING/BDAT with BINARYMIME (``bdat_conn``), and what EHLO offers."""

from __future__ import annotations

import base64
import ipaddress
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse

from mailrelay.config import ServerConfig
from mailrelay.envelope import TLSInfo
from tests.support.smtp.fakes import Conn

CONFIG = ServerConfig(
    hostname="mx.example.test",
    local_domains=("example.test",),
    trusted_networks=(ipaddress.ip_network("10.0.0.0/8"),),
)


def b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def ehlo_keywords(c: Conn) -> set[str]:
    """The keywords the server offers to a fresh EHLO."""
    c.output()
    c.send("EHLO client.example.org\r\n")
    return {line[4:] for line in c.output().decode().split("\r\n")[1:] if line}


def checker() -> InMemoryUsernamePasswordDatabaseDontUse:
    """One user: alice, password s3cret."""
    db = InMemoryUsernamePasswordDatabaseDontUse()
    db.addUser(b"alice", b"s3cret")
    return db


def auth_conn(
    tls: bool = True, plaintext: bool = False, submission: bool = False, **kw: Any
) -> Conn:
    """A connection that offers AUTH PLAIN and LOGIN, over TLS unless ``tls`` is false."""
    import attrs

    c = Conn(config=CONFIG, checker=checker(), client="192.0.2.9", **kw)
    s = attrs.evolve(
        c.factory.settings,
        auth_mechanisms=("PLAIN", "LOGIN"),
        allow_plaintext_auth=plaintext,
        require_auth=submission,
    )
    c.server.session.settings = s
    if tls:
        c.server.session.tls_established(TLSInfo("TLSv1.3", "X"))
    return c


def bdat_conn() -> Conn:
    """A connection after EHLO that offers CHUNKING and BINARYMIME."""
    c = Conn(config=CONFIG, binarymime=True)  # every route onward carries it
    kw = ehlo_keywords(c)
    assert {"CHUNKING", "BINARYMIME"} <= kw
    return c
