"""The bytes of the filesystem spool's message files and packs (no I/O policy: see ``spool``).

A *message record* is the body, the envelope (JSON) and a 16-byte trailer (magic, body size,
envelope size): both parts are found from the record's end. A message file ``queue/<id>`` is one
record. A *pack* ``queue/<id>.pack`` holds the records of several small messages committed in the
same writer batch, followed by a table (one ``<id> <offset> <body size> <envelope size>`` line per
record) and a 12-byte table trailer: one file created and fsynced for the lot instead of one per
message. A record of a pack is removed by zeroing its trailer in place (``kill``); the pack goes
when none of its records is left.
"""

from __future__ import annotations

import os
import struct

import attrs

#: The end of every message record: magic, body size, envelope size.
TRAILER = struct.Struct("<4sQI")
MAGIC = b"MRq1"
#: The end of a pack: magic, table size, number of records.
PACK_TRAILER = struct.Struct("<4sII")
PACK_MAGIC = b"MRp1"
PACK = ".pack"


def trailer(body_size: int, envelope: bytes) -> bytes:
    """What follows a body of ``body_size`` bytes in its record."""
    return envelope + TRAILER.pack(MAGIC, body_size, len(envelope))


def read_trailer(fd: int, tail: int = TRAILER.size) -> tuple[int, int, bytes]:
    """``(body size, envelope size, last bytes)`` of a message file; ValueError if torn."""
    size = os.fstat(fd).st_size
    n = min(size, tail)
    data = os.pread(fd, n, size - n)
    if len(data) < TRAILER.size:
        raise ValueError("message file too short")
    magic, body_size, env_size = TRAILER.unpack_from(data, len(data) - TRAILER.size)
    if magic != MAGIC or body_size + env_size + TRAILER.size != size:
        raise ValueError("not a committed message file")
    return body_size, env_size, data


def read_envelope(fd: int, tail: int) -> bytes:
    """The envelope of a message file, reading ``tail`` bytes from its end (more only if needed)."""
    body_size, env_size, data = read_trailer(fd, tail)
    if env_size + TRAILER.size <= len(data):
        return data[len(data) - TRAILER.size - env_size:len(data) - TRAILER.size]
    return os.pread(fd, env_size, body_size)


@attrs.define(eq=False)
class Pack:
    """A pack file of a running spool: ``live`` records left; ``fd`` for killing them, once opened."""

    path: str
    key: str  # its name in queue/, under which its readers are counted
    live: int = 0
    fd: int | None = None


@attrs.define(eq=False, slots=True)
class Member:
    """Where a message's record lies in a pack."""

    pack: Pack
    offset: int
    body_size: int
    env_size: int
    dead: bool = False  # killed by this process

    @property
    def trailer_offset(self) -> int:
        return self.offset + self.body_size + self.env_size

    def read_envelope(self, fd: int) -> bytes:
        data = os.pread(fd, self.env_size, self.offset + self.body_size)
        if len(data) != self.env_size:
            raise ValueError("pack too short")
        return data

    def alive(self, fd: int) -> bool:
        data = os.pread(fd, TRAILER.size, self.trailer_offset)
        return (len(data) == TRAILER.size
                and TRAILER.unpack(data) == (MAGIC, self.body_size, self.env_size))

    def kill(self, fd: int) -> None:
        """Zero the record's trailer: the pack no longer holds this message."""
        if os.pwrite(fd, bytes(TRAILER.size), self.trailer_offset) != TRAILER.size:
            raise OSError(f"short write killing a record of {self.pack.path}")


def build_pack(records: list[tuple[str, bytes, bytes]]) -> tuple[bytes, list[tuple[str, int, int, int]]]:
    """The bytes of a pack of ``(queue id, body, envelope)`` records, and each record's
    ``(queue id, offset, body size, envelope size)``."""
    parts: list[bytes] = []
    entries: list[tuple[str, int, int, int]] = []
    offset = 0
    for queue_id, body, envelope in records:
        entries.append((queue_id, offset, len(body), len(envelope)))
        parts += (body, trailer(len(body), envelope))
        offset += len(body) + len(envelope) + TRAILER.size
    table = "".join(f"{q} {o} {b} {e}\n" for q, o, b, e in entries).encode("ascii")
    parts += (table, PACK_TRAILER.pack(PACK_MAGIC, len(table), len(entries)))
    return b"".join(parts), entries


def read_pack_table(fd: int) -> list[tuple[str, int, int, int]]:
    """The records a pack file lists (alive or not); ValueError if it is not a whole pack."""
    size = os.fstat(fd).st_size
    end = os.pread(fd, PACK_TRAILER.size, max(0, size - PACK_TRAILER.size))
    if len(end) != PACK_TRAILER.size:
        raise ValueError("pack too short")
    magic, table_size, count = PACK_TRAILER.unpack(end)
    start = size - PACK_TRAILER.size - table_size
    if magic != PACK_MAGIC or start < 0:
        raise ValueError("not a pack")
    lines = os.pread(fd, table_size, start).decode("ascii").splitlines()
    if len(lines) != count:
        raise ValueError("pack table torn")
    entries = []
    for line in lines:
        queue_id, offset, body_size, env_size = line.split(" ")
        entry = (queue_id, int(offset), int(body_size), int(env_size))
        if entry[1] + entry[2] + entry[3] + TRAILER.size > start:
            raise ValueError("pack record out of bounds")
        entries.append(entry)
    return entries
