"""Outbound delivery throughput: SMTPDeliverer → smtp-sink, with and without the connection cache.

    .venv/bin/python bench/delivery.py [--messages 5000] [--concurrency 20] [--size 1024] [--runs 3]

One process, one destination, 1 KiB messages with one recipient each; ``concurrency`` deliveries
in flight at any time (as the queue manager would run them). The clock stops when every
``deliver()`` has returned (each one after the sink's 250 to the final dot). Alternates the two
modes run by run and prints the median msg/s of each, and this process's CPU time per message
(a figure a busy machine disturbs less than msg/s). Never asserts anything.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from bench._peers import Sink  # noqa: E402
from mailrelay.config import DeliveryConfig  # noqa: E402
from mailrelay.delivery import SMTPDeliverer  # noqa: E402
from mailrelay.envelope import Envelope, NextHop, Recipient, Route, TLSPolicy  # noqa: E402


def message(size: int) -> bytes:
    head = b"From: bench@example.org\r\nTo: rcpt@example.test\r\nSubject: bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    body = line * ((size - len(head)) // len(line) + 1)
    return head + body[: size - len(head) - 2] + b"\r\n"


async def run(
    reactor: object, port: int, n: int, concurrency: int, size: int, reuse: bool
) -> tuple[float, int, float]:
    """(msg/s, failures, CPU microseconds of this process per message)."""
    config = DeliveryConfig(connection_idle_time=2.0 if reuse else 0.0, connection_reuse_limit=1000)
    deliverer = SMTPDeliverer(reactor, config, "bench.mailrelay.test")
    route = Route((NextHop("127.0.0.1", port),), tls=TLSPolicy.NONE)
    env = Envelope("bench@example.org", (Recipient("rcpt@example.test"),))
    data = message(size)
    failures = 0
    remaining = iter(range(n))

    async def worker() -> None:
        nonlocal failures
        for _ in remaining:
            [(reply, _)] = await deliverer.deliver(
                env, env.recipients, route, lambda: io.BytesIO(data)
            )
            failures += not reply.is_success

    start, cpu = time.perf_counter(), time.process_time()
    await defer.gatherResults([defer.Deferred.fromCoroutine(worker()) for _ in range(concurrency)])
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    await deliverer.stop()
    return n / elapsed, failures, cpu / n * 1e6


async def main(reactor: object, args: argparse.Namespace) -> None:
    sink = Sink()
    try:
        await run(reactor, sink.port, 200, args.concurrency, args.size, True)  # warm-up
        figures: dict[str, list[float]] = {"reuse": [], "no reuse": []}
        cpu: dict[str, list[float]] = {"reuse": [], "no reuse": []}
        for i in range(args.runs):
            for mode in ("reuse", "no reuse") if i % 2 == 0 else ("no reuse", "reuse"):
                rate, failed, us = await run(
                    reactor, sink.port, args.messages, args.concurrency, args.size, mode == "reuse"
                )
                figures[mode].append(rate)
                cpu[mode].append(us)
                print(
                    f"run {i + 1} {mode:9s}: {rate:8.0f} msg/s, {us:6.0f} us CPU/msg "
                    f"({failed} failed)",
                    flush=True,
                )
        print(
            f"\n{args.messages} messages of {args.size} bytes, "
            f"{args.concurrency} concurrent deliveries, "
            f"one destination (smtp-sink), medians of {args.runs}:"
        )
        for mode, rates in figures.items():
            us = statistics.median(cpu[mode])
            print(
                f"  {mode:9s} {statistics.median(rates):8.0f} msg/s   (runs: "
                + " / ".join(f"{r:.0f}" for r in rates)
                + f"); {us:.0f} us CPU/msg = "
                f"{1e6 / us:.0f} msg/s per core of this process"
            )
    finally:
        sink.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3)
    arguments = p.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, arguments)))
