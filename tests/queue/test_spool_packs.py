"""Packs: the small messages of one writer batch share one file (one create and fsync for the lot).

What must hold as for a message file of its own: each commit fires only once the pack is durable,
each message reads back whole, a removal or a move out of the pack (on save) survives a restart,
a crash between a move and the kill of the old record shows the message once, and the offline
tools and the drain of worker shards see the packed messages.
"""

from __future__ import annotations

import os
import shutil
import time

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from mailrelay.errors import TemporaryFailure
from mailrelay.queue.spool import FilesystemSpool
from mailrelay.queue.spool_format import Member, Pack, read_pack_table
from mailrelay.workers.shards import drain, shard_path
from tests.queue.conftest import GatedFsync
from tests.queue.test_spool import ENV, deferLater, files, store_message

BODIES = [b"Subject: %d\r\n\r\npacked body %d\r\n" % (i, i) for i in range(4)]


@defer.inlineCallbacks
def packed(spool: FilesystemSpool, bodies: list[bytes] = BODIES):  # type: ignore[no-untyped-def]
    """Commit ``bodies`` while the writer is held in the fsync of a first message, so they wait
    together and go into one pack; ``(the first message's id, the packed ids)``."""
    fsync = spool.fsync_recorder
    yield spool.list_ids()
    fsync.entered.clear()
    fsync.gate.clear()
    first = store_message(spool, b"alone\r\n")
    assert fsync.entered.wait(5)
    rest = [store_message(spool, body) for body in bodies]
    assert not any(d.called for d in rest)
    fsync.gate.set()
    ids = yield defer.gatherResults([first, *rest])
    return ids[0], ids[1:]


def reopened(spool: FilesystemSpool) -> FilesystemSpool:
    s = FilesystemSpool(spool.path, reactor, fsync=spool.fsync_recorder)
    s.fsync_recorder = spool.fsync_recorder
    return s


def alive(spool: FilesystemSpool, pack_name: str) -> dict[str, bool]:
    """Each record of a pack on disk, and whether it still holds its message."""
    fd = os.open(os.path.join(spool.queue_dir, pack_name), os.O_RDONLY)
    try:
        pack = Pack(pack_name, pack_name)
        return {q: Member(pack, o, b, e).alive(fd) for q, o, b, e in read_pack_table(fd)}
    finally:
        os.close(fd)


def wait_until(condition, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    @defer.inlineCallbacks
    def poll():  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "condition not met in time"
            yield deferLater(0.01)

    return poll()


@pytest_twisted.inlineCallbacks
def test_messages_committed_together_share_one_pack_fsynced_before_their_commits_fire(spool):
    fsync = spool.fsync_recorder
    first, ids = yield packed(spool)
    pack = ids[0] + ".pack"
    assert files(spool) == [f"queue/{first}", f"queue/{pack}"]
    assert [e for e in fsync.events if e.endswith(".pack")] == [os.path.join(spool.tmp_dir, pack)]
    assert alive(spool, pack) == dict.fromkeys(ids, True)
    for qid, body in zip(ids, BODIES, strict=True):
        spool._forget(qid)  # read the disk, not what memory keeps of the commit
        with spool.open_body(qid) as f:
            assert f.read() == body
            assert f.seek(9) == 9 and f.read(3) == body[9:12]
        assert spool.body_size(qid) == len(body)
        message = yield spool.load(qid)
        assert (message.queue_id, message.envelope) == (qid, ENV)
    assert (yield spool.list_ids()) == sorted([first, *ids])

    yield spool.stop()
    again = reopened(spool)
    again.start()
    try:
        assert (yield again.list_ids()) == sorted([first, *ids])
        schedule = yield again.load_schedule()
        assert sorted(q for q, _, _ in schedule) == sorted([first, *ids])
        with again.open_body(ids[2]) as f:
            assert f.read() == BODIES[2]
    finally:
        yield again.stop()


@pytest_twisted.inlineCallbacks
def test_a_removal_kills_its_record_durably_and_the_pack_goes_with_the_last(spool):
    first, ids = yield packed(spool)
    pack = ids[0] + ".pack"
    spool.fsync_recorder.events.clear()
    yield spool.remove(ids[1])
    with pytest.raises(KeyError):
        spool.open_body(ids[1])
    yield wait_until(lambda: os.path.join(spool.queue_dir, pack) in spool.fsync_recorder.events)
    assert alive(spool, pack) == {ids[0]: True, ids[1]: False, ids[2]: True, ids[3]: True}

    yield spool.stop()
    again = reopened(spool)
    again.start()
    try:
        assert (yield again.list_ids()) == sorted([first, ids[0], ids[2], ids[3]])
        with pytest.raises(KeyError):
            yield again.load(ids[1])
        for qid in (ids[0], ids[2], ids[3]):
            yield again.remove(qid)
        yield wait_until(lambda: not os.path.exists(os.path.join(again.queue_dir, pack)))
        assert (yield again.list_ids()) == [first]
    finally:
        yield again.stop()


@pytest_twisted.inlineCallbacks
def test_a_saved_message_moves_out_of_its_pack_into_its_own_file(spool):
    first, ids = yield packed(spool)
    pack = ids[0] + ".pack"
    before = os.path.join(spool.tmp_dir, "before.pack")
    shutil.copyfile(os.path.join(spool.queue_dir, pack), before)
    message = yield spool.load(ids[1])
    later = attrs.evolve(message, attempts=1, next_attempt=message.envelope.received_at + 300)
    yield spool.save(later)
    assert os.path.exists(os.path.join(spool.queue_dir, ids[1]))
    assert not os.path.exists(os.path.join(spool.queue_dir, ids[1] + ".env"))
    assert spool.read_message(ids[1]) == later
    with spool.open_body(ids[1]) as f:
        assert f.read() == BODIES[1]
    yield wait_until(lambda: not alive(spool, pack)[ids[1]])  # once its own file is durable
    assert alive(spool, pack) == {ids[0]: True, ids[1]: False, ids[2]: True, ids[3]: True}
    assert (yield spool.list_ids()) == sorted([first, *ids])  # once each
    yield spool.stop()

    # A crash after the move, before the kill reached the disk: both hold the message.
    os.replace(before, os.path.join(spool.queue_dir, pack))
    assert alive(spool, pack)[ids[1]]
    again = reopened(spool)
    again.start()
    try:
        assert (yield again.list_ids()) == sorted([first, *ids])
        assert (yield again.load(ids[1])) == later  # its own file is current
        assert not alive(again, pack)[ids[1]]  # and the stale record is killed
    finally:
        yield again.stop()


@pytest_twisted.inlineCallbacks
def test_the_offline_tools_see_list_move_and_delete_packed_messages(spool):
    first, ids = yield packed(spool)
    yield spool.stop()
    offline = reopened(spool)  # never started: the CLI on a stopped instance
    assert offline.scan_ids() == sorted([first, *ids])
    message = offline.read_message(ids[0])
    with offline.open_body(ids[0]) as f:
        assert f.read() == BODIES[0]
    offline.remove_now(ids[2])
    offline.save_now(attrs.evolve(message, held=True))
    assert offline.scan_ids() == sorted([first, ids[0], ids[1], ids[3]])
    assert reopened(spool).read_message(ids[0]).held
    assert alive(spool, ids[0] + ".pack") == {ids[0]: False, ids[1]: True, ids[2]: False, ids[3]: True}
    with pytest.raises(KeyError):
        reopened(spool).read_message(ids[2])


@pytest_twisted.inlineCallbacks
def test_a_pack_that_cannot_be_made_durable_fails_each_of_its_commits_and_leaves_nothing(tmp_path):
    class FailingPacks(GatedFsync):
        def __call__(self, fd: int) -> None:
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".pack"):
                raise OSError(5, "Input/output error")
            super().__call__(fd)

    fsync = FailingPacks()
    s = FilesystemSpool(str(tmp_path / "spool"), reactor, fsync=fsync)
    s.fsync_recorder = fsync
    s.start()
    try:
        fsync.gate.clear()
        first = store_message(s, b"alone\r\n")
        assert fsync.entered.wait(5)
        rest = [store_message(s, body) for body in BODIES]
        fsync.gate.set()
        first_id = yield first
        outcomes = yield defer.DeferredList(rest, consumeErrors=True)
        for ok, failure in outcomes:
            assert not ok and failure.check(TemporaryFailure)
            assert (failure.value.reply.code, failure.value.reply.enhanced) == (452, "4.3.1")
        assert files(s) == [f"queue/{first_id}"]
        assert (yield s.list_ids()) == [first_id]
    finally:
        yield s.stop()


@pytest_twisted.inlineCallbacks
def test_a_drained_shard_brings_its_packs_along(tmp_path):
    root = str(tmp_path / "spool")
    fsync = GatedFsync()
    shard = FilesystemSpool(shard_path(root, 1), reactor, fsync=fsync)
    shard.fsync_recorder = fsync
    shard.start()
    first, ids = yield packed(shard)
    yield shard.remove(ids[0])
    yield shard.stop()
    assert drain(root, 1) > 0
    target = FilesystemSpool(root, reactor)
    target.start()
    try:
        assert (yield target.list_ids()) == sorted([first, *ids[1:]])
        with target.open_body(ids[3]) as f:
            assert f.read() == BODIES[3]
    finally:
        yield target.stop()
