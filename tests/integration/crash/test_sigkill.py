"""Crash safety: a real relay SIGKILLed at random (seeded) moments while clients send, restarted
each time on the same spool. Every message that got its 250 must reach the sink.

Two campaigns: many short lives with a few senders (``..._at_random_moments...``), and lives
under sustained load where the spool is read after each kill (the process is dead, so it is
still) to know which messages were in flight: a message may arrive twice only if it was still in
the spool when the process died (delivered, not yet removed).
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from mailrelay.queue.spool import FilesystemSpool
from tests.support.relay import RelayProcess, Sender
from tests.support.reliability.helpers import message_ids, route_to

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


@pytest.mark.parametrize("kills", [4, pytest.param(30, marks=pytest.mark.soak)])
def test_sigkill_at_random_moments_loses_no_acknowledged_message(sinks, kills):
    rng = random.Random(kills)
    sink = sinks()
    relay = RelayProcess(route_to(sink.port, extra='[queue]\nretry_schedule = ["1s"]\n'))
    acked: list[str] = []
    try:
        for round_ in range(kills):
            relay.start()
            senders = [Sender(relay.port, f"r{round_}s{i}", acked) for i in range(3)]
            for s in senders:
                s.start()
            time.sleep(rng.uniform(0.3, 1.2))
            relay.kill()
            for s in senders:
                s.stopping.set()
            for s in senders:
                s.join(15)
        relay.start()  # the last life: it must deliver whatever the others left in the spool
        expected = set(acked)
        assert len(expected) > 20, "the relay accepted too little to test anything"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = message_ids(sink)
            if expected <= set(got):
                break
            time.sleep(0.2)
        got = message_ids(sink)
        missing = expected - set(got)
        duplicates = sum(n - 1 for n in got.values() if n > 1)
        print(
            f"\ncrash test: {kills} kills, {len(expected)} acknowledged, {len(missing)} lost, "
            f"{duplicates} delivered twice (in flight at a kill)"
        )
        assert not missing, f"lost {len(missing)} acknowledged messages: {sorted(missing)[:5]}"
        assert duplicates <= kills * 100  # only what was in flight at a kill (max_deliveries)
    finally:
        relay.cleanup()


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
