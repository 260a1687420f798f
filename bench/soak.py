"""Long fuzz runs of the SMTP input side, beyond what ``make test`` can afford.

    .venv/bin/python bench/soak.py                       # 10^6 parser cases, 20,000 whole sessions
    .venv/bin/python bench/soak.py --cases 10000000 --sessions 200000 --seed 7

1. The sans-I/O parser fuzz of tests/support/reliability/fuzzing.py (same invariants: no hang,
bounded
   buffer, no end of data without a real CRLF "." CRLF, no bare CR/LF in text, no relay trick).
2. Whole sessions: the same random streams through the real server protocol and session in memory
   (relay-access policy, a recording sink), cut at random points; no failure may be logged, the
   input buffer stays bounded, every writer is committed or aborted, every session ends.

Prints the seed (a failure is replayed with ``--seed``), cases per second and peak traced memory.
The soak-marked tests (``make soak``) run the fixed-seed variants; this script is for longer runs.
Exit status 1 on the first broken invariant.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.logger import globalLogPublisher  # noqa: E402

from mailrelay.config import ServerConfig  # noqa: E402
from tests.support.reliability.fuzzing import FuzzFailure, fuzz, random_stream  # noqa: E402
from tests.support.smtp.fakes import Conn  # noqa: E402

CONFIG = ServerConfig(
    hostname="mx.example.test",
    local_domains=("example.test",),
    max_message_size=5000,
    trusted_networks=(ipaddress.ip_network("192.0.2.0/24"),),
)


def sessions(n: int, seed: int, measure: int = 2000) -> tuple[int, float]:
    """``n`` whole sessions of random input; returns (messages stored, peak traced KiB)."""
    rng = random.Random(seed)
    failures: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("log_failure") is not None:
            failures.append(event)

    globalLogPublisher.addObserver(observer)
    stored, peak = 0, 0.0
    try:
        for i in range(n):
            if i == 0:
                tracemalloc.start()
            data = b"EHLO fuzz.example\r\n" + random_stream(rng)
            if rng.random() < 0.5:  # half start with a valid transaction, so text reaches the sink
                data = (
                    b"EHLO fuzz.example\r\nMAIL FROM:<a@example.org>\r\n"
                    b"RCPT TO:<u@example.test>\r\n"
                    b"DATA\r\n" + data[19:] + rng.choice([b"", b"\r\n.\r\n"])
                )
            c = Conn(config=CONFIG)
            pos = 0
            while pos < len(data) and not c.closed:
                step = rng.choice([1, 7, 64, 512, 4096])
                c.send(data[pos : pos + step])
                pos += step
                if c.server.session.parser.buffered > 1100 + step:
                    raise FuzzFailure(f"session {i}: buffer {c.server.session.parser.buffered}")
            c.clock.advance(700)  # the idle/DATA timeout ends every session still open
            if not c.closed:
                raise FuzzFailure(f"session {i} still open after its timeout")
            c.proto.connectionLost(None)
            if not all(w.committed or w.aborted for w in c.sink.writers):
                raise FuzzFailure(f"session {i}: a writer neither committed nor aborted")
            stored += len(c.sink.committed)
            if failures:
                raise FuzzFailure(
                    f"session {i}: logged failure {failures[0].get('log_failure')}\ninput {data!r}"
                )
            if i == measure - 1 or (i == n - 1 and tracemalloc.is_tracing()):
                peak = tracemalloc.get_traced_memory()[1] / 1024
                tracemalloc.stop()
    finally:
        globalLogPublisher.removeObserver(observer)
        if tracemalloc.is_tracing():
            tracemalloc.stop()
    return stored, peak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=1_000_000, help="parser fuzz cases (default 10^6)")
    ap.add_argument(
        "--sessions", type=int, default=20_000, help="whole in-memory sessions (default 20,000)"
    )
    ap.add_argument(
        "--seed", type=int, default=None, help="replay a run (default: a fresh random seed)"
    )
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    print(f"soak seed {seed}", flush=True)
    try:
        t = time.monotonic()
        stats = fuzz(args.cases, seed, measure_memory=min(args.cases, 2_000))
        dt = time.monotonic() - t
        print(
            f"parser: {stats.cases} cases, {stats.octets / 1e6:.0f} MB in {dt:.0f} s "
            f"({stats.cases / dt:,.0f} cases/s); {stats.messages} messages, "
            f"{stats.rejected} rejected, {stats.paths_ok}/{stats.paths_refused} paths "
            f"parsed/refused; peak {stats.peak_kib:.0f} KiB",
            flush=True,
        )
        t = time.monotonic()
        stored, peak = sessions(args.sessions, seed)
        dt = time.monotonic() - t
        print(
            f"sessions: {args.sessions} in {dt:.0f} s ({args.sessions / dt:,.0f}/s), "
            f"{stored} messages stored; "
            f"peak {peak:.0f} KiB"
        )
    except FuzzFailure as e:
        print(f"FAILED (seed {seed}): {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
