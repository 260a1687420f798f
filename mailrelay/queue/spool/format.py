"""The spool's files and bytes: where each thing lies, and how a record is laid out (no threads).

Layout under the spool's ``path``::

    tmp/<id>.body          a message being received: its body, the envelope appended at commit
    tmp/<id>.env.<n>       a state update (or a message moving out of a segment) being written
    tmp/spare.<n>          the file of a removed message, kept to be rewritten for a new one
    queue/<id>             a committed message: one *record*; its presence marks the commit
    queue/<id>.env         its state (JSON) once saved after an attempt; supersedes the envelope
                           stored in ``queue/<id>``
    queue/<id>.seg         a *segment*: the small messages' records, appended a *pack* at a time

A *record* is the body, the envelope (JSON, ``encode_state``) and a 16-byte trailer (magic, body
size, envelope size): both parts are found from the record's end. A *pack* holds the records of
the small messages committed in one writer batch, followed by a table (one ``<id> <offset> <body
size> <envelope size>`` line per record, offsets from the pack's start) and a 12-byte table
trailer. A segment is a file the writer appends packs to, each behind a 12-byte header (magic,
length, CRC-32 of the pack, its records' trailers taken as zeros, since erasing zeroes them): no
file is created, renamed or listed in a directory per commit, only one append and one fsync. A
torn append at a segment's end (a crash before its fsync: never acknowledged) fails its CRC, and
reading stops there. A record is *erased* (its message removed from the segment) by zeroing its
trailer in place; a segment goes when it takes no more packs and none of its records is left.
"""

from __future__ import annotations

import json
import os
import struct
import zlib

from mailrelay.envelope import QueuedMessage
from mailrelay.queue.store import message_from_dict, message_to_dict

RECEIVING = ".body"  # tmp/<id>.body
STATE = ".env"  # queue/<id>.env, tmp/<id>.env.<n>
SPARE = "spare."  # tmp/spare.<n>
SEGMENT = ".seg"

#: The end of every message record: magic, body size, envelope size.
TRAILER = struct.Struct("<4sQI")
MAGIC = b"MRq1"
#: The end of a pack: magic, table size, number of records.
PACK_TRAILER = struct.Struct("<4sII")
PACK_MAGIC = b"MRp1"
#: Before each pack in a segment: magic, pack length, CRC-32 of the pack.
CHUNK_HEADER = struct.Struct("<4sII")
CHUNK_MAGIC = b"MRc1"


_JSON = json.JSONEncoder(separators=(",", ":"))  # one encoder: json.dumps builds one per call


def encode_state(message: QueuedMessage) -> bytes:
    """A message's state as stored: compact JSON (``message_to_dict``)."""
    return _JSON.encode(message_to_dict(message)).encode()


def decode_state(data: bytes) -> QueuedMessage:
    """The message a stored state describes; ValueError if it is not one."""
    return message_from_dict(json.loads(data))


def erase_record(fd: int, trailer_offset: int, path: str) -> None:
    """Zero a record's trailer in the segment open as ``fd``: the pack no longer holds it."""
    if os.pwrite(fd, bytes(TRAILER.size), trailer_offset) != TRAILER.size:
        raise OSError(f"short write erasing a record of {path}")


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
    """CRC-32 of a pack with its records' trailers taken as zeros: erasing a record (zeroing its
    trailer) leaves the CRC true."""
    data = bytearray(pack)
    for _, offset, body_size, env_size in entries:
        end = offset + body_size + env_size
        data[end : end + TRAILER.size] = bytes(TRAILER.size)
    return zlib.crc32(data)


def chunk(pack: bytes, entries: list[tuple[str, int, int, int]]) -> bytes:
    """A pack (with its ``entries`` from ``build_pack``) as appended to a segment: behind its
    header."""
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
    message: its trailer is intact, not erased."""
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
