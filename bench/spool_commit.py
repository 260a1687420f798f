"""Group commit of the filesystem spool: durable commits per second as concurrency grows.

    .venv/bin/python bench/spool_commit.py [--messages 3000] [--size 1024] [--dir DIR]

``concurrency`` clients each store a message (open, write, commit) and start the next as soon as
its commit's Deferred fires — as SMTP sessions waiting for their 250 do. Prints commits/s, the
number of passes (batches of commits made durable together: each is answered to the reactor in
one ``callFromThread``, counted by the reactor handed to the spool), messages per pass, and the
commit latency percentiles. ``--dir`` picks the disk (default: a temp dir). Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from mailrelay.envelope import Envelope, Recipient  # noqa: E402
from mailrelay.queue.spool import FilesystemSpool  # noqa: E402

ENV = Envelope("sender@example.org", (Recipient("rcpt@example.test"),))


class CountingReactor:
    """The reactor, counting the calls the spool's threads hand to it (on the reactor thread)."""

    def __init__(self, reactor) -> None:  # type: ignore[no-untyped-def]
        self.reactor = reactor
        self.calls = 0

    def seconds(self) -> float:
        return self.reactor.seconds()

    def callFromThread(self, f, *args) -> None:  # type: ignore[no-untyped-def]  # noqa: N802
        self.reactor.callFromThread(self._counted, f, *args)

    def _counted(self, f, *args) -> None:  # type: ignore[no-untyped-def]
        self.calls += 1
        f(*args)


@defer.inlineCallbacks
def run(reactor, base: str, messages: int, size: int, concurrency: int):  # type: ignore[no-untyped-def]
    path = tempfile.mkdtemp(prefix="spool-", dir=base)
    counting = CountingReactor(reactor)
    spool = FilesystemSpool(path, counting)
    spool.start()
    yield spool.list_ids()
    body = b"Subject: bench\r\n\r\n" + b"x" * max(0, size - 20) + b"\r\n"
    latencies: list[float] = []
    left = [messages]

    @defer.inlineCallbacks
    def client():  # type: ignore[no-untyped-def]
        while left[0] > 0:
            left[0] -= 1
            w = spool.open(ENV)
            w.write(body)
            t0 = time.perf_counter()
            yield w.commit()
            latencies.append(time.perf_counter() - t0)

    passes0 = counting.calls
    started = time.perf_counter()
    yield defer.gatherResults([client() for _ in range(concurrency)])
    elapsed = time.perf_counter() - started
    passes = counting.calls - passes0
    yield spool.stop()
    shutil.rmtree(path, ignore_errors=True)
    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    print(
        f"{concurrency:>11} {messages / elapsed:>10,.0f} {passes:>8} {messages / passes:>10.1f} "
        f"{1000 * q[49]:>8.2f} {1000 * q[98]:>8.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 10, 50])
    args = parser.parse_args()
    base = args.dir or tempfile.mkdtemp(prefix="mailrelay-bench-commit-")
    print(
        f"{'concurrency':>11} {'commits/s':>10} {'passes':>8} {'msgs/pass':>10} "
        f"{'p50 ms':>8} {'p99 ms':>8}"
    )

    @defer.inlineCallbacks
    def all_runs(reactor):  # type: ignore[no-untyped-def]
        for c in args.concurrency:
            yield run(reactor, base, args.messages, args.size, c)

    try:
        task.react(all_runs)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
