"""A real OpenLDAP slapd on loopback with mail routing entries (misc.schema's
inetLocalMailRecipient).

back-mdb in a temp dir, entries loaded offline with ``slapadd`` before start, served on
``ldap://127.0.0.1:PORT/``. ``stop()`` and ``start()`` again keep the data and the port, so tests
can take the directory away in the middle and bring it back.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.peers import free_port, require, stop_pid, wait_listening

BASE = "dc=example,dc=test"
BIND_DN = f"cn=mailrelay,ou=services,{BASE}"
BIND_PASSWORD = "mailrelay-secret"

ENTRIES = f"""\
dn: {BASE}
objectClass: dcObject
objectClass: organization
dc: example
o: Example Test

dn: ou=people,{BASE}
objectClass: organizationalUnit
ou: people

dn: ou=services,{BASE}
objectClass: organizationalUnit
ou: services

dn: {BIND_DN}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: mailrelay
userPassword: {{BINDHASH}}

dn: uid=alice,ou=people,{BASE}
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: alice
cn: Alice Smith
sn: Smith
mailLocalAddress: alice@example.test
mailLocalAddress: a.smith@example.test
mailRoutingAddress: alice@mailstore1.example.test
mailHost: mx1.example.test

dn: uid=bob,ou=people,{BASE}
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: bob
cn: Bob Jones
sn: Jones
mailLocalAddress: bob@example.test
mailHost: mx2.example.test

dn: uid=carol,ou=people,{BASE}
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: carol
cn: Carol White
sn: White
mailLocalAddress: carol@example.test
mailRoutingAddress: carol@other.test

dn: uid=dave,ou=people,{BASE}
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: dave
cn: Dave Brown
sn: Brown
mailLocalAddress: dave@example.org
mailRoutingAddress: dave@example.org
mailHost: [127.0.0.1]

dn: uid=frank,ou=people,{BASE}
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: frank
cn: Frank Plain
sn: Plain
mailLocalAddress: frank@example.test

dn: cn=catchall-example-net,ou=people,{BASE}
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
cn: catchall-example-net
sn: catchall
mailLocalAddress: @example.net
mailRoutingAddress: postmaster@example.test

dn: uid=erin,ou=people,{BASE}
objectClass: inetOrgPerson
uid: erin
cn: Erin Nomail
sn: Nomail
mail: erin@example.test
"""


class Slapd:
    """``Slapd().start()``; ``.uri``; ``.stop()`` / ``.start()``; ``.cleanup()``."""

    def __init__(
        self,
        port: int | None = None,
        extra_ldif: str = "",
        tls: tuple[bytes, bytes, bytes] | None = None,
    ) -> None:
        """``tls`` = (CA PEM, certificate PEM, key PEM): StartTLS on ``uri`` and ``ldaps_uri``
        too."""
        self.binary = require("slapd")
        self.slapadd = require("slapadd")
        self.port = port or free_port()
        self.uri = f"ldap://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="mailrelay-slapd-"))
        (self.dir / "db").mkdir()
        tls_conf = ""
        self.ldaps_uri: str | None = None
        if tls is not None:
            for name, pem in zip(("ca.pem", "cert.pem", "key.pem"), tls, strict=True):
                (self.dir / name).write_bytes(pem)
            tls_conf = (
                f"TLSCACertificateFile {self.dir}/ca.pem\n"
                f"TLSCertificateFile {self.dir}/cert.pem\n"
                f"TLSCertificateKeyFile {self.dir}/key.pem\n"
            )
            self.ldaps_uri = f"ldaps://127.0.0.1:{free_port()}"
        bindhash = subprocess.run(
            [require("slappasswd"), "-s", BIND_PASSWORD], check=True, capture_output=True, text=True
        ).stdout.strip()
        (self.dir / "slapd.conf").write_text(f"""\
include   /etc/ldap/schema/core.schema
include   /etc/ldap/schema/cosine.schema
include   /etc/ldap/schema/inetorgperson.schema
include   /etc/ldap/schema/nis.schema
include   /etc/ldap/schema/misc.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile   {self.dir}/slapd.pid
argsfile  {self.dir}/slapd.args
{tls_conf}
database  mdb
maxsize   104857600
suffix    "{BASE}"
rootdn    "cn=admin,{BASE}"
rootpw    admin-secret
directory {self.dir}/db
index     objectClass eq
index     mailLocalAddress eq
access to attrs=userPassword
       by anonymous auth
       by * none
access to *
       by dn.exact="{BIND_DN}" read
       by * none
""")
        ldif = self.dir / "entries.ldif"
        ldif.write_text(
            ENTRIES.replace("{BINDHASH}", bindhash) + ("\n" + extra_ldif if extra_ldif else "")
        )
        out = subprocess.run(
            [self.slapadd, "-q", "-f", str(self.dir / "slapd.conf"), "-l", str(ldif)],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            raise RuntimeError(f"slapadd failed: {out.stdout}{out.stderr}")
        self.pid: int | None = None

    def start(self, timeout: float = 10.0) -> Slapd:
        # slapd daemonises; -d 0 would keep it in the foreground but it then logs to stderr forever
        listen = " ".join(u for u in (self.uri, self.ldaps_uri) if u)
        out = subprocess.run(
            [self.binary, "-f", str(self.dir / "slapd.conf"), "-h", listen],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        if out.returncode:
            raise RuntimeError(f"slapd failed to start: {out.stdout}{out.stderr}")
        pidfile = self.dir / "slapd.pid"
        deadline = time.monotonic() + timeout
        while (
            not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        self.pid = int(pidfile.read_text().strip())
        wait_listening("127.0.0.1", self.port, timeout=max(deadline - time.monotonic(), 1.0))
        return self

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """Signal the daemon by its PID and wait until it is gone (the port is free again).

        SIGTERM is a clean shutdown (slapd takes about 2 s); SIGKILL is instant and, with back-mdb,
        as safe for the data.
        """
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        stop_pid(pid, timeout, sig)

    def cleanup(self) -> None:
        self.stop(
            sig=signal.SIGKILL
        )  # its files are deleted next: no need to wait for a clean exit
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def slapd() -> Iterator[Slapd]:
    """A started slapd with the routing entries, shared by a module (tests that stop it make their
    own)."""
    server = Slapd().start()
    try:
        yield server
    finally:
        server.cleanup()
