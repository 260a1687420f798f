"""SIGKILL at random (seeded) moments under sustained load, restarted each time on the same spool.

Every message that got its 250 must reach the sink; a message may arrive twice only if it was in
flight at a kill — that is, still in the spool when the process died (delivered, not yet removed).
The spool is read after each kill (the process is dead, so it is still) to know which those were.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from mailrelay.queue.spool import FilesystemSpool
from tests.relay import RelayProcess, Sender
from tests.reliability.helpers import message_ids, route_to

pytestmark = pytest.mark.integration

_MID = re.compile(rb"(?im)^message-id: (<[^>\r\n]+>)")


def spooled_ids(spool: Path) -> set[str]:
    """Message-IDs of the committed messages in a (dead) relay's spool."""
    out: set[str] = set()
    if not (spool / "queue").is_dir():
        return out
    reader = FilesystemSpool(str(spool), None)  # read only, as the CLI reads a stopped instance
    for queue_id in reader.scan_ids():
        try:
            with reader.open_body(queue_id) as f:
                m = _MID.search(f.read(8192))
        except KeyError:
            continue
        if m:
            out.add(m.group(1).decode())
    return out


@pytest.mark.parametrize(
    "kills, seed",
    [
        pytest.param(5, 10),
        pytest.param(50, 11, marks=pytest.mark.soak),
    ],
)
def test_sigkill_under_load_loses_nothing_and_duplicates_only_in_flight(sinks, kills, seed):
    rng = random.Random(seed)
    sink = sinks()
    relay = RelayProcess(route_to(sink.port, extra='[queue]\nretry_schedule = ["1s"]\n'))
    acked: list[str] = []
    tried: list[str] = []
    in_spool_at_kill: list[set[str]] = []
    try:
        for life in range(kills):
            relay.start()
            senders = [
                Sender(
                    relay.port,
                    f"l{life}s{i}",
                    acked,
                    tried,
                    per_session=4,
                    recipients=("r@example.test", "q@example.test"),
                    size=700,
                    pause=0.02,
                )
                for i in range(4)
            ]
            before = len(acked)
            for s in senders:
                s.start()
            deadline = time.monotonic() + 30  # under load, not before it: a few 250s first
            while len(acked) < before + 5 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.8))
            relay.kill()
            in_spool_at_kill.append(spooled_ids(relay.spool))
            for s in senders:
                s.stopping.set()
            for s in senders:
                s.join(15)
        relay.start()  # the last life delivers whatever the others left behind
        expected = set(acked)
        assert len(expected) >= 5 * kills, (
            f"only {len(expected)} messages accepted: too little load"
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            got = message_ids(sink)
            if expected <= set(got) and not FilesystemSpool(str(relay.spool), None).scan_ids():
                break
            time.sleep(0.2)
        time.sleep(0.5)
        got = message_ids(sink)
        pid = relay.proc.pid if relay.proc else None
        relay.stop()
    finally:
        relay.cleanup()
    missing = expected - set(got)
    twice = {m: n for m, n in got.items() if n > 1}
    unacked_delivered = set(got) - expected
    exposure: Counter[str] = Counter(m for snapshot in in_spool_at_kill for m in snapshot)
    print(
        f"\ncrash: {kills} SIGKILLs (seed {seed}), {len(tried)} sent, {len(expected)} got 250, "
        f"{sum(got.values())} deliveries at the sink for {len(got)} messages; lost {len(missing)}, "
        f"delivered twice {len(twice)} (in the spool at a kill: {len(exposure)}), "
        f"delivered without a 250 (killed between commit and reply) {len(unacked_delivered)}; "
        f"last pid {pid}"
    )
    assert not missing, f"lost {len(missing)} acknowledged messages, e.g. {sorted(missing)[:5]}"
    for mid, n in twice.items():
        # each extra copy needs a kill that found the message still spooled (in flight)
        assert n - 1 <= exposure[mid], (
            f"{mid} delivered {n} times, in the spool at {exposure[mid]} kills"
        )
    assert unacked_delivered <= set(tried), "the sink got messages nobody sent"
