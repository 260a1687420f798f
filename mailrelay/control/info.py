"""What the queue commands show about messages, as plain JSON-able dicts.

Built the same way from a running instance (over the control channel) and from the spool of a
stopped one, so ``mailrelay queue list`` prints the same either way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import IO, Any

from mailrelay.address import domain_of
from mailrelay.envelope import QueuedMessage, RecipientState

#: Age buckets of ``queue summary``, in minutes (qshape's defaults).
AGE_BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
HEADER_LIMIT = 32 * 1024


def body_size(body: IO[bytes]) -> int:
    with body:
        return body.seek(0, 2)


def message_info(
    message: QueuedMessage, size: int | None, due: float | None = None, active: bool = False
) -> dict[str, Any]:
    env = message.envelope
    return {
        "queue_id": message.queue_id,
        "arrival": env.received_at,
        "sender": env.sender,
        "size": size,
        "held": message.held,
        "active": active,
        "attempts": message.attempts,
        "next_attempt": due if due is not None else message.next_attempt,
        "recipients": [
            {
                "address": s.recipient.address,
                "state": s.state.value,
                "attempts": s.attempts,
                "last_reply": str(s.last_reply) if s.last_reply else None,
                "remote": s.remote,
            }
            for s in message.statuses
        ],
    }


def message_detail(
    message: QueuedMessage, body: IO[bytes] | None, due: float | None = None, active: bool = False
) -> dict[str, Any]:
    """``message_info`` plus the whole envelope and the message's header section."""
    size = None
    headers = ""
    if body is not None:
        with body:
            data = body.read(HEADER_LIMIT)
            size = body.seek(0, 2)
        end = data.find(b"\r\n\r\n")
        headers = (data[: end + 2] if end >= 0 else data).decode("utf-8", "replace")
    info = message_info(message, size, due, active)
    info["envelope"] = message.envelope.to_dict()
    info["headers"] = headers
    return info


def summary(infos: Iterable[dict[str, Any]], now: float, top: int = 50) -> dict[str, Any]:
    """Pending recipients by destination domain and age, plus totals (like qshape)."""
    rows: dict[str, list[int]] = {}
    totals = [0] * (len(AGE_BUCKETS) + 1)
    messages = held = 0
    for info in infos:
        messages += 1
        held += bool(info["held"])
        age_min = max(0.0, now - (info["arrival"] or now)) / 60
        bucket = next((i for i, b in enumerate(AGE_BUCKETS) if age_min < b), len(AGE_BUCKETS))
        for r in info["recipients"]:
            if r["state"] != RecipientState.PENDING.value:
                continue
            row = rows.setdefault(domain_of(r["address"]) or "(none)", [0] * (len(AGE_BUCKETS) + 1))
            row[bucket] += 1
            totals[bucket] += 1
    ordered = sorted(rows.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    return {
        "buckets": [f"<{b}m" for b in AGE_BUCKETS] + [f"{AGE_BUCKETS[-1]}m+"],
        "messages": messages,
        "held": held,
        "total": totals,
        "rows": [[domain, counts] for domain, counts in ordered[:top]],
        "more_domains": max(0, len(ordered) - top),
    }
