"""A private Postfix instance on loopback for integration tests (own config, queue and log dirs).

It listens on 127.0.0.1:PORT, relays everything to ``[host]:port`` and, given a key and chain,
offers STARTTLS. Nothing under /etc is touched; DNS is off (this machine's resolver is off-host);
every service runs without chroot. Stopped by the master's PID.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.peers import free_port, require, stop_pid, wait_listening

_MASTER_CF = """\
127.0.0.1:{port} inet  n  -  n  -  -  smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixRelay:
    """``PostfixRelay(nexthop_port, name=..., tls_key=..., tls_chain=...).start()``; ``.log()``,
    ``.stop()``."""

    def __init__(
        self,
        nexthop_port: int,
        name: str = "postfix.mailrelay.test",
        port: int | None = None,
        tls_key: Path | None = None,
        tls_chain: Path | None = None,
        main_cf: tuple[str, ...] = (),
    ) -> None:
        self.postfix = require("postfix")
        self.port = port or free_port()
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix="mailrelay-postfix-"))
        os.chmod(self.dir, 0o755)  # daemons running as postfix must traverse it
        self.etc, self.queue, self.data = self.dir / "etc", self.dir / "queue", self.dir / "data"
        for d in (self.etc, self.queue, self.data):
            d.mkdir()
        shutil.chown(self.data, "postfix")
        self.maillog = self.dir / "maillog"
        self.maillog.touch()
        main = [
            "compatibility_level = 3.6",
            f"queue_directory = {self.queue}",
            f"data_directory = {self.data}",
            f"maillog_file_prefixes = {self.dir.parent}",
            f"maillog_file = {self.maillog}",
            f"myhostname = {name}",
            "mydomain = localhost.test",
            "mydestination =",
            "local_recipient_maps =",
            "alias_maps =",
            "alias_database =",
            "biff = no",
            "inet_interfaces = loopback-only",
            "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8",
            "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
            "smtpd_peername_lookup = no",
            "smtp_dns_support_level = disabled",
            "smtp_host_lookup = native",
            "default_transport = smtp",
            "relay_transport = relay",
            f"relayhost = [127.0.0.1]:{nexthop_port}",
        ]
        if tls_key and tls_chain:
            main += [
                f"smtpd_tls_chain_files = {tls_key}, {tls_chain}",
                "smtpd_tls_security_level = may",
                "smtpd_tls_loglevel = 1",
            ]
        main += main_cf  # more main.cf lines, e.g. "smtputf8_enable = no"
        (self.etc / "main.cf").write_text("\n".join(main) + "\n")
        (self.etc / "master.cf").write_text(_MASTER_CF.format(port=self.port))
        self.master_pid: int | None = None

    def start(self, timeout: float = 20.0) -> PostfixRelay:
        # postfix prints its errors only to a tty; script(1) gives it one so a failure is readable
        res = subprocess.run(
            ["script", "-qec", f"{self.postfix} -c {self.etc} start", "/dev/null"],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if res.returncode != 0:
            raise RuntimeError(f"postfix start failed: {res.stdout}{res.stderr}\n{self.log()}")
        pidfile = self.queue / "pid" / "master.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (
            pidfile.exists() and pidfile.read_text().strip()
        ):
            time.sleep(0.05)
        self.master_pid = int(pidfile.read_text().strip())
        wait_listening("127.0.0.1", self.port, timeout=timeout)
        return self

    def log(self) -> str:
        return self.maillog.read_text(errors="replace")

    def stop(self) -> None:
        if self.master_pid is not None:
            stop_pid(self.master_pid, timeout=10)
            self.master_pid = None

    def cleanup(self) -> None:
        """Stop it and delete its directory (config, queue and log)."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
