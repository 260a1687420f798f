"""When to try again, and when to give up: pure functions of the config, the attempt and the time.

No clock and no randomness of their own: the queue manager passes the time and a jitter source,
so tests walk a whole schedule in zero time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mailrelay.envelope import QueuedMessage


def retry_delay(
    schedule: Sequence[float],
    attempts: int,
    jitter: Callable[[float], float] | None = None,
) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1 = after the first).

    The last interval repeats. ``jitter(delay)`` returns the delay to use instead (e.g. ±10 %
    random) so that many messages deferred together do not all come back in the same second.
    """
    if not schedule:
        raise ValueError("empty retry schedule")
    delay = float(schedule[min(max(attempts, 1), len(schedule)) - 1])
    if jitter is not None:
        delay = max(0.0, jitter(delay))
    return delay


def proportional_jitter(
    random: Callable[[], float], fraction: float = 0.1
) -> Callable[[float], float]:
    """A jitter that moves a delay by up to ``fraction`` of it either way, from ``random()`` in
    [0, 1)."""

    def jitter(delay: float) -> float:
        return delay * (1.0 + fraction * (2.0 * random() - 1.0))

    return jitter


def expires_at(message: QueuedMessage, max_lifetime: float) -> float:
    return message.envelope.received_at + max_lifetime


def is_expired(message: QueuedMessage, max_lifetime: float, now: float) -> bool:
    """Whether the message has been queued for ``max_lifetime`` seconds or more."""
    return now >= expires_at(message, max_lifetime)


def needs_delay_warning(message: QueuedMessage, delay_warning: float | None, now: float) -> bool:
    """Whether to tell the sender their message is delayed (once per message, RFC 3464
    "delayed")."""
    if delay_warning is None or message.warned or not message.envelope.sender:
        return False
    return now >= message.envelope.received_at + delay_warning


def next_attempt_at(
    message: QueuedMessage,
    schedule: Sequence[float],
    max_lifetime: float,
    now: float,
    jitter: Callable[[float], float] | None = None,
) -> float:
    """When to try ``message`` next, after its ``message.attempts``-th attempt; never past its
    expiry.

    At expiry the manager makes one last attempt and then bounces what is still pending.
    """
    return min(
        now + retry_delay(schedule, message.attempts, jitter),
        max(now, expires_at(message, max_lifetime)),
    )
