"""The shipped example configs are valid and say what they do; the README and the quickstart give
the same recipe. (Running them: tests/integration/docs/test_examples_run.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from mailrelay import config
from tests.support.docs import MAKE_RUN_CONFIG, ROOT, recipe

EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))


def test_there_are_examples() -> None:
    assert MAKE_RUN_CONFIG in EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads_and_its_routers_build(path: Path) -> None:
    """Each example passes the config loader and each of its ``[[routes]]`` builds a router, as at
    start-up (router options are validated by the router factories, not by config.load)."""
    from mailrelay.routing.context import RouterContext
    from mailrelay.routing.plugins import build_router

    cfg = config.load(str(path))
    assert cfg.routes, f"{path.name} routes nothing"
    build_router(cfg.routes, lambda key: RouterContext(reactor=Clock(), source=str(path), key=key))


def _header(path: Path) -> str:
    """The comment block an example starts with: what it says it does."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    return "\n".join(header)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_header_says_mx_only_when_it_routes_by_mx(path: Path) -> None:
    uses_mx = any(r.type == "mx" for r in config.load(str(path)).routes)
    assert bool(re.search(r"\bMX\b", _header(path))) == uses_mx, _header(path)


def test_smarthost_example_routes_as_its_comment_says() -> None:
    from mailrelay.envelope import Envelope
    from mailrelay.routing.context import RouterContext
    from mailrelay.routing.plugins import build_router
    from tests.support.routing.helpers import result_of

    path = ROOT / "examples" / "smarthost.toml"
    router = build_router(
        config.load(str(path)).routes, lambda key: RouterContext(reactor=Clock(), key=key)
    )
    header = _header(path)
    for address, hops in [
        ("a@example.test", ["127.0.0.1:2526", "::1:2526"]),
        ("a@sub.example.test", ["127.0.0.1:2526", "::1:2526"]),
        ("a@example.net", ["127.0.0.1:2527"]),
    ]:
        route = result_of(router.route(address, Envelope("s@example.org", ())))
        assert [f"{h.host}:{h.port}" for h in route.hops] == hops
    assert "127.0.0.1:2527" in header and "127.0.0.1:2526" in header and "[::1]:2526" in header
    assert "example.test and its subdomains" in header


def test_make_run_config_is_the_documented_one() -> None:
    """What README/quickstart promise for ``make run``: 127.0.0.1:2525, spool under var/, the demo
    domain into var/mail, the rest by MX."""
    cfg = config.load(str(MAKE_RUN_CONFIG))
    assert cfg.server.listen == ("tcp:2525:interface=127.0.0.1",)
    assert cfg.spool.path.startswith("var/")
    assert [r.type for r in cfg.routes] == ["static", "mx"]
    assert cfg.routes[0].options == {"domains": ["demo.test"], "maildir": "var/mail"}
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^CONFIG \?= examples/mailrelay\.toml$", makefile, re.M)
    assert "twistd -n --pidfile= mailrelay --config $(CONFIG)" in makefile


def test_readme_and_quickstart_give_the_same_recipe() -> None:
    assert recipe(ROOT / "README.md") == recipe(ROOT / "docs" / "quickstart.rst")


def test_readme_config_example_loads_and_builds() -> None:
    """The config shown in README.md is a working one."""
    from mailrelay.routing.context import RouterContext
    from mailrelay.routing.plugins import build_router

    blocks = re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README.md lost its config example"
    for block in blocks:
        cfg = config.loads(block, "README.md")
        build_router(
            cfg.routes, lambda key: RouterContext(reactor=Clock(), source="README.md", key=key)
        )


def test_readme_names_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert "examples/mailrelay.toml" in readme
