"""A next hop that flaps: down, 421, hanging up mid-transaction, too slow — then well again.

Every message is retried through each bad phase (the relay logs a deferral per attempt), none is
bounced, and all arrive once the hop recovers. Timeouts are set small so "slow" means "slower than
our timeouts", and the retry interval is one second.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import time

import pytest

from tests.peers import SMTPSink, free_port
from tests.reliability.helpers import message_ids, route_to, wait_for_ids

pytestmark = pytest.mark.integration

N = 6
CONFIG = """[queue]
retry_schedule = ["1s"]
[delivery]
connect_timeout = "1s"
command_timeout = "1s"
data_timeout = "1s"
connection_idle_time = "0.2s"
"""
_DEFERRED = re.compile(r"status=deferred \((.*)\)")


def deferrals(log: str) -> list[str]:
    return _DEFERRED.findall(log)


def wait_deferrals(relay, before: int, n: int, timeout: float = 20.0) -> list[str]:
    """Wait until ``n`` more deferrals than ``before`` are logged; returns the new ones."""
    deadline = time.monotonic() + timeout
    while True:
        new = deferrals(relay.log_text())[before:]
        if len(new) >= n or time.monotonic() > deadline:
            return new
        time.sleep(0.1)


# (phase, smtp-sink flags or None for "nothing listens", a word every deferral of the phase shows)
PHASES = [
    ("down", None, "connect"),
    ("421 at MAIL", ["-Q", "MAIL"], "421"),
    ("hang up at DATA", ["-q", "DATA"], "lost connection"),
    ("hang up after the final dot", ["-q", "."], "lost connection"),
    ("slower than the timeouts", ["-w", "4"], "timed out"),
]


def test_flapping_next_hop_retries_and_delivers_everything_when_it_recovers(relays):
    port = free_port()
    relay = relays(route_to(port, extra=CONFIG))
    with smtplib.SMTP("127.0.0.1", relay.port) as client:
        for i in range(N):
            body = f"Message-ID: <flap{i}@client.example>\r\nSubject: {i}\r\n\r\nbody {i}\r\n"
            client.sendmail("s@example.org", [f"r{i}@example.test"], body.encode())
    seen = 0
    report = []
    flaky: list[SMTPSink] = []
    try:
        for name, flags, word in PHASES:
            sink = SMTPSink(port=port, flags=flags).start() if flags is not None else None
            new = wait_deferrals(relay, seen, N)
            if sink is not None:
                sink.stop()
                flaky.append(sink)
            ours = [d for d in new if word in d.lower()]
            report.append(f"  {name:30} {len(new)} deferrals, e.g. {new[-1] if new else '-'}")
            assert len(ours) >= N, f"{name}: expected {N} deferrals mentioning {word!r}, got {new}"
            seen += len(new)
        good = SMTPSink(port=port).start()
        flaky.append(good)
        want = {f"<flap{i}@client.example>" for i in range(N)}
        got = wait_for_ids(good, want, timeout=30)
        at_flaky = sum(sum(message_ids(s).values()) for s in flaky[:-1])
    finally:
        for s in flaky:
            s.stop()
            shutil.rmtree(s.dir, ignore_errors=True)
    log = relay.log_text()
    print(f"\nflapping next hop: {N} messages, {len(deferrals(log))} deferrals over {len(PHASES)} bad phases, "
          f"{sum(got.values())} delivered when it recovered, {at_flaky} taken by the hop that hung up "
          f"after the dot (no reply: retried, as RFC 5321 6.1 allows)")
    print("\n".join(report))
    assert got == {m: 1 for m in want}
    assert "status=bounced" not in log and "status=expired" not in log
    assert not [t for t in good.transactions() if t.sender == ""], "a bounce was sent"
