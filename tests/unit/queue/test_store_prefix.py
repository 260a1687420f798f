"""What intake adds once (a DKIM signature) stays with the message in every store: committed in
its record, loaded, kept by each save, read after a restart by a new store over the same data,
and never mixed into the stored text."""

from __future__ import annotations

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor

from mailrelay.queue.spool import FilesystemSpool
from mailrelay.queue.store import message_from_dict, message_to_dict
from mailrelay.testing import MemoryQueueStore
from tests.support.queue.prefix import ENV, LARGE, PREFIX, SMALL, commit


def test_a_state_without_a_prefix_is_written_and_read_as_before():
    store = MemoryQueueStore()
    qid = store.inject(ENV, SMALL)
    message = store.messages[qid]
    d = message_to_dict(message)
    assert "prefix" not in d and message_from_dict(d).prefix == b""
    with_prefix = message_to_dict(attrs.evolve(message, prefix=PREFIX))
    assert list(with_prefix)[-3:] == ["prefix", "next_attempt", "held"]  # _fast reads the end
    assert message_from_dict(with_prefix).prefix == PREFIX


def test_the_memory_store_keeps_the_prefix_beside_the_text():
    store = MemoryQueueStore()
    qid = commit(store, SMALL).result
    assert store.messages[qid].prefix == PREFIX and store.bodies[qid] == SMALL


@pytest.mark.parametrize("body", [SMALL, LARGE], ids=["packed", "own-file"])
@pytest_twisted.inlineCallbacks
def test_the_spool_keeps_the_prefix_through_saves_and_a_restart(tmp_path, body):
    path = str(tmp_path / "spool")
    spool = FilesystemSpool(path, reactor)
    spool.start()
    try:
        qid = yield commit(spool, body)
        plain = yield commit(spool, SMALL, prefix=b"")
        assert (yield spool.load(qid)).prefix == PREFIX  # as committed
        message = spool.read_message(qid)  # from the disk
        assert message.prefix == PREFIX
        yield spool.save(attrs.evolve(message, attempts=1, next_attempt=1700000060.0))
        with spool.open_body(qid) as f:
            assert f.read() == body  # the text as received
    finally:
        yield spool.stop()
    again = FilesystemSpool(path, reactor)
    again.start()
    try:
        loaded = yield again.load(qid)
        assert (loaded.prefix, loaded.attempts) == (PREFIX, 1)
        many = yield again.load_many([qid, plain])
        assert [m.prefix for m in many] == [PREFIX, b""]
        schedule = yield again.load_schedule()
        assert sorted(schedule) == sorted([(qid, 1700000060.0, False), (plain, 0.0, False)])
    finally:
        yield again.stop()
