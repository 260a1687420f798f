"""Crash safety under load: a real relay SIGKILLed again and again at random moments while clients
send; every message that got its 250 arrives at the sink in the end (twice only if it was in flight)."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from tests.peers import SMTPSink
from tests.relay import RelayProcess, Sender

pytestmark = pytest.mark.integration


def route(port: int) -> str:
    return f'[queue]\nretry_schedule = ["1s"]\n[[routes]]\ntype = "static"\ndomains = ["*"]\nhosts = ["127.0.0.1:{port}"]\n'


@pytest.mark.parametrize("kills", [4, pytest.param(30, marks=pytest.mark.soak)])
def test_sigkill_at_random_moments_loses_no_acknowledged_message(kills):
    rng = random.Random(kills)
    sink = SMTPSink().start()
    relay = RelayProcess(route(sink.port))
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
            got = Counter(_message_ids(sink))
            if expected <= set(got):
                break
            time.sleep(0.2)
        got = Counter(_message_ids(sink))
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
        sink.stop()


def _message_ids(sink: SMTPSink) -> list[str]:
    out = []
    for t in sink.transactions():
        for line in t.data.split(b"\r\n"):
            if line.startswith(b"Message-ID: "):
                out.append(line[12:].decode())
                break
    return out
