"""The shipped example configs are valid, and the one ``make run`` uses really starts a relay."""

from __future__ import annotations

import re
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from mailrelay import config
from tests.peers import free_port, wait_listening

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
MAKE_RUN_CONFIG = ROOT / "examples" / "mailrelay.toml"
TWISTD = Path(sys.executable).parent / "twistd"


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


def test_make_run_config_is_the_documented_one() -> None:
    """What README/quickstart promise for ``make run``: 127.0.0.1:2525, spool under var/, MX."""
    cfg = config.load(str(MAKE_RUN_CONFIG))
    assert cfg.server.listen == ("tcp:2525:interface=127.0.0.1",)
    assert cfg.spool.path.startswith("var/")
    assert [r.type for r in cfg.routes] == ["mx"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^CONFIG \?= examples/mailrelay\.toml$", makefile, re.M)
    assert "twistd -n --pidfile= mailrelay --config $(CONFIG)" in makefile


@pytest.mark.integration
def test_make_run_config_starts(tmp_path: Path) -> None:
    """``twistd -n mailrelay --config`` with the example (on a free port, spool in a temp dir)
    answers EHLO, and SIGTERM stops it cleanly."""
    text = MAKE_RUN_CONFIG.read_text()
    port = free_port()
    spool = tmp_path / "spool"
    for old, new in [("tcp:2525:interface=127.0.0.1", f"tcp:{port}:interface=127.0.0.1"),
                     ('path = "var/spool"', f'path = "{spool}"')]:
        assert old in text, f"examples/mailrelay.toml no longer has {old!r}; update this test"
        text = text.replace(old, new)
    conf = tmp_path / "mailrelay.toml"
    conf.write_text(text)
    log = open(tmp_path / "twistd.log", "wb")
    proc = subprocess.Popen([str(TWISTD), "-n", "mailrelay", "--config", str(conf)], cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        try:
            wait_listening("127.0.0.1", port, timeout=20, proc=proc)
        except (RuntimeError, TimeoutError) as e:
            log.flush()
            pytest.fail(f"{e}\n{(tmp_path / 'twistd.log').read_text(errors='replace')}")
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            code, text_reply = client.ehlo("client.example.org")
            assert code == 250, text_reply
            lines = text_reply.decode().splitlines()
            assert lines[0].startswith("relay.example.test")
            assert {"PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"} <= {x.split()[0] for x in lines[1:]}
            assert client.noop()[0] == 250
        assert spool.is_dir()
        proc.send_signal(signal.SIGTERM)
        # twistd stops the reactor cleanly, then re-raises the signal so that its exit status tells
        # how it ended (twisted.scripts.twistd.runApp): -SIGTERM is the clean ending, like 0.
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    output = (tmp_path / "twistd.log").read_text(errors="replace")
    assert "Traceback" not in output, output
    assert "Main loop terminated." in output and "Server Shut Down." in output, output


def test_readme_config_example_loads_and_builds() -> None:
    """The config shown in README.md is a working one."""
    from mailrelay.routing.context import RouterContext
    from mailrelay.routing.plugins import build_router

    blocks = re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README.md lost its config example"
    for block in blocks:
        cfg = config.loads(block, "README.md")
        build_router(cfg.routes, lambda key: RouterContext(reactor=Clock(), source="README.md", key=key))


def test_readme_names_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert "examples/mailrelay.toml" in readme
