"""The start-up schedule's speed trick (``mailrelay.queue.spool._fast``) and what it relies on."""

from __future__ import annotations

import json

import attrs

from mailrelay.envelope import Envelope, Recipient
from mailrelay.queue.spool import _fast
from mailrelay.queue.spool.format import encode_state
from mailrelay.queue.store import message_to_dict, new_message

ENV = Envelope(
    "sender@example.org",
    (Recipient('"odd,\\"held\\":true"@example.test'),),
    received_at=1700000000.0,
)


def test_a_stored_state_ends_with_next_attempt_then_held_in_compact_json():
    """The order the regular expression relies on: if this fails, fix ``_fast`` with it."""
    message = attrs.evolve(new_message("0000000001AAAAAAAA", ENV), next_attempt=17.5, held=True)
    assert list(message_to_dict(message))[-2:] == ["next_attempt", "held"]
    assert encode_state(message).endswith(b',"next_attempt":17.5,"held":true}')


def test_the_schedule_read_from_the_tail_is_what_decoding_the_state_gives():
    for next_attempt, held in [(0.0, False), (1700000600.25, True), (1e-7, False), (-1.0, True)]:
        message = attrs.evolve(
            new_message("0000000001AAAAAAAA", ENV), next_attempt=next_attempt, held=held
        )
        data = encode_state(message)
        decoded = json.loads(data)
        assert _fast.schedule_from_tail(data) == (decoded["next_attempt"], decoded["held"])
        assert _fast.schedule_from_tail(data[-_fast.SCHEDULE_TAIL :]) == (next_attempt, held)


def test_a_state_written_otherwise_is_not_guessed():
    spaced = json.dumps({"next_attempt": 5.0, "held": True}).encode()  # not compact
    assert _fast.schedule_from_tail(spaced) is None
