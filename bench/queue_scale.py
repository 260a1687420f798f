"""The queue at scale: start-up recovery of a big spool, its memory, one scheduling event's cost.

    .venv/bin/python bench/queue_scale.py [--messages 100000] [--keep DIR]

1. Writes ``--messages`` queued messages (1 KiB, two recipients, one already delivered, all due in
   an hour) straight into a fresh filesystem spool in the on-disk format (no fsync: setup only):
   ``--layout files``, one file each, or ``segments``, packs of 20 (messages that arrived
   together) appended to segments of up to 4 MiB.
2. Starts a ``FilesystemSpool`` and a ``QueueManager`` on the real reactor and times ``start()``
   until every message is loaded and scheduled; prints the RSS before and after.
3. On a ``task.Clock``, measures the cost per event of scheduling and of firing one message with n
   already scheduled, for n = 1,000 … 100,000: it should grow no faster than log n.

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from mailrelay.config import QueueConfig  # noqa: E402
from mailrelay.envelope import Envelope, Recipient, RecipientState, RecipientStatus, Reply  # noqa: E402
from mailrelay.queue.manager import QueueManager  # noqa: E402
from mailrelay.queue.spool import FilesystemSpool  # noqa: E402
from mailrelay.queue.spool.format import SEGMENT, build_pack, chunk, trailer  # noqa: E402
from mailrelay.queue.store import QueueIdGenerator, message_to_dict, new_message  # noqa: E402
from mailrelay.queue.timetable import Timetable  # noqa: E402
from mailrelay.testing import FakeRouter, RecordingDeliverer, route_to  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fill(path: str, n: int, now: float, layout: str = "files") -> None:
    clock = Clock()
    clock.advance(now - 86400)
    ids = QueueIdGenerator(clock)
    queue_dir = os.path.join(path, "queue")
    os.makedirs(queue_dir, exist_ok=True)
    os.makedirs(os.path.join(path, "tmp"), exist_ok=True)
    body = b"Subject: bench\r\n\r\n" + b"x" * 1000 + b"\r\n"
    records: list[tuple[str, bytes, bytes]] = []
    segment = None
    for i in range(n):
        clock.advance(0.5)
        qid = ids()
        env = Envelope(
            "sender@example.org",
            (Recipient(f"a{i}@example.test"), Recipient(f"b{i}@dest{i % 50}.test")),
            helo="client.example.org",
            client_address="127.0.0.1",
            received_at=clock.seconds(),
        )
        m = new_message(qid, env)
        statuses = (
            RecipientStatus(
                env.recipients[0], RecipientState.DELIVERED, 1, Reply(250, "2.0.0", "ok")
            ),
            RecipientStatus(
                env.recipients[1], RecipientState.PENDING, 1, Reply(451, "4.4.1", "busy")
            ),
        )
        import attrs

        m = attrs.evolve(m, statuses=statuses, attempts=1, next_attempt=now + 3600 + i * 0.01)
        envelope = json.dumps(message_to_dict(m), separators=(",", ":")).encode()
        if layout == "files":
            with open(os.path.join(queue_dir, qid), "wb") as f:
                f.write(body + trailer(len(body), envelope))
            continue
        records.append((qid, body, envelope))
        if len(records) == 20 or i == n - 1:
            if segment is None or segment.tell() > 4 * 2**20:
                if segment is not None:
                    segment.close()
                segment = open(os.path.join(queue_dir, records[0][0] + SEGMENT), "wb")  # noqa: SIM115
            segment.write(chunk(*build_pack(records)))
            records = []
    if segment is not None:
        segment.close()


@defer.inlineCallbacks
def recovery(reactor, path: str, n: int):  # type: ignore[no-untyped-def]
    gc.collect()
    before = rss_mib()
    spool = FilesystemSpool(path, reactor)
    manager = QueueManager(
        spool,
        FakeRouter({"*": route_to("127.0.0.1", 9)}),
        RecordingDeliverer(),
        reactor,
        QueueConfig(),
        "bench.example.test",
    )
    started = time.perf_counter()
    spool.start()
    found = yield manager.start()
    elapsed = time.perf_counter() - started
    gc.collect()
    after = rss_mib()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"recovery: {found} messages loaded and scheduled in {elapsed:.2f} s "
        f"({found / elapsed:,.0f} msg/s); scheduled={len(manager.scheduled())}"
    )
    print(
        f"memory:   RSS {before:.0f} MiB before, {after:.0f} MiB after "
        f"(+{after - before:.0f} MiB), "
        f"peak {peak:.0f} MiB"
    )
    yield manager.stop()
    yield spool.stop()


def scheduling_cost(sizes: list[int], events: int = 20000) -> None:
    rng = random.Random(1)
    print("scheduling cost per event with n messages already scheduled:")
    for n in sizes:
        clock = Clock()
        clock.advance(1_000_000)
        fired: list[str] = []
        timetable = Timetable(clock, fired.extend)  # scheduling only: no store, no attempts
        timetable.start()
        for i in range(n):
            timetable.set(f"base{i}", 1_000_000 + 10_000 + rng.random() * 100_000)
        ids = [f"ev{i}" for i in range(events)]
        times = [1_000_000 + rng.random() * 5_000 for _ in range(events)]
        t0 = time.perf_counter()
        for qid, at in zip(ids, times, strict=True):
            timetable.set(qid, at)
        t1 = time.perf_counter()
        clock.advance(5_001)  # fires exactly the `events` new ones
        t2 = time.perf_counter()
        assert len(fired) == events
        print(
            f"  n={n:>7,}: schedule {1e6 * (t1 - t0) / events:5.2f} µs, "
            f"fire {1e6 * (t2 - t1) / events:5.2f} µs"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--layout", choices=("files", "segments"), default="files")
    parser.add_argument(
        "--keep", help="build the spool in this directory (or reuse the one there) and keep it"
    )
    args = parser.parse_args()
    path = args.keep or tempfile.mkdtemp(prefix="mailrelay-bench-queue-")
    try:
        if os.path.isdir(os.path.join(path, "queue")) and os.listdir(os.path.join(path, "queue")):
            print(f"setup:    reusing the spool in {path}")
        else:
            t0 = time.perf_counter()
            fill(path, args.messages, time.time(), args.layout)
            print(
                f"setup:    wrote {args.messages:,} messages in "
                f"{time.perf_counter() - t0:.1f} s to {path}"
            )
        task.react(lambda reactor: recovery(reactor, path, args.messages))
    except SystemExit:
        pass
    finally:
        scheduling_cost([1_000, 10_000, 100_000])
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
