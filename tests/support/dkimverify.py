"""Independent DKIM verifiers for the signing tests, fetching keys from a real DNS server (the
tests' NSD) on loopback: Perl's Mail::DKIM (Debian ``libmail-dkim-perl``) and OpenDKIM's test mode
(Debian ``opendkim``, through libunbound). Not dkimpy: it is what signs.

Debian 12's Mail::DKIM knows rsa-sha256 but not ed25519-sha256 (it says "unsupported algorithm");
OpenDKIM 2.11 knows both.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support.peers import require

SCRIPT = Path(__file__).with_name("dkim_verify.pl")


def dkim_zone(domain: str, selector: str, record: str) -> str:
    """A zone for ``domain`` publishing ``record`` (a DKIM key record) at
    ``selector._domainkey``."""
    strings = " ".join(
        f'"{record[i : i + 200]}"' for i in range(0, len(record), 200)
    )  # 255 at most each
    return (
        f"$ORIGIN {domain}.\n$TTL 60\n@ SOA ns.{domain}. hostmaster.{domain}. 1 3600 600 86400 60\n"
        f"@ NS ns.{domain}.\nns A 127.0.0.1\n{selector}._domainkey TXT {strings}\n"
    )


def mail_dkim(message: bytes, dns_port: int) -> list[str]:
    """Mail::DKIM's verdict on each signature: ``"domain algorithm result[ (detail)]"``."""
    perl = require("perl")
    if subprocess.run([perl, "-MMail::DKIM::Verifier", "-e", "1"], capture_output=True).returncode:
        pytest.skip("Perl Mail::DKIM not installed (make test installs libmail-dkim-perl)")
    done = subprocess.run(
        [perl, str(SCRIPT), str(dns_port)], input=message, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout.decode().splitlines()


_OPENDKIM_VERDICT = re.compile(r"verification \(s=([^ ,]+),? d=([^ ,]+),.*\) (succeeded|failed)")


def opendkim(message: bytes, dns_port: int, zones: list[str]) -> list[tuple[str, str]]:
    """OpenDKIM's verdict on the message, as ``(domain, "succeeded" or "failed")``; its resolver
    asks only our DNS server, for ``zones``."""
    binary = require("opendkim")
    with tempfile.TemporaryDirectory(prefix="mailrelay-opendkim-") as d:
        # every name, ours and any other ("." too), is asked of our server only: nothing leaves
        # loopback
        stubs = "".join(
            f'stub-zone:\n    name: "{z}"\n    stub-addr: 127.0.0.1@{dns_port}\n'
            for z in [*zones, "."]
        )
        (Path(d) / "unbound.conf").write_text(
            f'server:\n    do-not-query-localhost: no\n    module-config: "iterator"\n{stubs}'
        )
        (Path(d) / "opendkim.conf").write_text(
            f"Mode v\nSyslog no\nResolverConfiguration {d}/unbound.conf\n"
        )
        (Path(d) / "message.eml").write_bytes(message)
        done = subprocess.run(
            [binary, "-x", f"{d}/opendkim.conf", "-v", "-t", f"{d}/message.eml"],
            capture_output=True,
            timeout=60,
        )
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0, out + done.stderr.decode(errors="replace")
    return [(m.group(2), m.group(3)) for m in _OPENDKIM_VERDICT.finditer(out)]
