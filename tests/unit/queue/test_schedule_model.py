"""The queue manager's heap-and-one-timer schedule (``Timetable``) against a plain model, on random
operation sequences: every scheduled message is attempted once, at its latest due time, never
early, never twice."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from mailrelay.queue.timetable import Timetable

IDS = [f"m{i}" for i in range(6)]

ops = st.lists(
    st.one_of(
        st.tuples(st.just("schedule"), st.sampled_from(IDS), st.integers(0, 50)),
        st.tuples(st.just("unschedule"), st.sampled_from(IDS), st.just(0)),
        st.tuples(st.just("advance"), st.just(""), st.integers(0, 30)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_schedule_matches_a_model(operations):
    clock = Clock()
    fired: list[tuple[float, str]] = []
    timetable = Timetable(clock, lambda ids: fired.extend((clock.seconds(), q) for q in ids))
    timetable.start()
    model: dict[str, float] = {}
    expected: list[tuple[float, str]] = []

    def advance(seconds: float) -> None:
        target = clock.seconds() + seconds
        while True:  # what the model says fires, in time order, up to target
            due = sorted((at, q) for q, at in model.items() if at <= target)
            if not due:
                break
            at, q = due[0]
            del model[q]
            expected.append((target, q))  # task.Clock runs what is due once it has moved to target
        clock.advance(seconds)

    for op, qid, n in operations:
        if op == "schedule":
            at = clock.seconds() + n
            timetable.set(qid, at)
            model[qid] = at
        elif op == "unschedule":
            timetable.remove(qid)
            model.pop(qid, None)
        else:
            advance(n)
    advance(1000)
    assert sorted(fired) == sorted(expected)
    assert timetable.copy() == {}
