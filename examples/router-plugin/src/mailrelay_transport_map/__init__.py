"""A mailrelay router plugin: next hops from a transport table file (Postfix ``transport(5)``
style).

Each line is ``PATTERN ACTION``: the pattern is a full address, a domain, or ``.domain`` for its
subdomains; the action is a comma-separated list of ``host:port`` next hops (tried in order), or
``error:CODE X.Y.Z text`` to refuse. Lookup order is address, then domain, then each parent
``.domain``; the first match wins; no match answers ``None`` (the next router decides).
The file is read once, when the relay starts: the router never blocks the reactor.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zope.interface import implementer

from mailrelay import (
    ConfigError,
    IRouter,
    NextHop,
    PermanentFailure,
    Reply,
    Route,
    RouterContext,
    parse_hostport,
)

Action = Route | Reply


def parse_action(text: str, default_port: int) -> Action:
    """``"a:25, [::1]:26"`` → a ``Route``; ``"error:550 5.1.6 moved"`` → the ``Reply`` to refuse
    with."""
    if text.startswith("error:"):
        code, _, rest = text[len("error:") :].strip().partition(" ")
        enhanced, _, message = rest.partition(" ")
        if not (
            code.isdigit() and code.startswith("5") and len(code) == 3 and enhanced.startswith("5.")
        ):
            raise ValueError(f"{text!r}: write error:5XX 5.X.Y text")
        return Reply(int(code), enhanced, message or "refused")
    hosts = [parse_hostport(h.strip(), default_port) for h in text.split(",") if h.strip()]
    if not hosts:
        raise ValueError("no next hop")
    return Route(tuple(NextHop(host, port, preference=i) for i, (host, port) in enumerate(hosts)))


def load_table(path: Path, default_port: int) -> dict[str, Action]:
    """The table as ``pattern → action``; ``ValueError("line N: ...")`` on the first bad line."""
    table: dict[str, Action] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        pattern, _, action = line.partition(" ")
        try:
            table.setdefault(
                pattern.lower().rstrip("."), parse_action(action.strip(), default_port)
            )
        except ValueError as e:
            raise ValueError(f"line {number}: {e}") from None
    return table


@implementer(IRouter)
class TransportMapRouter:
    """Routes by a ``pattern → action`` table (see the module doc)."""

    def __init__(self, table: Mapping[str, Action]) -> None:
        self.table = dict(table)

    def route(self, recipient: str, envelope: Any) -> Route | None:
        local, _, domain = recipient.rpartition("@")
        domain = domain.lower().rstrip(".")
        candidates = [f"{local}@{domain}".lower(), domain]
        parts = domain.split(".")
        candidates += ["." + ".".join(parts[i:]) for i in range(1, len(parts))]
        for key in candidates:
            action = self.table.get(key)
            if isinstance(action, Reply):
                raise PermanentFailure(action)
            if action is not None:
                return action
        return None

    @classmethod
    def from_options(cls, options: Mapping[str, Any], context: RouterContext) -> TransportMapRouter:
        """The ``IRouterFactory``: ``path`` (required) and ``port`` (for hops without one)."""
        section = context.options(options)  # errors name routes[N].<key> in the config file
        path = section.get("path", None, types=str)
        port = section.get("port", 25, types=int)
        section.check_unknown()
        if path is None:
            raise section.error("path", "missing: the transport table file")
        try:
            return cls(load_table(Path(path), port))
        except OSError as e:
            raise section.error("path", f"{path}: {e.strerror}") from None
        except ValueError as e:
            raise ConfigError(context.source, section.key("path"), f"{path}: {e}") from None
