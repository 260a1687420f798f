"""The bytes of the filesystem spool's message files and packs (no I/O policy: see ``spool``).

A *message record* is the body, the envelope (JSON) and a 16-byte trailer (magic, body size,
envelope size): both parts are found from the record's end. A message file ``queue/<id>`` is one
record. A *pack* holds the records of the small messages committed in one writer batch, followed
by a table (one ``<id> <offset> <body size> <envelope size>`` line per record, offsets from the
pack's start) and a 12-byte table trailer. A *segment* ``queue/<id>.seg`` is a file the writer
appends packs to, each behind a 12-byte header (magic, length, CRC-32 of the pack, its records'
trailers taken as zeros, since a kill zeroes them): no file is
created, renamed or listed in a directory per commit, only one append and one fsync. A torn
append at a segment's end (a crash before its fsync: never acknowledged) fails its CRC, and
reading stops there. A record is removed by zeroing its trailer in place (``kill``); a segment
goes when it is full and none of its records is left.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib

import attrs

#: The end of every message record: magic, body size, envelope size.
TRAILER = struct.Struct("<4sQI")
MAGIC = b"MRq1"
#: The end of a pack: magic, table size, number of records.
PACK_TRAILER = struct.Struct("<4sII")
PACK_MAGIC = b"MRp1"
#: Before each pack in a segment: magic, pack length, CRC-32 of the pack.
CHUNK_HEADER = struct.Struct("<4sII")
CHUNK_MAGIC = b"MRc1"
SEGMENT = ".seg"


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
        return data[len(data) - TRAILER.size - env_size : len(data) - TRAILER.size]
    return os.pread(fd, env_size, body_size)


@attrs.define(eq=False)
class Segment:
    """A segment file of a running spool: ``live`` records left; ``full`` once nothing more is
    appended (it goes when both); ``fd`` for killing records, once opened. ``lock`` guards
    ``live`` and ``full``, which the writer and the remover both change."""

    path: str
    live: int = 0
    full: bool = True
    named: bool = True  # its directory entry is durable (a sync of queue/ covered its creation)
    fd: int | None = None
    lock: threading.Lock = attrs.field(factory=threading.Lock)

    def gone(self, killed: int = 0, full: bool = False) -> bool:
        """Count ``killed`` records gone (and the segment full, if so); whether it can go."""
        with self.lock:
            self.live -= killed
            self.full = self.full or full
            return self.full and self.live <= 0


@attrs.define(eq=False, slots=True)
class Member:
    """Where a message's record lies in a pack."""

    segment: Segment
    offset: int
    body_size: int
    env_size: int
    dead: bool = False  # killed by this process

    @property
    def trailer_offset(self) -> int:
        return self.offset + self.body_size + self.env_size

    def read_body(self, fd: int) -> bytes:
        return self._read(fd, self.offset, self.body_size)

    def read_envelope(self, fd: int) -> bytes:
        return self._read(fd, self.offset + self.body_size, self.env_size)

    def _read(self, fd: int, offset: int, size: int) -> bytes:
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ValueError(f"{self.segment.path} too short")
        return data

    def kill(self, fd: int) -> None:
        """Zero the record's trailer: the pack no longer holds this message."""
        if os.pwrite(fd, bytes(TRAILER.size), self.trailer_offset) != TRAILER.size:
            raise OSError(f"short write killing a record of {self.segment.path}")


def build_pack(
    records: list[tuple[str, bytes, bytes]],
) -> tuple[bytes, list[tuple[str, int, int, int]]]:
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


def _crc(pack: bytes | memoryview, entries: list[tuple[str, int, int, int]]) -> int:
    """CRC-32 of a pack with its records' trailers taken as zeros: killing a record (zeroing its
    trailer) leaves the CRC true."""
    data = bytearray(pack)
    for _, offset, body_size, env_size in entries:
        end = offset + body_size + env_size
        data[end : end + TRAILER.size] = bytes(TRAILER.size)
    return zlib.crc32(data)


def chunk(pack: bytes, entries: list[tuple[str, int, int, int]]) -> bytes:
    """A pack (with its ``entries`` from ``build_pack``) as appended to a segment: behind its header."""
    return CHUNK_HEADER.pack(CHUNK_MAGIC, len(pack), _crc(pack, entries)) + pack


def parse_pack(data: bytes | memoryview) -> list[tuple[str, int, int, int]]:
    """The records a pack lists (alive or not); ValueError if it is not a whole pack."""
    size = len(data)
    if size < PACK_TRAILER.size:
        raise ValueError("pack too short")
    magic, table_size, count = PACK_TRAILER.unpack(data[size - PACK_TRAILER.size :])
    start = size - PACK_TRAILER.size - table_size
    if magic != PACK_MAGIC or start < 0:
        raise ValueError("not a pack")
    lines = bytes(data[start : start + table_size]).decode("ascii").splitlines()
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


def alive(data: bytes, entry: tuple[str, int, int, int]) -> bool:
    """Whether the record ``entry`` (from ``read_segment``) of a segment's bytes still holds its
    message: its trailer is intact, not killed."""
    _, offset, body_size, env_size = entry
    end = offset + body_size + env_size + TRAILER.size
    return len(data) >= end and TRAILER.unpack(data[end - TRAILER.size : end]) == (
        MAGIC,
        body_size,
        env_size,
    )


def read_segment(data: bytes) -> tuple[list[tuple[str, int, int, int]], int]:
    """The records of a segment's bytes, offsets from the segment's start, and where its whole
    packs end (a torn append after that was never acknowledged)."""
    entries: list[tuple[str, int, int, int]] = []
    view = memoryview(data)
    pos = 0
    while pos + CHUNK_HEADER.size <= len(data):
        magic, length, crc = CHUNK_HEADER.unpack_from(data, pos)
        start, end = pos + CHUNK_HEADER.size, pos + CHUNK_HEADER.size + length
        if magic != CHUNK_MAGIC or end > len(data):
            break
        try:
            found = parse_pack(view[start:end])
        except ValueError:
            break
        if _crc(view[start:end], found) != crc:
            break
        entries += [(q, start + o, b, e) for q, o, b, e in found]
        pos = end
    return entries, pos
