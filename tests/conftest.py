"""The test suite's one conftest: registers the shared fixtures of ``tests/support`` for both
``tests/unit`` and ``tests/integration``; marks every test under ``tests/integration`` as
``integration`` (``-m "not integration"`` and ``tests/unit`` then select the same tests); and
leaves ``soak`` tests out unless the ``-m`` expression names them (``make soak``: ``-m soak``), so
a plain ``pytest tests/unit`` is the quick run."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = [
    "tests.support.peers",  # smtp_sink: a real smtp-sink
    "tests.support.queue.spool",  # spool: a started spool whose fsyncs are recorded
    "tests.support.reliability.fixtures",  # relays, sinks: relay processes and sinks, cleaned up
    "tests.support.routing.nsd",  # nsd: a real NSD on loopback
    "tests.support.routing.slapd",  # slapd: a real slapd on loopback
]

INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(INTEGRATION):
            item.add_marker(pytest.mark.integration)
    if "soak" in (config.getoption("markexpr") or ""):
        return
    soak = [item for item in items if item.get_closest_marker("soak")]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if not item.get_closest_marker("soak")]
