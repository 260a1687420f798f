"""examples/router-plugin, a complete third-party router distribution, installed and used for real.

It is pip-installed (built from a copy, so the checkout stays clean) into a target directory that
goes on ``sys.path``/``PYTHONPATH``: the development venv is left as it was.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from mailrelay.config import loads
from mailrelay.envelope import Envelope, NextHop
from mailrelay.errors import PermanentFailure
from mailrelay.routing.context import RouterContext
from mailrelay.routing.plugins import build_router, router_types
from tests.support.peers import SMTPSink
from tests.support.relay import RelayProcess
from tests.support.routing.helpers import result_of

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "router-plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The example installed with pip into a directory of its own; yields that directory."""
    tmp = tmp_path_factory.mktemp("plugin")
    src = tmp / "src"
    shutil.copytree(
        EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    target = tmp / "site"
    # with setuptools and wheel at hand (the test extra), build without fetching them again
    isolation = ["--no-build-isolation"] if _have_build_tools() else []
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            *isolation,
            "--target",
            str(target),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    sys.path.insert(0, str(target))
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        for name in [m for m in sys.modules if m.startswith("mailrelay_transport_map")]:
            del sys.modules[name]


def _have_build_tools() -> bool:
    if importlib.util.find_spec("wheel") is None or importlib.util.find_spec("setuptools") is None:
        return False
    major = importlib.metadata.version("setuptools").split(".")[0]
    return major.isdigit() and int(major) >= 64  # the example's pyproject.toml asks for >= 64


def write_table(directory: Path, text: str) -> Path:
    path = directory / "transport.txt"
    path.write_text(text)
    return path


def test_installed_plugin_is_found_by_its_entry_point(installed: Path, tmp_path: Path) -> None:
    assert (
        router_types()["transport_map"].value
        == "mailrelay_transport_map:TransportMapRouter.from_options"
    )
    table = write_table(tmp_path, "example.test 127.0.0.1:2600\nold.test error:550 5.1.6 moved\n")
    config = loads(f'[[routes]]\ntype = "transport_map"\npath = "{table}"\n', "relay.toml")
    chain = build_router(
        config.routes, lambda key: RouterContext(Clock(), source="relay.toml", key=key)
    )
    env = Envelope("s@example.org", ())
    assert result_of(chain.route("u@example.test", env)).hops == (NextHop("127.0.0.1", 2600, 0),)
    with pytest.raises(PermanentFailure):
        result_of(chain.route("u@old.test", env))


def _with(directory: Path) -> str:
    """``PYTHONPATH`` with ``directory`` first, keeping what was there (a checkout under test)."""
    return os.pathsep.join(p for p in (str(directory), os.environ.get("PYTHONPATH", "")) if p)


def test_the_plugins_own_tests_pass(installed: Path) -> None:
    env = {**os.environ, "PYTHONPATH": _with(installed)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(EXAMPLE),
            str(EXAMPLE / "tests"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=EXAMPLE,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 passed" in out.stdout


def test_a_real_relay_routes_through_the_plugin(
    installed: Path, tmp_path: Path, smtp_sink: SMTPSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = write_table(
        tmp_path,
        f"example.test 127.0.0.1:{smtp_sink.port}\n"
        "old.example.test error:550 5.1.6 moved to example.test\n",
    )
    monkeypatch.setenv("PYTHONPATH", _with(installed))  # the twistd child finds the plugin there
    relay = RelayProcess(
        f'[server]\nlocal_domains = ["example.test", "old.example.test"]\n\n'
        f'[[routes]]\ntype = "transport_map"\npath = "{table}"\n'
    )
    try:
        relay.start()
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            client.ehlo("client.example.org")
            client.mail("s@example.org")
            code, text = client.rcpt("u@old.example.test")
            assert code == 550 and b"moved to example.test" in text  # the plugin's refusal, at RCPT
            assert client.rcpt("u@example.test")[0] == 250
            assert client.data(b"Subject: plugin\r\n\r\nrouted by a plugin\r\n")[0] == 250
        smtp_sink.wait_for(1)
        (transaction,) = smtp_sink.transactions()
        assert transaction.recipients == ["u@example.test"]
        assert transaction.data.endswith(b"\r\nrouted by a plugin\r\n")
    finally:
        relay.cleanup()
