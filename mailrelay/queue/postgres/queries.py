"""The row format and the statements both the running store and the offline reader use.

A message is one ``mailrelay_message`` row whose ``state`` is ``store.message_to_dict`` as JSON
text, plus the columns the scheduler and the leases query by (``next_attempt``, ``held``,
``lease_owner``, ``lease_until``); its body is ``mailrelay_body`` rows of ``CHUNK`` bytes each.
A ``NOTIFY`` payload is ``"<node id> <queue id>"``: a node skips its own.

Every function here runs in the caller's thread and transaction on the connection it is given.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import psycopg

from mailrelay.envelope import QueuedMessage
from mailrelay.queue.store import message_from_dict, message_to_dict

CHUNK = 256 * 1024  # bytes per mailrelay_body row


def encode(message: QueuedMessage) -> str:
    return json.dumps(message_to_dict(message), separators=(",", ":"))


def decode(state: str) -> QueuedMessage:
    return message_from_dict(json.loads(state))


def notify(conn: psycopg.Connection, channel: str, node_id: str, ids: Iterable[str]) -> None:
    """Tell every listening node that ``ids`` are new or due (delivered at ``COMMIT``)."""
    with conn.cursor() as cur:
        cur.executemany("SELECT pg_notify(%s, %s)", [(channel, f"{node_id} {qid}") for qid in ids])


def parse_notice(payload: str) -> tuple[str, str]:
    """A ``NOTIFY`` payload as ``(node_id, queue_id)``."""
    node, _, queue_id = payload.partition(" ")
    return node, queue_id


def save(conn: psycopg.Connection, message: QueuedMessage) -> None:
    """Store the message's new state; ``KeyError`` when it is gone."""
    cur = conn.execute(
        "UPDATE mailrelay_message SET state = %s, next_attempt = %s, held = %s WHERE queue_id = %s",
        (encode(message), message.next_attempt, message.held, message.queue_id),
    )
    if cur.rowcount == 0:
        raise KeyError(message.queue_id)


def remove(conn: psycopg.Connection, queue_id: str) -> None:
    """Delete the message and (cascading) its body; ``KeyError`` when it is gone."""
    cur = conn.execute("DELETE FROM mailrelay_message WHERE queue_id = %s", (queue_id,))
    if cur.rowcount == 0:
        raise KeyError(queue_id)


def make_due(
    conn: psycopg.Connection, queue_id: str | None, now: float, channel: str, node_id: str
) -> list[str]:
    """Due now (column and saved state alike, so ``show`` agrees); ``NOTIFY`` each id as if new
    mail, so every other node's listener wakes its manager (its own node is skipped)."""
    where = " AND queue_id = %(id)s" if queue_id else ""
    rows = conn.execute(
        "UPDATE mailrelay_message SET next_attempt = LEAST(next_attempt, %(now)s),"
        " state = jsonb_set(state::jsonb, '{next_attempt}',"
        " to_jsonb(LEAST(next_attempt, %(now)s)))::text"
        f" WHERE NOT held{where} RETURNING queue_id",
        {"now": now, "id": queue_id},
    ).fetchall()
    ids = sorted(r[0] for r in rows)
    if ids:
        notify(conn, channel, node_id, ids)
    return ids
