"""build_router: routers loaded by name from the entry-point group, verified at start-up.

Fake third-party distributions are real ones: a module and a ``*.dist-info`` with an
``entry_points.txt`` in a temporary directory put on ``sys.path``, which importlib.metadata scans.
"""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from mailrelay.config import RouteConfig, loads
from mailrelay.envelope import Envelope, NextHop
from mailrelay.errors import ConfigError
from mailrelay.routing.chain import RouterChain
from mailrelay.routing.context import RouterContext
from mailrelay.routing.mx import MXRouter
from mailrelay.routing.plugins import build_router, router_types
from mailrelay.routing.static import StaticRouter
from tests.support.routing.helpers import result_of

ENV = Envelope("s@example.org", ())

PLUGIN = """
from zope.interface import implementer
from mailrelay.interfaces import IRouter
from mailrelay.envelope import NextHop, Route


@implementer(IRouter)
class Good:
    def __init__(self, options, context):
        self.host = context.options(options).get("host", "127.0.0.9", types=str)
        self.key = context.key

    def route(self, recipient, envelope):
        return Route((NextHop(self.host, 2525),)) if recipient.endswith("@plugin.test") else None


class NotARouter:
    def __init__(self, options, context):
        pass


def failing(options, context):
    raise RuntimeError("cannot reach the license server")


def strict(options, context):
    s = context.options(options)
    s.get("colour", "red", types=str)
    s.check_unknown()
    return Good(options, context)
"""


@pytest.fixture
def plugin_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Install a throwaway distribution registering four router types; returns its module name."""
    module = f"fakeplugin_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(PLUGIN)
    info = tmp_path / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent(f"""\
        [mailrelay.routers]
        good = {module}:Good
        notarouter = {module}:NotARouter
        failing = {module}:failing
        strict = {module}:strict
        missing = {module}_nope:Router
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield module
    sys.modules.pop(module, None)


def contexts(key: str) -> RouterContext:
    return RouterContext(Clock(), source="relay.toml", key=key)


def test_builtin_types_are_registered() -> None:
    assert {"static", "mx"} <= set(router_types())


def test_builds_a_chain_in_config_order_from_a_config_file() -> None:
    config = loads(
        textwrap.dedent("""
        [[routes]]
        type = "static"
        domains = ["example.test"]
        hosts = ["127.0.0.1:2526"]

        [[routes]]
        type = "mx"
        nameservers = ["127.0.0.1:5353"]
        port = 2525
        """),
        "relay.toml",
    )
    chain = build_router(config.routes, contexts)
    assert isinstance(chain, RouterChain)
    assert [type(r) for r in chain.routers] == [StaticRouter, MXRouter]
    assert result_of(chain.route("u@example.test", ENV)).hops == (NextHop("127.0.0.1", 2526, 0),)


def test_a_third_party_router_is_loaded_with_its_options_and_key(plugin_dist: str) -> None:
    chain = build_router([RouteConfig("good", {"host": "127.0.0.7"}, "routes[0]")], contexts)
    router = chain.routers[0]
    assert type(router).__module__ == plugin_dist
    assert router.key == "routes[0]"  # type: ignore[attr-defined]
    assert result_of(chain.route("u@plugin.test", ENV)).hops == (NextHop("127.0.0.7", 2525),)


def test_unknown_type_names_the_key_and_the_known_types(plugin_dist: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_router(
            [
                RouteConfig("static", {"domains": ["*"], "hosts": ["h:25"]}, "routes[0]"),
                RouteConfig("satic", {}, "routes[1]"),
            ],
            contexts,
        )
    assert info.value.path == "relay.toml"
    assert info.value.key == "routes[1].type"
    assert "unknown router type 'satic'" in info.value.reason
    assert (
        "static" in info.value.reason and "good" in info.value.reason and "mx" in info.value.reason
    )


def test_an_object_that_is_not_an_irouter_is_refused_naming_type_and_entry_point(
    plugin_dist: str,
) -> None:
    with pytest.raises(ConfigError) as info:
        build_router([RouteConfig("notarouter", {}, "routes[3]")], contexts)
    assert info.value.key == "routes[3].type"
    assert "'notarouter'" in info.value.reason
    assert f"{plugin_dist}:NotARouter" in info.value.reason
    assert "does not provide IRouter" in info.value.reason


def test_a_factory_that_raises_is_a_config_error(plugin_dist: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_router([RouteConfig("failing", {}, "routes[0]")], contexts)
    assert info.value.key == "routes[0]"
    assert "cannot reach the license server" in info.value.reason


def test_a_plugins_own_option_errors_name_its_key(plugin_dist: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_router([RouteConfig("strict", {"color": "blue"}, "routes[4]")], contexts)
    assert info.value.key == "routes[4].color"
    assert info.value.reason == "unknown key"


def test_an_entry_point_that_does_not_import_is_a_config_error(plugin_dist: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_router([RouteConfig("missing", {}, "routes[0]")], contexts)
    assert info.value.key == "routes[0].type"
    assert "cannot load" in info.value.reason and "ModuleNotFoundError" in info.value.reason
