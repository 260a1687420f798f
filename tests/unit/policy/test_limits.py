"""Cross-session limits on the injected clock."""

from __future__ import annotations

from twisted.internet.task import Clock

from mailrelay.policy.limits import RateCounter


def test_sliding_window() -> None:
    clock = Clock()
    rc = RateCounter(clock, limit=3, window=60)
    for _ in range(2):
        rc.hit("a")
    assert not rc.exceeded("a")
    rc.hit("a")
    assert rc.exceeded("a") and not rc.exceeded("b")
    clock.advance(30)
    rc.hit("a")
    clock.advance(31)  # the first three expired, the fourth is still in the window
    assert not rc.exceeded("a")
    rc.hit("a")
    rc.hit("a")
    assert rc.exceeded("a")
    clock.advance(61)
    assert not rc.exceeded("a")
    assert rc._events == {}


def test_memory_bounded_by_max_keys() -> None:
    clock = Clock()
    rc = RateCounter(clock, limit=2, window=60, max_keys=100)
    for i in range(1000):
        rc.hit(f"10.0.{i // 256}.{i % 256}")
    assert len(rc._events) <= 100
    clock.advance(61)
    rc.hit("x")
    assert len(rc._events) == 1
