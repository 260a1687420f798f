"""``twistd mailrelay``: command-line options and ``makeService``."""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from mailrelay import config as configmod
from mailrelay.errors import ConfigError

#: Used when no ``--config`` is given: a loopback-only relay that routes by MX.
DEFAULT_CONFIG = """\
[server]
listen = ["tcp:2525:interface=127.0.0.1"]

[spool]
path = "var/spool"

[[routes]]
type = "mx"
"""


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the mailrelay mail transfer agent. Without --config it listens on "
        "127.0.0.1:2525, spools under var/spool and routes by MX."
    )
    optParameters = [
        ["config", "c", None, "The TOML configuration file."],
    ]

    def postOptions(self) -> None:
        try:
            if self["config"]:
                self.loaded = configmod.load(self["config"])
            else:
                self.loaded = configmod.loads(DEFAULT_CONFIG, "<built-in default>")
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> IService:
    from mailrelay.service import MailRelayService

    try:
        return MailRelayService(options.loaded)
    except ConfigError as e:
        # twistd would print a traceback; an operator wants the file, key and reason.
        sys.stderr.write(f"mailrelay: {e}\n")
        raise SystemExit(1) from None
