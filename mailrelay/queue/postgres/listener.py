"""Hearing other nodes' commits at once: a thread that ``LISTEN``s on the schema's channel.

The listener thread (``mailrelay-pg-listen``) owns its connection (autocommit, used by no other
thread). What crosses to the reactor thread goes through ``reactor.callFromThread``:
``listening()`` each time it (re)connects, so the store catches up on what it missed meanwhile,
and ``heard(ids)`` with the ids other nodes committed or made due (its own node's are skipped).
``stop`` sets a ``threading.Event``; the thread notices it within half a second and ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql
from twisted.logger import Logger

from mailrelay.queue.postgres import queries
from mailrelay.queue.postgres.schema import Preparation
from mailrelay.queue.store import is_queue_id

log = Logger()

_WAIT = 0.5  # seconds between looks at the stop event
_MOST = 500  # notifications handed over at once at most


class Listener:
    def __init__(
        self,
        reactor: Any,
        dsn: str,
        connect_timeout: int,
        preparation: Preparation,
        node_id: str,
        listening: Callable[[], None],
        heard: Callable[[list[str]], None],
    ) -> None:
        self.reactor = reactor
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self.preparation = preparation
        self.node_id = node_id
        self.listening = listening
        self.heard = heard
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mailrelay-pg-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def _run(self) -> None:
        connected = False  # a connection that was listening is replaced at once, without a warning
        while not self._stopping.is_set():
            try:
                with psycopg.connect(
                    self.dsn, autocommit=True, connect_timeout=self.connect_timeout
                ) as conn:
                    channel = self.preparation.ensure(conn)
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    connected = True
                    self.reactor.callFromThread(self.listening)
                    self._listen(conn)
            except Exception as e:
                if self._stopping.is_set():
                    continue
                if connected:
                    connected = False
                    log.info(
                        "pgstore: notification listener lost its connection ({error});"
                        " reconnecting",
                        error=e,
                    )
                    continue
                log.warn(
                    "pgstore: notification listener cannot reach the database ({error}); retrying",
                    error=e,
                )
                self._stopping.wait(1.0)

    def _listen(self, conn: psycopg.Connection) -> None:
        while not self._stopping.is_set():
            ids = []
            for notice in conn.notifies(timeout=_WAIT, stop_after=_MOST):
                node, queue_id = queries.parse_notice(notice.payload)
                if node != self.node_id and is_queue_id(queue_id):
                    ids.append(queue_id)
            if ids:
                self.reactor.callFromThread(self.heard, ids)
