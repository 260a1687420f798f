"""What a router factory is given besides its options: the reactor and shared resources."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime

from mailrelay.config import Section


@attrs.define
class RouterContext:
    """Passed to every ``IRouterFactory``.

    ``reactor`` provides at least ``IReactorTime`` (tests pass a ``Clock``); ``threadpool`` is
    where blocking libraries (ldap3) run; ``source`` and ``key`` locate the ``[[routes]]`` table so
    that option errors can name them; ``random`` orders equal-preference hosts (seeded in tests).
    """

    reactor: IReactorTime
    threadpool: Any = None
    source: str = "<config>"
    key: str = "routes"
    random: Any = None
    resolver: Any = None

    def options(self, options: Mapping[str, Any]) -> Section:
        """A ``Section`` over the options; its errors name ``routes[N].key`` in the config file."""
        return Section(self.source, self.key, options)
