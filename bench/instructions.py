"""Instructions per message of the whole relay, counted by callgrind: an A/B that noise cannot move.

    .venv/bin/python bench/instructions.py [--baseline REV] [--messages 1000] [--sessions 10]

Throughput on a shared two-core machine moves ±15% from run to run of the same code (see
docs/benchmarks.rst); instruction counts do not. The relay (twistd, the working tree's code, or
REV's checked out into a temp git worktree) runs under ``valgrind --tool=callgrind``, end to end:
smtp-source → relay → smtp-sink, one 1 KiB message per session, like ``bench/relay.py``'s e2e
scenario. Each tree is run twice, with a small and a large message count, and the difference
divided by the difference in messages is its cost per message: start-up and shutdown cancel out.
The trees run side by side (callgrind serialises a program's threads, so the count does not
depend on the machine's load). Prints instructions per message and the ratio; asserts nothing.

What it does not see: time spent waiting (a commit's latency, the GIL passed between threads).
A figure level with the baseline while ``bench/relay.py --baseline`` is lower points there.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _baseline import checkout  # noqa: E402
from _peers import (  # noqa: E402
    MAILRELAY_CONFIG,
    ROOT,
    Sink,
    binary,
    free_port,
    tree_env,
    wait_listening,
)


def count(
    tree: Path, messages: int, sessions: int, out: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start one counted relay life in the background: a child running ``one_life``."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--one-life", str(tree), str(messages), str(sessions), str(out)]
    )
    return child, out


def one_life(tree: Path, messages: int, sessions: int, out: Path) -> None:
    """Relay ``messages`` under callgrind, wait until the sink has them all, stop the relay."""
    sink = Sink()
    work = Path(tempfile.mkdtemp(prefix="bench-instructions-"))
    port = free_port()
    conf = work / "mailrelay.toml"
    conf.write_text(
        MAILRELAY_CONFIG.format(
            port=port, spool=work / "spool", nexthop=sink.port, retry="5s", workers=1
        )
    )
    twistd = Path(sys.executable).parent / "twistd"
    with open(work / "twistd.log", "wb") as log:
        relay = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
            + [str(twistd), "-n", "--pidfile=", "mailrelay", "--config", str(conf)],
            cwd=work,
            env=tree_env(tree),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_listening(port, timeout=600, proc=relay)
            source = binary("smtp-source") or "smtp-source"
            subprocess.run(
                [source, "-s", str(sessions), "-m", str(messages), "-l", "1024", "-N"]
                + ["-f", "sender@example.org", "-t", "rcpt@example.test", f"127.0.0.1:{port}"],
                check=True,
                capture_output=True,
            )
            deadline = time.monotonic() + 1800
            while sink.count() < messages and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            os.killpg(relay.pid, signal.SIGTERM)  # a clean stop: callgrind writes its counts
            relay.wait(timeout=600)
            sink.stop()


def total(out: Path) -> int:
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


def start_lives(
    tree: Path, small: int, large: int, sessions: int, out: Path
) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """The two lives of ``tree`` (``small`` and ``large`` messages), started now."""
    paths = [out / f"{n}.out" for n in (small, large)]
    out.mkdir()
    return [count(tree, n, sessions, p) for n, p in zip((small, large), paths, strict=True)]


def per_message(lives: list[tuple[subprocess.Popen[bytes], Path]], small: int, large: int) -> float:
    """Instructions per message: the two lives' difference over their difference in messages."""
    for proc, _ in lives:
        if proc.wait() != 0:
            raise RuntimeError("a counted relay life failed")
    return (total(lives[1][1]) - total(lives[0][1])) / (large - small)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", metavar="REV", help="also count commit REV, side by side")
    parser.add_argument("--messages", type=int, default=1000, help="the difference of the two")
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--one-life", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_life:
        tree, n, s, out = args.one_life
        one_life(Path(tree), int(n), int(s), Path(out))
        return
    small, large = 300, 300 + args.messages
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        out = Path(tmp)
        trees = [("working tree", ROOT)]
        with checkout(args.baseline) if args.baseline else _none() as base:
            if base is not None:
                trees.append((f"baseline {base[1]}", base[0]))
            started = [
                (name, start_lives(tree, small, large, args.sessions, out / str(i)))
                for i, (name, tree) in enumerate(trees)
            ]
            figures = [(name, per_message(lives, small, large)) for name, lives in started]
    for name, figure in figures:
        print(f"{name:24s} {figure / 1000:10,.1f} k instructions per message")
    if len(figures) == 2:
        print(f"ratio (working tree / baseline): {figures[0][1] / figures[1][1]:.3f}")


class _none:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    main()
