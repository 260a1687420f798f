"""This node's leases on the shared queue: claim, renew, release, and finding a dead node's mail.

``claim`` takes a due message with ``SELECT ... FOR UPDATE SKIP LOCKED`` and a lease expiry, and
copies its body here under the row lock. The periodic ``scan`` renews every lease this node holds
and finds orphans: messages whose lease expired (a dead node's) and unleased ones overdue by more
than a scan interval (their node died after releasing them, or is too busy to take them). A node
that dies stops renewing; once its leases expire the other nodes' scans find its messages. The
per-recipient state saved after an attempt is what the next node reads, so a recipient recorded
delivered is never sent again.

``Leases`` lives on the reactor thread: its sets are read and changed there only; the statements
run in pool threads through ``Database`` and get copies of what they need.
"""

from __future__ import annotations

from typing import Any

import psycopg
from twisted.internet import defer
from twisted.python.failure import Failure

from mailrelay.envelope import QueuedMessage
from mailrelay.queue.postgres import queries
from mailrelay.queue.postgres.bodies import BodyCache
from mailrelay.queue.postgres.connections import Database
from mailrelay.queue.store import is_queue_id


class Leases:
    def __init__(
        self,
        db: Database,
        bodies: BodyCache,
        clock: Any,
        node_id: str,
        lease_time: float,
        scan_interval: float,
    ) -> None:
        self.db = db
        self.bodies = bodies
        self.clock = clock
        self.node_id = node_id
        self.lease_time = lease_time
        self.scan_interval = scan_interval
        self._leased: set[str] = set()
        self._claimed: dict[str, QueuedMessage] = {}  # read at claim, handed to the next load
        self._scanning = False

    def held(self) -> set[str]:
        """The ids this node holds a lease on now (a copy)."""
        return set(self._leased)

    def take_claimed(self, queue_id: str) -> QueuedMessage | None:
        """The message as ``claim`` read it, once (saves the load that follows a claim a query)."""
        return self._claimed.pop(queue_id, None)

    def removed(self, queue_id: str) -> None:
        """``queue_id`` is gone from the database: no lease left to release."""
        self._leased.discard(queue_id)

    def forget_all(self) -> None:
        self._leased.clear()
        self._claimed.clear()

    # -- claim and release -----------------------------------------------------------------

    def claim(self, queue_id: str) -> defer.Deferred[bool]:
        """Lease ``queue_id`` for this node if it is due, not held, and no live node holds it."""
        if not is_queue_id(queue_id):
            return defer.succeed(False)
        now = self.clock.seconds()
        d = self.db.call(self._claim, queue_id, now)

        def claimed(message: QueuedMessage | None) -> bool:
            if message is None:
                return False
            self._leased.add(queue_id)
            self._claimed[queue_id] = message
            return True

        def gone(f: Failure) -> bool:
            f.trap(KeyError)  # its body vanished under us (deleted): nothing to attempt
            return False

        return d.addCallbacks(claimed, gone)

    def _claim(self, conn: psycopg.Connection, queue_id: str, now: float) -> QueuedMessage | None:
        row = conn.execute(
            "UPDATE mailrelay_message SET lease_owner = %(me)s, lease_until = %(until)s"
            " WHERE queue_id = (SELECT queue_id FROM mailrelay_message WHERE queue_id = %(id)s"
            "   AND NOT held AND next_attempt <= %(due)s"
            "   AND (lease_owner IS NULL OR lease_owner = %(me)s OR lease_until < %(now)s)"
            "   FOR UPDATE SKIP LOCKED)"
            " RETURNING state, body_size",
            {
                "me": self.node_id,
                "until": now + self.lease_time,
                "id": queue_id,
                "due": now + 1.0,
                "now": now,
            },
        ).fetchone()
        if row is None:
            return None
        self.bodies.fetch(conn, queue_id, row[1])  # under the row lock: nobody removes it meanwhile
        return queries.decode(row[0])

    def release(self, queue_id: str) -> defer.Deferred[None]:
        """Give up the lease on ``queue_id`` (its outcome is saved); the local body copy goes.
        A database out of reach is logged by the caller's errback; the lease then expires."""
        self._claimed.pop(queue_id, None)
        self.bodies.discard(queue_id)
        if queue_id not in self._leased:
            return defer.succeed(None)  # removed (delivered): no row, no lease left
        self._leased.discard(queue_id)
        return self.db.call(self._release, queue_id, self.node_id)

    @staticmethod
    def _release(conn: psycopg.Connection, queue_id: str, node_id: str) -> None:
        conn.execute(
            "UPDATE mailrelay_message SET lease_owner = NULL, lease_until = NULL"
            " WHERE queue_id = %s AND lease_owner = %s",
            (queue_id, node_id),
        )

    def release_all_now(self) -> None:
        """Give back every lease of this node, in the calling (pool) thread: at stop, so that
        other nodes may take over at once."""
        self.db.run(
            lambda conn: conn.execute(
                "UPDATE mailrelay_message SET lease_owner = NULL, lease_until = NULL"
                " WHERE lease_owner = %s",
                (self.node_id,),
            )
        )

    # -- the periodic scan -----------------------------------------------------------------

    def scan(self) -> defer.Deferred[list[str]]:
        """Renew this node's leases; the orphans found (none while a scan runs already).

        Also sweeps the body copies nobody here needs any more."""
        if self._scanning:
            return defer.succeed([])
        self._scanning = True
        now = self.clock.seconds()
        d = self.db.call(self._scan, now, self.held())

        def done(result: Any) -> Any:
            self._scanning = False
            return result

        return d.addBoth(done)

    def _scan(self, conn: psycopg.Connection, now: float, leased: set[str]) -> list[str]:
        conn.execute(
            "UPDATE mailrelay_message SET lease_until = %s WHERE lease_owner = %s",
            (now + self.lease_time, self.node_id),
        )
        rows = conn.execute(
            "SELECT queue_id FROM mailrelay_message WHERE NOT held AND"
            " ((lease_until IS NOT NULL AND lease_until < %(now)s)"
            "  OR (lease_owner IS NULL AND next_attempt < %(overdue)s))"
            " ORDER BY next_attempt LIMIT 1000",
            {"now": now, "overdue": now - self.scan_interval},
        ).fetchall()
        self.bodies.sweep(now, leased, max(600.0, self.lease_time))
        return [r[0] for r in rows]

    def unclaimed(self, ids: list[str]) -> defer.Deferred[list[str]]:
        """Those of ``ids`` no node has leased and not held (one query for the lot)."""
        return self.db.call(
            lambda conn: [
                r[0]
                for r in conn.execute(
                    "SELECT queue_id FROM mailrelay_message WHERE queue_id = ANY(%s)"
                    " AND lease_owner IS NULL AND NOT held ORDER BY queue_id",
                    (ids,),
                ).fetchall()
            ]
        )
