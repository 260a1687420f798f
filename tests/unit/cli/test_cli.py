"""The ``mailrelay`` command: check-config, and the queue commands against a stopped spool and
against a running queue over its control socket (the real console script, in a subprocess)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.python.failure import Failure

from mailrelay import config
from mailrelay.cli import check_config, render_config
from mailrelay.config import QueueConfig
from mailrelay.control.server import ControlServer, socket_path
from mailrelay.envelope import Envelope, Recipient, Reply
from mailrelay.queue.manager import QueueManager
from mailrelay.queue.spool import FilesystemSpool
from mailrelay.testing import FakeRouter, RecordingDeliverer, route_to

MAILRELAY = str(Path(sys.executable).with_name("mailrelay"))
LATER = Reply(451, "4.4.1", "mailbox busy")


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "mailrelay.toml"
    path.write_text(
        '[server]\nhostname = "cli.example.test"\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
        'local_domains = ["example.test"]\n'
        f'[spool]\npath = "{tmp_path / "spool"}"\n'
        '[queue]\nretry_schedule = ["1m", "10m"]\nmax_lifetime = "2d"\n'
        '[[routes]]\ntype = "static"\ndomains = ["example.test", ".example.test"]\n'
        'hosts = ["127.0.0.1:2526"]\n' + extra
    )
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MAILRELAY, *args], capture_output=True, text=True, timeout=60)


# -- check-config ------------------------------------------------------------------------------


def test_check_config_prints_the_effective_config_which_loads_back_the_same(tmp_path, capsys):
    path = write_config(tmp_path, '[metrics]\nlisten = "tcp:9125:interface=127.0.0.1"\n')
    assert check_config(str(path)) == 0
    printed = capsys.readouterr().out
    assert "[queue]\nretry_schedule = [60, 600]" in printed
    assert "max_lifetime = 172800" in printed
    original = config.load(str(path))
    again = config.loads(printed, str(path))
    assert again == original
    carried = config.loads('[[routes]]\ntype = "mx"\nbinarymime = true\n')
    assert config.loads(render_config(carried)) == carried  # a key of the route, not of its router


def test_check_config_changed_only_like_postconf_n(tmp_path):
    cfg = config.load(str(write_config(tmp_path)))
    text = render_config(cfg, only_changed=True)
    assert "max_lifetime = 172800" in text and "max_deliveries" not in text
    assert 'hostname = "cli.example.test"' in text


def test_check_config_changed_only_leaves_out_computed_and_restated_defaults(tmp_path):
    """``-n`` shows what differs from a file that sets nothing: not the hostname taken from the
    machine, nor a key set to its default value."""
    path = tmp_path / "defaults.toml"
    path.write_text(
        '[server]\nlisten = ["tcp:2525:interface=127.0.0.1"]\nmax_recipients = 100\n'
        '[spool]\npath = "var/spool"\n[[routes]]\ntype = "mx"\n'
    )
    text = render_config(config.load(str(path)), only_changed=True)
    assert "[server]" not in text and "[spool]" not in text and "hostname" not in text
    assert text.endswith('[[routes]]\ntype = "mx"\n')
    assert "hostname = " in render_config(config.load(str(path)))


def test_check_config_errors_name_the_key_and_exit_1(tmp_path):
    path = write_config(
        tmp_path, '[[routes]]\ntype = "static"\ndomains = ["*"]\nhosts = ["127.0.0.1:99999"]\n'
    )
    result = cli("check-config", str(path))
    assert result.returncode == 1
    assert "routes[1].hosts[0]" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "spool").exists(), "checking a config creates nothing"
    import io

    bad = tmp_path / "bad.toml"
    bad.write_text('[queue]\nretry_schedule = ["soon"]\n')
    out, err = io.StringIO(), io.StringIO()
    assert check_config(str(bad), out=out, err=err) == 1
    assert "queue.retry_schedule[0]" in err.getvalue() and out.getvalue() == ""


def test_check_config_says_a_file_without_routes_routes_by_mx(tmp_path):
    path = tmp_path / "mailrelay.toml"
    path.write_text(
        f'[server]\nhostname = "cli.example.test"\n[spool]\npath = "{tmp_path / "spool"}"\n'
    )
    result = cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert (
        "# no [[routes]] in the file: every recipient is routed by its domain's MX records"
        in result.stdout
    )
    assert '[[routes]]\ntype = "mx"\n' in result.stdout


# -- the queue of a stopped instance --------------------------------------------------------------


ENV = Envelope(
    "sender@example.org",
    (Recipient("a@example.test"), Recipient("b@other.test")),
    helo="client.example.org",
    client_address="127.0.0.1",
)


@defer.inlineCallbacks
def fill_spool(path: Path, n: int) -> list[str]:
    spool = FilesystemSpool(str(path), reactor)
    spool.start()
    ids = []
    try:
        for i in range(n):
            w = spool.open(ENV)
            w.write(f"Subject: message {i}\r\n\r\nbody {i}\r\n".encode())
            ids.append((yield w.commit()))
    finally:
        yield spool.stop()
    return ids


@pytest_twisted.inlineCallbacks
def test_queue_commands_on_a_stopped_instance_read_and_edit_the_spool(tmp_path):
    path = write_config(tmp_path)
    ids = yield fill_spool(tmp_path / "spool", 3)
    yield threads.deferToThread(stopped_instance_checks, path, tmp_path, ids)


def offline(*argv: str) -> tuple[int, str, str]:
    """Run a queue command in-process against the spool (no instance runs; everything is
    synchronous)."""
    import io

    from mailrelay.cli import _queue_command, build_parser
    from mailrelay.control.sources import CLIError, offline_spool

    args = build_parser().parse_args(["queue", *argv])
    out, err = io.StringIO(), io.StringIO()
    d = defer.maybeDeferred(lambda: offline_spool(str(config.load(args.config).spool.path)))
    d.addCallback(_queue_command, args, out)
    box: list = []
    d.addBoth(box.append)
    if isinstance(box[0], Failure):
        box[0].trap(KeyError, CLIError)
        return 1, out.getvalue(), str(box[0].value)
    return box[0], out.getvalue(), err.getvalue()


def stopped_instance_checks(path: Path, tmp_path: Path, ids: list[str]) -> None:
    # the real console script once, then the same code in-process (a subprocess costs a second)
    listed = cli("queue", "list", "--config", str(path))
    assert listed.returncode == 0, listed.stderr
    for qid in ids:
        assert qid in listed.stdout
    assert listed.stdout.count("a@example.test") == 3 and "in 3 Requests." in listed.stdout
    c = ("--config", str(path))

    code, shown, _ = offline("show", ids[1].lower(), *c)
    assert code == 0
    assert "Subject: message 1" in shown and "<sender@example.org>" in shown
    assert "helo=client.example.org" in shown

    code, summary, _ = offline("summary", *c)
    assert code == 0
    total = next(line for line in summary.splitlines() if "TOTAL" in line).split()
    assert total[1] == "6"  # six pending recipients
    assert any(line.split()[:2] == ["other.test", "3"] for line in summary.splitlines())

    assert offline("hold", ids[0], *c)[0] == 0
    assert f"{ids[0]}!" in offline("list", *c)[1]
    assert offline("release", ids[0], *c)[0] == 0
    assert f"{ids[0]}!" not in offline("list", *c)[1]
    assert offline("delete", ids[2], *c)[0] == 0
    assert not list((tmp_path / "spool" / "queue").glob(f"{ids[2]}.*"))
    assert offline("list", "--json", *c)[1].count('"queue_id"') == 2

    missing = cli("queue", "show", "0000000000AAAAAAAA", "--config", str(path))
    assert missing.returncode == 1 and "no such message" in missing.stderr
    code, _, err = offline("flush", *c)
    assert code == 1 and "not running" in err


# -- the queue of a running instance --------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_queue_commands_against_a_running_queue_over_the_control_socket(tmp_path):
    path = write_config(tmp_path)
    spool = FilesystemSpool(str(tmp_path / "spool"), reactor)
    deliverer = RecordingDeliverer(default=LATER)
    manager = QueueManager(
        spool,
        FakeRouter({"*": route_to("127.0.0.1", 2526)}),
        deliverer,
        reactor,
        QueueConfig(retry_schedule=(3600.0,)),
        "cli.example.test",
    )
    control = ControlServer(manager, spool, socket_path(str(tmp_path / "spool")), reactor)
    spool.start()
    yield manager.start()
    yield control.start()
    try:
        sock = socket_path(str(tmp_path / "spool"))
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / "spool").st_mode) == 0o700
        w = spool.open(ENV)
        w.write(b"Subject: live\r\n\r\nhello\r\n")
        qid = yield w.commit()
        while len(deliverer.calls) < 1:  # picked up at once, deferred (451)
            yield threads.deferToThread(lambda: None)

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return cli("queue", *args, "--config", str(path))

        listed = yield threads.deferToThread(run, "list")
        assert listed.returncode == 0, listed.stderr
        assert qid in listed.stdout and "(451 4.4.1 mailbox busy)" in listed.stdout

        shown = yield threads.deferToThread(run, "show", qid, "--json")
        assert '"attempts": 1' in shown.stdout and "Subject: live" in shown.stdout

        flushed = yield threads.deferToThread(run, "flush", qid)
        assert flushed.returncode == 0 and "flushed 1 message" in flushed.stdout
        for _ in range(200):
            if len(deliverer.calls) >= 2:
                break
            yield threads.deferToThread(lambda: None)
        assert len(deliverer.calls) == 2, "flush made the manager attempt it again now"

        held = yield threads.deferToThread(run, "hold", qid)
        assert held.returncode == 0
        assert (yield spool.load(qid)).held and qid not in manager.scheduled()
        refused = yield threads.deferToThread(run, "flush", qid)
        assert refused.returncode == 1 and "is held" in refused.stderr
        released = yield threads.deferToThread(run, "release", qid)
        assert released.returncode == 0 and not (yield spool.load(qid)).held

        deleted = yield threads.deferToThread(run, "delete", qid)
        assert deleted.returncode == 0
        assert (yield spool.list_ids()) == []
        assert qid not in manager.scheduled()
    finally:
        yield control.stop()
        yield manager.stop()
        yield spool.stop()
    assert not os.path.exists(sock)


def test_queue_command_with_a_missing_config_is_one_clear_line(tmp_path):
    result = cli("queue", "list", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 1
    assert (
        result.stderr.strip() == f"mailrelay: {tmp_path / 'nope.toml'}: No such file or directory"
    )
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nmax_recipients = 0\n[queue]\nmax_lifetime = "soon"\n')
    for command in (("queue", "list"), ("db", "upgrade")):
        result = cli(*command, "--config", str(bad))
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"mailrelay: {bad}: server.max_recipients: must be a whole number of at least 1, not 0",
            f"mailrelay: {bad}: queue.max_lifetime: 'soon' is not a duration such as 30s, 5m,"
            " 4h or 5d",
        ]


def test_control_protocol_pages_the_listing_and_summarises():
    """The responders alone, on the memory store: pages in id order, then the qshape-like
    summary."""
    from twisted.internet.task import Clock

    from mailrelay.control.server import ControlProtocol
    from mailrelay.testing import MemoryQueueStore
    from tests.support.routing.helpers import result_of

    clock = Clock()
    clock.advance(1_700_000_000)
    store = MemoryQueueStore(clock)
    ids = []
    for i in range(5):
        ids.append(store.inject(ENV, b"Subject: x\r\n\r\n" + b"y" * i))
        clock.advance(600)
    manager = QueueManager(
        store, FakeRouter({}), RecordingDeliverer(), clock, QueueConfig(), "h.test"
    )
    proto = ControlProtocol(manager, store, clock)
    first = result_of(proto.list_queue(limit=2))
    assert [m["queue_id"] for m in first["messages"]] == ids[:2] and first["more"]
    second = result_of(proto.list_queue(limit=2, after=ids[1]))
    assert [m["queue_id"] for m in second["messages"]] == ids[2:4] and second["more"]
    last = result_of(proto.list_queue(limit=2, after=ids[3]))
    assert [m["queue_id"] for m in last["messages"]] == ids[4:] and not last["more"]
    assert last["messages"][0]["size"] == len(b"Subject: x\r\n\r\n") + 4
    s = result_of(proto.summary())["summary"]
    assert s["messages"] == 5 and sum(s["total"]) == 10
    # ages 10 min (<20m), 20 and 30 (<40m), 40 and 50 (<80m); two pending recipients each
    assert s["total"][:5] == [0, 0, 2, 4, 4]
    assert dict((d, sum(c)) for d, c in s["rows"]) == {"example.test": 5, "other.test": 5}


@pytest.mark.parametrize("n, noun", [(0, "messages"), (1, "message"), (2, "messages")])
def test_summary_says_one_message_and_one_domain_in_the_singular(n, noun):
    import io

    from mailrelay.cli import print_summary

    out = io.StringIO()
    print_summary(
        {"buckets": ["5m"], "total": [n], "rows": [], "more_domains": n, "messages": n, "held": 0},
        out,
    )
    assert out.getvalue().splitlines()[-1] == f"{n} {noun}, 0 held"
    assert (f"(and {n} more {'domain' if n == 1 else 'domains'})" in out.getvalue()) == (n > 0)


def _main_modules() -> list[str]:
    """Every module of the package that runs as ``python -m`` (has a ``__main__`` block)."""
    root = Path(__file__).resolve().parents[3]
    return sorted(
        ".".join(p.relative_to(root).with_suffix("").parts)
        for p in (root / "mailrelay").rglob("*.py")
        if 'if __name__ == "__main__":' in p.read_text()
    )


def test_the_main_modules_are_found():
    assert {"mailrelay.cli", "mailrelay.smtp.auth", "mailrelay.workers.worker"} <= set(
        _main_modules()
    )


@pytest.mark.parametrize("module", _main_modules())
def test_every_python_m_entry_point_prints_help(module):
    """``python -m <module> --help`` prints a usage text and exits 0: no traceback, no prompt."""
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "n, text", [(1, "queue: recovered 1 message"), (2, "queue: recovered 2 messages")]
)
def test_log_lines_about_counts_agree_with_their_nouns(n, text):
    """The lines an operator reads at start-up and after ``mailrelay queue flush`` count in words
    that agree: ``1 message``."""
    from twisted.internet.task import Clock
    from twisted.logger import formatEvent, globalLogPublisher

    from mailrelay.control.server import ControlProtocol
    from mailrelay.testing import MemoryQueueStore
    from tests.support.routing.helpers import result_of

    clock = Clock()
    store = MemoryQueueStore(clock)
    for _ in range(n):
        store.inject(ENV, b"Subject: x\r\n\r\ny\r\n")
    manager = QueueManager(
        store, FakeRouter({}), RecordingDeliverer([None] * (2 * n)), clock, QueueConfig(), "h.test"
    )
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        result_of(manager.start())
        result_of(ControlProtocol(manager, store, clock).flush())
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [formatEvent(e) for e in events]
    assert text in lines
    assert any(
        line.startswith("control: flush all (")
        and line.endswith(("(0 messages)", "(1 message)", "(2 messages)"))
        for line in lines
    ), lines
    assert not any(" 1 messages" in line for line in lines), lines


def test_check_config_runs_without_the_test_fakes(tmp_path):
    """The product never imports ``mailrelay.testing``: check-config validates without a store."""
    path = write_config(tmp_path, "")
    code = (
        "import sys\n"
        "from mailrelay.cli import main\n"
        f"assert main(['check-config', {str(path)!r}]) == 0\n"
        "assert 'mailrelay.testing' not in sys.modules, 'mailrelay.testing was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
