"""The public surface (``mailrelay`` and ``mailrelay.testing``) holds what plugins, embedders and
their tests need, and the examples use nothing else."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet.task import Clock

import mailrelay
from mailrelay.testing import router_context

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "examples").rglob("*.py"))


def test_every_public_name_resolves():
    for name in mailrelay.__all__:
        assert getattr(mailrelay, name) is not None, name


def test_a_plugin_needs_only_the_package():
    from mailrelay.config import parse_hostport
    from mailrelay.routing.context import RouterContext

    assert mailrelay.RouterContext is RouterContext
    assert mailrelay.parse_hostport is parse_hostport
    assert mailrelay.parse_hostport("[::1]:2526") == ("::1", 2526)


def test_importing_the_package_stays_light():
    """``RouterContext`` and ``MailRelayService`` are imported on first use: ``import mailrelay``
    (the CLI, a plugin's import) does not pull in every router and its libraries."""
    code = (
        "import sys, mailrelay; print(sorted(m for m in ('mailrelay.routing', 'mailrelay.service') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT / "examples")))
def test_examples_import_only_the_public_surface(path: Path):
    """What the examples show is what users copy: ``from mailrelay import ...`` and
    ``mailrelay.testing``, never a module that may change (``mailrelay.routing.context``)."""
    private = []
    for node in ast.walk(ast.parse(path.read_text())):
        modules = (
            [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else []
        )
        private += [m for m in modules if m.startswith("mailrelay.") and m != "mailrelay.testing"]
    assert private == []


def test_router_context_is_what_a_factory_gets_at_start_up():
    from mailrelay.errors import ConfigError
    from mailrelay.routing.static import StaticRouter

    context = router_context(source="relay.toml", key="routes[3]")
    assert isinstance(context, mailrelay.RouterContext) and isinstance(context.reactor, Clock)
    assert context.random.random() == router_context().random.random()  # seeded
    with pytest.raises(ConfigError) as info:
        StaticRouter.from_options({"domains": ["a.test"], "hosts": ["h:0"]}, context)
    assert (info.value.path, info.value.key) == ("relay.toml", "routes[3].hosts[0]")
    clock = Clock()
    assert router_context(clock).reactor is clock
