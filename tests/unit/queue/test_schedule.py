"""The pure schedule: retry delays (last interval repeats), jitter, expiry and delay warnings."""

from __future__ import annotations

import random

import pytest

from mailrelay.envelope import Envelope, QueuedMessage, Recipient
from mailrelay.queue import schedule

SCHEDULE = (60.0, 300.0, 900.0)


@pytest.mark.parametrize(
    "attempts,delay", [(0, 60.0), (1, 60.0), (2, 300.0), (3, 900.0), (4, 900.0), (50, 900.0)]
)
def test_retry_delay_walks_the_schedule_and_repeats_the_last(attempts, delay):
    assert schedule.retry_delay(SCHEDULE, attempts) == delay


def test_jitter_is_injected_and_bounded():
    jitter = schedule.proportional_jitter(random.Random(7).random, 0.1)
    delays = [schedule.retry_delay(SCHEDULE, 2, jitter) for _ in range(200)]
    assert all(270.0 <= d <= 330.0 for d in delays)
    assert len(set(delays)) > 100
    again = schedule.proportional_jitter(random.Random(7).random, 0.1)
    assert delays[0] == schedule.retry_delay(SCHEDULE, 2, again)  # same seed, same delay
    assert schedule.retry_delay(SCHEDULE, 1, lambda d: -5) == 0.0


def test_empty_schedule_is_refused():
    with pytest.raises(ValueError):
        schedule.retry_delay((), 1)


def message(
    received_at: float, attempts: int = 0, sender: str = "s@example.org", warned: bool = False
):
    env = Envelope(sender, (Recipient("r@example.test"),), received_at=received_at)
    return QueuedMessage("X", env, (), attempts=attempts, warned=warned)


def test_expiry():
    m = message(1000.0)
    assert not schedule.is_expired(m, 3600.0, 4599.0)
    assert schedule.is_expired(m, 3600.0, 4600.0)


def test_next_attempt_never_goes_past_expiry():
    m = message(1000.0, attempts=3)
    assert schedule.next_attempt_at(m, SCHEDULE, 3600.0, 2000.0) == 2900.0
    assert schedule.next_attempt_at(m, SCHEDULE, 3600.0, 4000.0) == 4600.0  # one last try at expiry
    assert schedule.next_attempt_at(m, SCHEDULE, 3600.0, 5000.0) == 5000.0


def test_delay_warning_once_and_never_to_the_null_sender():
    assert schedule.needs_delay_warning(message(0.0), 3600.0, 3600.0)
    assert not schedule.needs_delay_warning(message(0.0), 3600.0, 3599.0)
    assert not schedule.needs_delay_warning(message(0.0, warned=True), 3600.0, 9999.0)
    assert not schedule.needs_delay_warning(message(0.0, sender=""), 3600.0, 9999.0)
    assert not schedule.needs_delay_warning(message(0.0), None, 9999.0)
