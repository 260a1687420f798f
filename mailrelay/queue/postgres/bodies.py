"""The node's local copies of message bodies: deliveries read these (``open_body`` must not block).

A body being received is ``tmp-<id>`` (written on the reactor thread, read by the commit thread
once it is closed); after its commit it is renamed ``<id>.body``, the copy this node delivers
from. A node that claims or loads a message it did not receive fetches the body from the database
(``fetch``, in a pool thread) to a temporary name and renames it: a reader never sees a half body.
``BodyCache`` holds only its directory: every thread may use it, the file system is what they
share (each writer its own names, renames atomic).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Set
from typing import IO

import psycopg

_BODY = ".body"
_RECEIVING = "tmp-"


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class BodyCache:
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def path(self, queue_id: str) -> str:
        """Where the local copy of ``queue_id``'s committed body lives."""
        return os.path.join(self.directory, queue_id + _BODY)

    def receiving(self, queue_id: str) -> str:
        """Where the body of ``queue_id`` is written while it is received."""
        return os.path.join(self.directory, _RECEIVING + queue_id)

    def keep(self, received: str, queue_id: str) -> None:
        """The committed body stays here as the local copy this node delivers from."""
        try:
            os.rename(received, self.path(queue_id))
        except OSError:
            unlink(received)  # fetched again when needed

    def fetch(self, conn: psycopg.Connection, queue_id: str, size: int) -> None:
        """Copy the body here in chunks (to a temp name, then renamed) unless a copy exists.

        A copy shorter or longer than the committed ``size`` (the message was removed while we
        read) is thrown away, with ``KeyError``: never a half body to deliver.
        """
        path = self.path(queue_id)
        if os.path.exists(path):
            return
        tmp = f"{path}.{threading.get_ident()}.part"
        try:
            got = 0
            with open(tmp, "wb") as f, conn.cursor(binary=True) as cur:
                for (data,) in cur.stream(
                    "SELECT data FROM mailrelay_body WHERE queue_id = %s ORDER BY seq", (queue_id,)
                ):
                    f.write(data)
                    got += len(data)
            if got != size:
                raise KeyError(queue_id)
            os.rename(tmp, path)
        finally:
            unlink(tmp)

    def open(self, queue_id: str) -> IO[bytes]:
        """The local copy; ``KeyError`` without one."""
        try:
            return open(self.path(queue_id), "rb")
        except FileNotFoundError:
            raise KeyError(queue_id) from None

    def size(self, queue_id: str) -> int:
        return os.stat(self.path(queue_id)).st_size

    def discard(self, queue_id: str) -> None:
        unlink(self.path(queue_id))

    def sweep(self, now: float, leased: Set[str], max_age: float) -> None:
        """Remove copies older than ``max_age`` that no lease of ours needs (listed by the CLI,
        delivered elsewhere); bodies being received are left alone."""
        for entry in os.scandir(self.directory):
            if entry.name.startswith(_RECEIVING) or entry.name[: -len(_BODY)] in leased:
                continue
            try:
                if entry.stat().st_mtime < now - max_age:
                    unlink(entry.path)
            except OSError:
                pass
