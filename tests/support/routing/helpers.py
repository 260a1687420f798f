"""Reading the result of a Deferred that has already fired (every fake here answers at once)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure


def result_of(d: Any) -> Any:
    """The value a fired Deferred holds (or ``d`` itself when it is not a Deferred); raises its
    failure."""
    if not isinstance(d, defer.Deferred):
        return d
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]
