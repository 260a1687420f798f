"""The bytes of segments: what a crash can leave at the end is cut off, and a removal (a killed
trailer) never makes a pack look torn."""

from __future__ import annotations

from mailrelay.queue.spool.format import TRAILER, alive, build_pack, chunk, read_segment


def segment_of(*packs: list[tuple[str, bytes, bytes]]) -> bytes:
    return b"".join(chunk(*build_pack(records)) for records in packs)


FIRST = [
    ("AAAAAAAAAAAAAAAAA1", b"body one\r\n", b'{"e":1}'),
    ("AAAAAAAAAAAAAAAAA2", b"two\r\n", b'{"e":2}'),
]
SECOND = [("AAAAAAAAAAAAAAAAA3", b"three\r\n" * 100, b'{"e":3}')]


def records(data: bytes) -> tuple[dict[str, bool], int]:
    entries, end = read_segment(data)
    return {entry[0]: alive(data, entry) for entry in entries}, end


def test_records_are_found_with_their_bodies_and_envelopes():
    data = segment_of(FIRST, SECOND)
    entries, end = read_segment(data)
    assert end == len(data)
    for (queue_id, offset, body_size, env_size), (qid, body, envelope) in zip(
        entries, FIRST + SECOND, strict=True
    ):
        assert queue_id == qid
        assert data[offset : offset + body_size] == body
        assert data[offset + body_size : offset + body_size + env_size] == envelope


def test_a_killed_record_leaves_its_pack_and_the_ones_after_it_readable():
    data = bytearray(segment_of(FIRST, SECOND))
    queue_id, offset, body_size, env_size = read_segment(bytes(data))[0][1]
    at = offset + body_size + env_size
    data[at : at + TRAILER.size] = bytes(TRAILER.size)  # what a removal writes
    assert records(bytes(data)) == (
        {"AAAAAAAAAAAAAAAAA1": True, queue_id: False, "AAAAAAAAAAAAAAAAA3": True},
        len(data),
    )


def test_a_torn_or_damaged_last_pack_is_cut_off():
    whole_first = len(segment_of(FIRST))
    data = segment_of(FIRST, SECOND)
    for torn in (
        data[:-1],
        data[: whole_first + 20],
        data[:whole_first] + bytes(len(data) - whole_first),
    ):
        assert records(torn) == (
            {"AAAAAAAAAAAAAAAAA1": True, "AAAAAAAAAAAAAAAAA2": True},
            whole_first,
        )
    damaged = bytearray(data)
    damaged[whole_first + 40] ^= (
        0xFF  # a body byte of the second pack never written as it should be
    )
    assert records(bytes(damaged))[1] == whole_first
