"""docs/routing.rst: its TOML examples load and build their routers; its code is the example's."""

from __future__ import annotations

import re
from pathlib import Path

from twisted.internet.task import Clock

from mailrelay.config import loads
from mailrelay.routing.context import RouterContext
from mailrelay.routing.plugins import build_router, router_types

ROOT = Path(__file__).resolve().parents[3]
PAGE = ROOT / "docs" / "routing.rst"


def toml_blocks() -> list[str]:
    return [
        "\n".join(line[3:] for line in m.group(1).splitlines())
        for m in re.finditer(
            r"^\.\. code-block:: toml\n\n((?:(?:   .*)?\n)+)", PAGE.read_text(), re.M
        )
    ]


def test_toml_examples_load_and_their_built_in_routers_build() -> None:
    blocks = toml_blocks()
    assert len(blocks) >= 2
    built = 0
    for block in blocks:
        config = loads(block, "docs/routing.rst")
        routes = [r for r in config.routes if r.type in router_types()]
        chain = build_router(
            routes, lambda key: RouterContext(Clock(), threadpool=object(), key=key)
        )
        built += len(chain.routers)
    assert built >= 4


def test_included_code_exists() -> None:
    included = re.findall(r"^\.\. literalinclude:: (\S+)", PAGE.read_text(), re.M)
    assert "../examples/router-plugin/src/mailrelay_transport_map/__init__.py" in included
    for path in included:
        assert (PAGE.parent / path).is_file(), path


def test_every_option_of_the_built_in_routers_is_documented() -> None:
    """Options read by the factories (found in their source) appear in the guide."""
    text = PAGE.read_text()
    for module in ("static", "mx", "ldap"):
        source = (ROOT / "mailrelay" / "routing" / f"{module}.py").read_text()
        options = set(re.findall(r"""\bs\.get(?:_list)?\("([a-z_]+)\"""", source))
        options |= {"auth"} if module == "static" else set()
        assert options, module
        for option in options:
            assert f"``{option}``" in text, f"{module}: option {option} is not in docs/routing.rst"
