"""Delivery slots: global and per-destination caps, round robin between waiting destinations."""

from __future__ import annotations

from mailrelay.queue.slots import DeliverySlots


def test_caps_and_round_robin():
    slots = DeliverySlots(total=3, per_destination=2)
    order: list[str] = []

    def take(dest: str) -> None:
        slots.acquire(dest).addCallback(lambda _: order.append(dest))

    for _ in range(4):
        take("a")
    assert order == ["a", "a"] and slots.waiting("a") == 2
    take("b")
    take("b")
    take("c")
    assert order == ["a", "a", "b"]  # the global cap
    slots.release("a")  # a is under its cap again, but b and c waited too: served in turn
    slots.release("a")
    slots.release("b")
    assert order == ["a", "a", "b", "a", "b", "c"]
    assert slots.in_flight == 3 and slots.by_destination == {"a": 1, "b": 1, "c": 1}


def test_cancelled_waiter_leaves_the_line():
    slots = DeliverySlots(total=1, per_destination=1)
    slots.acquire("a")
    d = slots.acquire("a")
    d.addErrback(lambda f: None)
    d.cancel()
    assert slots.waiting("a") == 0
    slots.release("a")
    assert slots.in_flight == 0
