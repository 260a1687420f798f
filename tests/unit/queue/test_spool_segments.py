"""Segments: the small messages of each writer batch are appended to one file as a pack.

What must hold as for a message file of its own: each commit fires only once its pack is durable
(and, for the first pack of a segment, the segment's name), each message reads back whole, a
removal or a move out of the segment (on save) survives a restart, a crash between a move and the
kill of the old record shows the message once, a torn append is cut off, a full segment goes with
its last message, and the offline tools and the drain of worker shards see these messages.
"""

from __future__ import annotations

import errno
import os
import shutil
import time

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from mailrelay.errors import TemporaryFailure
from mailrelay.queue.spool import FilesystemSpool, jobs, segments
from mailrelay.queue.spool.format import alive as record_alive
from mailrelay.queue.spool.format import read_segment
from mailrelay.queue.spool.shards import drain, shard_path
from tests.support.queue.spool import ENV, GatedFsync, deferLater, files, store_message

BODIES = [b"Subject: %d\r\n\r\npacked body %d\r\n" % (i, i) for i in range(4)]


@defer.inlineCallbacks
def packed(spool: FilesystemSpool, bodies: list[bytes] = BODIES):  # type: ignore[no-untyped-def]
    """Commit ``bodies`` while the writer is held in the fsync of a first message, so they wait
    together and go into one pack; ``(the first message's id, the packed ids, the segment's
    name)``."""
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
    return ids[0], ids[1:], ids[0] + ".seg"


def reopened(spool: FilesystemSpool) -> FilesystemSpool:
    s = FilesystemSpool(spool.path, reactor, fsync=spool.fsync_recorder, dsync=False)
    s.fsync_recorder = spool.fsync_recorder
    return s


def alive(spool: FilesystemSpool, name: str) -> dict[str, bool]:
    """Each record of a segment on disk, and whether it still holds its message."""
    with open(os.path.join(spool.queue_dir, name), "rb") as f:
        data = f.read()
    return {entry[0]: record_alive(data, entry) for entry in read_segment(data)[0]}


class FailingFsync(GatedFsync):
    """Fails the fsync of the paths that ``fails`` picks, while ``failing``."""

    def __init__(self, fails) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.fails = fails
        self.failing = True

    def __call__(self, fd: int) -> None:
        if self.failing and self.fails(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(5, "Input/output error")
        super().__call__(fd)


@defer.inlineCallbacks
def works_again(s: FilesystemSpool, fsync: FailingFsync):  # type: ignore[no-untyped-def]
    """Nothing of what failed is listed; once fsyncs work again, a new message is stored."""
    assert (yield s.list_ids()) == []
    fsync.failing = False
    later = yield store_message(s, b"once the disk works again\r\n")
    assert (yield s.list_ids()) == [later]
    return later


def wait_until(condition, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    @defer.inlineCallbacks
    def poll():  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "condition not met in time"
            yield deferLater(0.01)

    return poll()


@pytest_twisted.inlineCallbacks
def test_small_messages_are_appended_to_one_segment_durable_before_their_commits_fire(spool):
    fsync = spool.fsync_recorder
    first, ids, segment = yield packed(spool)
    path = os.path.join(spool.queue_dir, segment)
    assert files(spool) == [f"queue/{segment}"]
    # the first pack made the segment: its commit waited for its name's sync of queue/ (and so
    # did the second's, appended before that sync); once it is durable, a pack syncs only itself
    assert fsync.events.count(path) == 2 and fsync.events.count(spool.queue_dir) >= 1
    dir_syncs = fsync.events.count(spool.queue_dir)
    third = yield store_message(spool, b"third\r\n")
    assert fsync.events.count(path) == 3 and fsync.events.count(spool.queue_dir) == dir_syncs
    assert alive(spool, segment) == dict.fromkeys([first, *ids, third], True)
    for qid, body in zip(ids, BODIES, strict=True):
        spool._recent.forget(qid)  # read the disk, not what memory keeps of the commit
        with spool.open_body(qid) as f:
            assert f.read() == body
            assert f.seek(9) == 9 and f.read(3) == body[9:12]
        assert spool.body_size(qid) == len(body)
        message = yield spool.load(qid)
        assert (message.queue_id, message.envelope) == (qid, ENV)
    assert (yield spool.list_ids()) == sorted([first, *ids, third])

    yield spool.stop()
    again = reopened(spool)
    again.start()
    try:
        assert (yield again.list_ids()) == sorted([first, *ids, third])
        schedule = yield again.load_schedule()
        assert sorted(q for q, _, _ in schedule) == sorted([first, *ids, third])
        with again.open_body(ids[2]) as f:
            assert f.read() == BODIES[2]
        newer = yield store_message(again, b"after the restart\r\n")
        assert sorted(files(again)) == sorted(
            [f"queue/{segment}", f"queue/{newer}.seg"]
        )  # a new one
    finally:
        yield again.stop()


@pytest_twisted.inlineCallbacks
def test_a_removal_kills_its_record_durably_and_a_full_segment_goes_with_the_last(spool):
    first, ids, segment = yield packed(spool)
    path = os.path.join(spool.queue_dir, segment)
    synced = spool.fsync_recorder.events.count(path)
    yield spool.remove(ids[1])
    with pytest.raises(KeyError):
        spool.open_body(ids[1])
    yield wait_until(lambda: spool.fsync_recorder.events.count(path) > synced)  # the kill, synced
    assert alive(spool, segment) == {
        first: True,
        ids[0]: True,
        ids[1]: False,
        ids[2]: True,
        ids[3]: True,
    }
    for qid in (first, ids[0], ids[2], ids[3]):
        yield spool.remove(qid)
    yield wait_until(lambda: not any(alive(spool, segment).values()))
    assert os.path.exists(path)  # still the segment new messages go to

    yield spool.stop()  # which makes it full: it goes
    assert not os.path.exists(path)
    assert files(spool) == []


@pytest_twisted.inlineCallbacks
def test_a_removal_survives_a_restart(spool):
    first, ids, segment = yield packed(spool)
    yield spool.remove(ids[1])
    yield spool.stop()
    again = reopened(spool)
    again.start()
    try:
        assert (yield again.list_ids()) == sorted([first, ids[0], ids[2], ids[3]])
        with pytest.raises(KeyError):
            yield again.load(ids[1])
        for qid in (first, ids[0], ids[2], ids[3]):
            yield again.remove(qid)
        path = os.path.join(again.queue_dir, segment)
        yield wait_until(lambda: not os.path.exists(path))  # full since the restart: it goes
        assert (yield again.list_ids()) == []
    finally:
        yield again.stop()


@pytest_twisted.inlineCallbacks
def test_segments_take_packs_up_to_their_size_then_a_new_one_starts(spool, monkeypatch):
    monkeypatch.setattr(segments, "SEGMENT_MAX", 1)  # every pack beyond the first: a new segment
    first, ids, _ = yield packed(spool)
    second = yield store_message(spool, b"third pack\r\n")
    assert files(spool) == sorted(
        [f"queue/{first}.seg", f"queue/{ids[0]}.seg", f"queue/{second}.seg"]
    )
    for qid in ids:
        yield spool.remove(qid)
    yield wait_until(lambda: not os.path.exists(os.path.join(spool.queue_dir, ids[0] + ".seg")))
    assert (yield spool.list_ids()) == sorted([first, second])


@pytest_twisted.inlineCallbacks
def test_a_torn_append_is_cut_off_at_start(spool):
    first, ids, segment = yield packed(spool)
    yield spool.stop()
    path = os.path.join(spool.queue_dir, segment)
    whole = os.path.getsize(path)
    with open(
        path, "ab"
    ) as f:  # what a crash in the middle of an append (never acknowledged) leaves
        f.write(b"MRc1\x00\x10\x00\x00garbage")
    again = reopened(spool)
    again.start()
    try:
        assert (yield again.list_ids()) == sorted([first, *ids])
        assert os.path.getsize(path) == whole
    finally:
        yield again.stop()


@pytest_twisted.inlineCallbacks
def test_a_saved_message_moves_out_of_its_segment_into_its_own_file(spool):
    first, ids, segment = yield packed(spool)
    before = os.path.join(spool.tmp_dir, "before.seg")
    shutil.copyfile(os.path.join(spool.queue_dir, segment), before)
    message = yield spool.load(ids[1])
    later = attrs.evolve(message, attempts=1, next_attempt=message.envelope.received_at + 300)
    yield spool.save(later)
    assert os.path.exists(os.path.join(spool.queue_dir, ids[1]))
    assert not os.path.exists(os.path.join(spool.queue_dir, ids[1] + ".env"))
    assert spool.read_message(ids[1]) == later
    with spool.open_body(ids[1]) as f:
        assert f.read() == BODIES[1]
    yield wait_until(lambda: not alive(spool, segment)[ids[1]])  # once its own file is durable
    assert alive(spool, segment) == {
        first: True,
        ids[0]: True,
        ids[1]: False,
        ids[2]: True,
        ids[3]: True,
    }
    assert (yield spool.list_ids()) == sorted([first, *ids])  # once each
    yield spool.stop()

    # A crash after the move, before the kill reached the disk: both hold the message.
    os.replace(before, os.path.join(spool.queue_dir, segment))
    assert alive(spool, segment)[ids[1]]
    again = reopened(spool)
    again.start()
    try:
        assert (yield again.list_ids()) == sorted([first, *ids])
        assert (yield again.load(ids[1])) == later  # its own file is current
        assert not alive(again, segment)[ids[1]]  # and the stale record is killed
    finally:
        yield again.stop()


@pytest_twisted.inlineCallbacks
def test_the_offline_tools_see_list_move_and_delete_messages_of_segments(spool):
    first, ids, segment = yield packed(spool)
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
    assert alive(spool, segment) == {
        first: True,
        ids[0]: False,
        ids[1]: True,
        ids[2]: False,
        ids[3]: True,
    }
    with pytest.raises(KeyError):
        reopened(spool).read_message(ids[2])


@pytest_twisted.inlineCallbacks
def test_a_pack_that_cannot_be_made_durable_fails_each_of_its_commits_and_is_never_delivered(
    tmp_path,
):
    fsync = FailingFsync(lambda path: path.endswith(".seg"))
    s = FilesystemSpool(str(tmp_path / "spool"), reactor, fsync=fsync, dsync=False)
    s.start()
    try:
        outcomes = yield defer.DeferredList(
            [store_message(s, body) for body in BODIES], consumeErrors=True
        )
        for ok, failure in outcomes:
            assert not ok and failure.check(TemporaryFailure)
            assert (failure.value.reply.code, failure.value.reply.enhanced) == (452, "4.3.1")
        later = yield works_again(s, fsync)
    finally:
        yield s.stop()
    # the failed records were killed: whatever reached the disk never comes back
    again = FilesystemSpool(str(tmp_path / "spool"), reactor)
    assert again.scan_ids() == [later]


@pytest_twisted.inlineCallbacks
def test_a_drained_shard_brings_its_segments_along(tmp_path):
    root = str(tmp_path / "spool")
    fsync = GatedFsync()
    shard = FilesystemSpool(shard_path(root, 1), reactor, fsync=fsync, dsync=False)
    shard.fsync_recorder = fsync
    shard.start()
    first, ids, _ = yield packed(shard)
    yield shard.remove(ids[0])
    yield shard.stop()
    assert drain(root, 1) == 4  # the messages, not the one file that holds them
    target = FilesystemSpool(root, reactor)
    target.start()
    try:
        assert (yield target.list_ids()) == sorted([first, *ids[1:]])
        with target.open_body(ids[3]) as f:
            assert f.read() == BODIES[3]
    finally:
        yield target.stop()


@pytest_twisted.inlineCallbacks
def test_no_pack_of_a_segment_is_acknowledged_before_its_name_is_durable(tmp_path):
    fsync = FailingFsync(lambda path: path == s.queue_dir)
    s = FilesystemSpool(str(tmp_path / "spool"), reactor, fsync=fsync, dsync=False)
    s.fsync_recorder = fsync
    s.start()
    try:
        yield s.list_ids()
        fsync.gate.clear()
        first = store_message(s, b"alone\r\n")
        assert fsync.entered.wait(5)  # the segment's first pack, held in its fsync
        rest = [store_message(s, body) for body in BODIES]  # the second pack, in the same segment
        fsync.gate.set()
        outcomes = yield defer.DeferredList([first, *rest], consumeErrors=True)
        assert [ok for ok, _ in outcomes] == [False] * 5
        yield works_again(s, fsync)
    finally:
        yield s.stop()


@pytest_twisted.inlineCallbacks
def test_a_large_batch_is_split_into_packs_of_bounded_size(spool, monkeypatch):
    monkeypatch.setattr(jobs, "PACK_BYTES", 40)
    first, ids, segment = yield packed(spool)  # four bodies of 29-30 bytes: a pack each
    with open(os.path.join(spool.queue_dir, segment), "rb") as f:
        data = f.read()
    assert data.count(b"MRc1") == 5  # the first message's pack and four more
    assert alive(spool, segment) == dict.fromkeys([first, *ids], True)
    for qid, body in zip(ids, BODIES, strict=True):
        spool._recent.forget(qid)
        with spool.open_body(qid) as f:
            assert f.read() == body


class DirGate(GatedFsync):
    """Holds only the syncs of ``queue/`` shut (while the gate is closed)."""

    def __init__(self, queue_dir: str) -> None:
        super().__init__()
        self.queue_dir = queue_dir

    def __call__(self, fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") != self.queue_dir:
            os.fsync(fd)
            return
        super().__call__(fd)


@pytest_twisted.inlineCallbacks
def test_a_pack_into_a_segment_already_named_does_not_wait_behind_a_sync_of_the_queue_dir(tmp_path):
    path = tmp_path / "spool"
    fsync = DirGate(str(path / "queue"))
    s = FilesystemSpool(str(path), reactor, fsync=fsync, segment_body_max=100, dsync=False)
    s.start()
    try:
        yield store_message(s, b"names the segment\r\n")  # its first pack waited for queue/
        fsync.entered.clear()
        fsync.gate.clear()
        large = store_message(s, b"x" * 200 + b"\r\n")  # a file of its own: waits for queue/
        assert fsync.entered.wait(5)
        small = store_message(s, b"into the named segment\r\n")
        yield wait_until(lambda: small.called)  # answered while that sync is still held
        assert not large.called
        fsync.gate.set()
        assert (yield large) in (yield s.list_ids())
    finally:
        fsync.gate.set()
        yield s.stop()


def dsync(s: FilesystemSpool) -> bool:
    """Whether the spool's packs are still appended with RWF_DSYNC."""
    return s._pipeline.writer.appender.dsync


class SyncWrites:
    """``os.pwritev`` that records each call's flags, or fails with ``errno`` while ``failing``."""

    def __init__(self, errno_: int | None = None) -> None:
        self.flags: list[int] = []
        self.errno = errno_
        self.failing = errno_ is not None
        self.real = os.pwritev

    def __call__(self, fd, buffers, offset, flags=0):  # type: ignore[no-untyped-def]
        self.flags.append(flags)
        if self.failing:
            raise OSError(self.errno, os.strerror(self.errno))
        return self.real(fd, buffers, offset, flags)


def recording_spool(path) -> tuple[FilesystemSpool, list[str]]:  # type: ignore[no-untyped-def]
    """A spool with the system's fsync (so packs are written with RWF_DSYNC where they can be),
    whose fsyncs are then recorded."""
    synced: list[str] = []

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        os.fsync(fd)

    return FilesystemSpool(str(path), reactor, fsync=fsync), synced


@pytest.mark.skipif(not hasattr(os, "RWF_DSYNC"), reason="no RWF_DSYNC on this platform")
@pytest_twisted.inlineCallbacks
def test_packs_are_written_with_rwf_dsync_and_not_fsynced_again(tmp_path, monkeypatch):
    writes = SyncWrites()
    monkeypatch.setattr(os, "pwritev", writes)
    s, synced = recording_spool(tmp_path / "spool")
    s.start()
    try:
        ids = yield defer.gatherResults([store_message(s, body) for body in BODIES])
        more = yield store_message(s, b"a later pack\r\n")
        assert writes.flags and set(writes.flags) == {os.RWF_DSYNC}
        assert not [p for p in synced if p.endswith(".seg")]  # only queue/, for the segment's name
        s._recent.forget(more)
        with s.open_body(more) as f:
            assert f.read() == b"a later pack\r\n"
    finally:
        yield s.stop()
    assert sorted(FilesystemSpool(str(tmp_path / "spool"), reactor).scan_ids()) == sorted(
        [*ids, more]
    )


@pytest.mark.skipif(not hasattr(os, "RWF_DSYNC"), reason="no RWF_DSYNC on this platform")
@pytest_twisted.inlineCallbacks
def test_where_the_kernel_refuses_rwf_dsync_packs_are_fsynced(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "pwritev", SyncWrites(errno.EINVAL))
    s, synced = recording_spool(tmp_path / "spool")
    s.start()
    try:
        qid = yield store_message(s, b"fsynced after all\r\n")
        assert not dsync(s)
        assert [p for p in synced if p.endswith(".seg")] == [
            os.path.join(s.queue_dir, qid + ".seg")
        ]
        s._recent.forget(qid)
        with s.open_body(qid) as f:
            assert f.read() == b"fsynced after all\r\n"
    finally:
        yield s.stop()


@pytest.mark.skipif(not hasattr(os, "RWF_DSYNC"), reason="no RWF_DSYNC on this platform")
@pytest_twisted.inlineCallbacks
def test_a_pack_whose_durable_write_fails_fails_its_commits(tmp_path, monkeypatch):
    writes = SyncWrites(errno.EIO)
    monkeypatch.setattr(os, "pwritev", writes)
    s, _ = recording_spool(tmp_path / "spool")
    s.start()
    try:
        outcomes = yield defer.DeferredList(
            [store_message(s, body) for body in BODIES], consumeErrors=True
        )
        for ok, failure in outcomes:
            assert not ok and failure.check(TemporaryFailure)
        assert dsync(s)  # a failing disk is not a kernel without the flag
        writes.failing = False
        assert (yield s.list_ids()) == []
        later = yield store_message(s, b"once the disk works again\r\n")
        assert (yield s.list_ids()) == [later]
    finally:
        yield s.stop()
