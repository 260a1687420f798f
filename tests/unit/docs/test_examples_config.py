"""The shipped example configs are valid, and the one ``make run`` uses really starts a relay."""

from __future__ import annotations

import re
import shlex
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from mailrelay import config
from tests.support.peers import free_port, wait_listening

ROOT = Path(__file__).resolve().parents[3]
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


@contextmanager
def make_run(conf: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """``make run``'s command with ``conf``, in its directory (log: twistd.log there), listening on
    ``port`` (else the test fails with the log); stopped by SIGTERM, else SIGKILL, when the block ends."""
    log_path = conf.parent / "twistd.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [str(TWISTD), "-n", "--pidfile=", "mailrelay", "--config", str(conf)],
        cwd=conf.parent,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        try:
            wait_listening("127.0.0.1", port, timeout=20, proc=proc)
        except (RuntimeError, TimeoutError) as e:
            log.flush()
            pytest.fail(f"{e}\n{log_path.read_text(errors='replace')}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


@pytest.mark.integration
def test_make_run_config_starts(tmp_path: Path) -> None:
    """``make run``'s command with the example (on a free port, spool in a temp dir)
    answers EHLO, and SIGTERM stops it cleanly."""
    text = MAKE_RUN_CONFIG.read_text()
    port = free_port()
    spool = tmp_path / "spool"
    for old, new in [
        ("tcp:2525:interface=127.0.0.1", f"tcp:{port}:interface=127.0.0.1"),
        ('path = "var/spool"', f'path = "{spool}"'),
    ]:
        assert old in text, f"examples/mailrelay.toml no longer has {old!r}; update this test"
        text = text.replace(old, new)
    conf = tmp_path / "mailrelay.toml"
    conf.write_text(text)
    with make_run(conf, port) as proc:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            code, text_reply = client.ehlo("client.example.org")
            assert code == 250, text_reply
            lines = text_reply.decode().splitlines()
            assert lines[0].startswith("relay.example.test")
            assert {"PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"} <= {
                x.split()[0] for x in lines[1:]
            }
            assert client.noop()[0] == 250
        assert spool.is_dir()
        proc.send_signal(signal.SIGTERM)
        # twistd stops the reactor cleanly, then re-raises the signal so that its exit status tells
        # how it ended (twisted.scripts.twistd.runApp): -SIGTERM is the clean ending, like 0.
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    output = (tmp_path / "twistd.log").read_text(errors="replace")
    assert "Traceback" not in output, output
    assert "Main loop terminated." in output and "Server Shut Down." in output, output


def _recipe(doc: Path) -> str:
    """The swaks command of the local end-to-end recipe in ``doc``."""
    commands = re.findall(
        r"^\s*(swaks [^\n#]*--to you@demo\.test[^\n#]*?)\s*(?:#.*)?$", doc.read_text(), re.M
    )
    assert commands, f"{doc.name} lost its local recipe (swaks ... --to you@demo.test)"
    assert "var/mail/new" in doc.read_text(), f"{doc.name} no longer says where the message lands"
    return commands[0]


def test_readme_and_quickstart_give_the_same_recipe() -> None:
    assert _recipe(ROOT / "README.md") == _recipe(ROOT / "docs" / "quickstart.rst")


@pytest.mark.integration
def test_readme_recipe_lands_in_var_mail(tmp_path: Path) -> None:
    """The README's recipe as a new user runs it: ``make run``'s command with the example config (in
    a fresh directory, on a free port), the README's swaks command, and the message in var/mail/new."""
    port = free_port()
    text = MAKE_RUN_CONFIG.read_text()
    assert "tcp:2525:" in text
    conf = tmp_path / "mailrelay.toml"
    conf.write_text(text.replace("tcp:2525:", f"tcp:{port}:"))
    (tmp_path / "var").mkdir()  # as make run does
    with make_run(conf, port):
        command = _recipe(ROOT / "README.md").replace("127.0.0.1:2525", f"127.0.0.1:{port}")
        sent = subprocess.run(shlex.split(command), cwd=tmp_path, capture_output=True, timeout=30)
        assert sent.returncode == 0, sent.stdout.decode(errors="replace")
        new = tmp_path / "var" / "mail" / "new"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (new.is_dir() and any(new.iterdir())):
            time.sleep(0.05)
        files = list(new.iterdir()) if new.is_dir() else []
        assert len(files) == 1, (tmp_path / "twistd.log").read_text(errors="replace")
        message = files[0].read_bytes()
        assert b"Delivered-To: you@demo.test\n" in message
        assert b"X-Mailer: swaks" in message
    assert "Traceback" not in (tmp_path / "twistd.log").read_text(errors="replace")


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
