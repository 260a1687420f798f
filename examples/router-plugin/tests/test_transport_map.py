"""The plugin's own tests, with mailrelay's public fakes: no relay, no sockets."""

from __future__ import annotations

from pathlib import Path

import pytest
from mailrelay_transport_map import TransportMapRouter
from zope.interface.verify import verifyObject

from mailrelay import ConfigError, IRouter, NextHop, PermanentFailure
from mailrelay.testing import router_context

TABLE = """\
# pattern            action
alice@example.test   127.0.0.1:2601
example.test         127.0.0.1:2600, [::1]:2600
.example.test        smtp.example.test
old.example.test     error:550 5.1.6 moved to new.example.test
"""


def router(tmp_path: Path, text: str = TABLE) -> TransportMapRouter:
    (tmp_path / "transport.txt").write_text(text)
    context = router_context(
        source="relay.toml", key="routes[0]"
    )  # as the relay gives it at start-up
    return TransportMapRouter.from_options(
        {"path": str(tmp_path / "transport.txt"), "port": 2525}, context
    )


def test_lookup_order(tmp_path: Path) -> None:
    r = router(tmp_path)
    assert verifyObject(IRouter, r)
    assert r.route("Alice@Example.test", None).hops == (NextHop("127.0.0.1", 2601, 0),)
    assert r.route("bob@example.test", None).hops == (
        NextHop("127.0.0.1", 2600, 0),
        NextHop("::1", 2600, 1),
    )
    assert r.route("bob@a.b.example.test", None).hops == (NextHop("smtp.example.test", 2525, 0),)
    assert r.route("bob@example.org", None) is None


def test_error_action_refuses(tmp_path: Path) -> None:
    with pytest.raises(PermanentFailure) as info:
        router(tmp_path).route("bob@old.example.test", None)
    assert (info.value.reply.code, info.value.reply.enhanced) == (550, "5.1.6")


def test_a_bad_line_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        router(tmp_path, "example.test 127.0.0.1:0\n")
    assert (info.value.path, info.value.key) == ("relay.toml", "routes[0].path")
    assert "line 1" in info.value.reason
