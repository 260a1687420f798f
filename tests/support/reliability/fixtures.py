"""Fixtures of the reliability and security campaign (``relays``, ``sinks``): relay processes and
smtp-sinks that are always cleaned up."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support.peers import SMTPSink
from tests.support.relay import RelayProcess


@pytest.fixture
def relays() -> Iterator[Callable[..., RelayProcess]]:
    """``relays(config_body, **kw)`` → a started ``RelayProcess``, stopped and removed
    afterwards."""
    made: list[RelayProcess] = []

    def make(body: str = "", start: bool = True, **kw: object) -> RelayProcess:
        relay = RelayProcess(body, **kw)  # type: ignore[arg-type]
        made.append(relay)
        return relay.start() if start else relay

    yield make
    for relay in made:
        relay.cleanup()


@pytest.fixture
def sinks() -> Iterator[Callable[..., SMTPSink]]:
    """``sinks(*flags, port=None)`` → a started smtp-sink, stopped and removed afterwards."""
    made: list[SMTPSink] = []

    def make(*flags: str, port: int | None = None, dump: bool = True) -> SMTPSink:
        sink = SMTPSink(port=port, flags=list(flags), dump=dump)
        made.append(sink)
        return sink.start()

    yield make
    for sink in made:
        sink.cleanup()
