"""The filesystem spool: durable before the Deferred fires, group commit, torn writes, failures."""

from __future__ import annotations

import os
import threading

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from zope.interface.verify import verifyObject

from mailrelay.envelope import Envelope, Recipient, RecipientState, RecipientStatus, Reply
from mailrelay.errors import TemporaryFailure
from mailrelay.interfaces import IMessageWriter, IQueueStore
from mailrelay.queue.spool import SEGMENT_BODY_MAX, FilesystemSpool
from mailrelay.queue.spool.format import SPARE, trailer
from mailrelay.queue.spool.fsyncs import PROBE_EVERY, FsyncPool
from mailrelay.queue.spool.spares import SPARES_OPEN
from mailrelay.queue.store import is_queue_id
from tests.support.queue.spool import ENV, GatedFsync, deferLater, files, gated_spool, store_message


@pytest.fixture
def spool(tmp_path):
    """The message-file path of the spool: every message its own file (segments: see
    test_spool_segments.py)."""
    yield from gated_spool(tmp_path, segment_body_max=0)


UNPACKED = (
    b"x" * SEGMENT_BODY_MAX
)  # appended to a body: too large for a segment, it gets a file of its own


def removals_synced(spool: FilesystemSpool) -> int:
    """How many removals a sync of queue/ has made durable."""
    return spool._pipeline.removals_done.synced()


def kept_files(spool: FilesystemSpool) -> list[str]:
    return sorted(n for n in os.listdir(os.path.join(spool.path, "tmp")) if n.startswith(SPARE))


def test_provides_the_interfaces(spool):
    assert verifyObject(IQueueStore, spool)
    w = spool.open(ENV)
    assert verifyObject(IMessageWriter, w)
    assert is_queue_id(w.queue_id)
    w.abort()
    assert files(spool) == []


@pytest_twisted.inlineCallbacks
def test_commit_fires_only_after_the_message_file_and_directory_are_fsynced(spool):
    fsync = spool.fsync_recorder
    yield spool.list_ids()  # the start-up scan is done
    fsync.events.clear()
    fsync.gate.clear()
    fired = []
    d = store_message(spool, b"Subject: x\r\n\r\nhello\r\n", chunks=3)
    d.addCallback(lambda qid: (fired.append(qid), fsync.events.copy())[1])
    # the writer thread is now inside fsync, held: the commit must not have fired
    assert fsync.entered.wait(5)
    for _ in range(20):
        yield deferLater(0.01)
    assert not fired
    fsync.gate.set()
    synced_before_firing = yield d
    qid = fired[0]
    queue_dir = os.path.join(spool.path, "queue")
    # one file, body and envelope together, then the directory: the rename is durable
    assert synced_before_firing == [os.path.join(spool.path, "tmp", qid + ".body"), queue_dir]
    assert files(spool) == [f"queue/{qid}"]
    with spool.open_body(qid) as f:
        assert f.read() == b"Subject: x\r\n\r\nhello\r\n"
    message = yield spool.load(qid)
    assert message.envelope == ENV
    assert [s.state for s in message.statuses] == [RecipientState.PENDING] * 2
    # and what the disk holds, not what memory remembers of the commit
    spool._recent.forget(qid)
    with spool.open_body(qid) as f:
        assert f.read(8) == b"Subject:" and f.read() == b" x\r\n\r\nhello\r\n" and f.read() == b""
        assert (
            f.seek(0, 2) == 21 and f.seek(0) == 0 and f.read(1000) == b"Subject: x\r\n\r\nhello\r\n"
        )
    assert spool.body_size(qid) == 21
    assert spool.read_message(qid) == message


@pytest_twisted.inlineCallbacks
def test_group_commit_makes_many_messages_durable_in_fewer_passes(spool):
    fsync = spool.fsync_recorder
    yield spool.list_ids()
    queue_dir = os.path.join(spool.path, "queue")
    fsync.events.clear()  # every message its own file: one sync of queue/ per writer pass
    fsync.entered.clear()
    fsync.gate.clear()
    first = store_message(spool, b"first\r\n")
    assert fsync.entered.wait(5)  # the writer is busy with the first message
    rest = [store_message(spool, f"message {i}\r\n".encode()) for i in range(20)]
    assert not any(d.called for d in rest)
    fsync.gate.set()
    ids = yield defer.gatherResults([first, *rest])
    assert len(set(ids)) == 21
    passes = fsync.events.count(queue_dir)
    assert passes <= 2  # the first alone, then the twenty that gathered while it synced
    assert sorted(ids) == (yield spool.list_ids())


@pytest_twisted.inlineCallbacks
def test_subscribers_hear_of_each_commit_after_it_is_durable(spool):
    heard = []
    spool.subscribe(
        lambda qid: heard.append((qid, os.path.exists(os.path.join(spool.path, "queue", qid))))
    )
    qid = yield store_message(spool, b"x\r\n")
    assert heard == [(qid, True)]


@pytest_twisted.inlineCallbacks
def test_large_body_streams_to_disk_before_commit(spool):
    w = spool.open(ENV)
    chunk = b"y" * 65536
    for _ in range(64):  # 4 MiB
        w.write(chunk)
    # most of it already left the process's buffers for the temp file
    assert os.path.getsize(os.path.join(spool.path, "tmp", w.queue_id + ".body")) >= 3 * 1024 * 1024
    qid = yield w.commit()
    assert spool.body_size(qid) == 64 * 65536


@pytest_twisted.inlineCallbacks
def test_save_records_state_and_remove_deletes_everything(spool):
    qid = yield store_message(spool, b"x\r\n")
    m = yield spool.load(qid)
    done = RecipientStatus(
        ENV.recipients[0], RecipientState.DELIVERED, 1, Reply(250, "2.0.0", "ok"), "h[1.2.3.4]:25"
    )
    import attrs

    m2 = attrs.evolve(m, statuses=(done, m.statuses[1]), attempts=1, next_attempt=1700000300.0)
    yield spool.save(m2)
    assert (yield spool.load(qid)) == m2
    yield spool.remove(qid)
    assert files(spool) == []
    with pytest.raises(KeyError):
        yield spool.load(qid)
    with pytest.raises(KeyError):
        yield spool.save(m2)  # never resurrects an envelope without its body
    assert files(spool) == []
    with pytest.raises(KeyError):
        yield spool.remove(qid)


@pytest_twisted.inlineCallbacks
def test_torn_writes_are_cleaned_at_start_and_never_listed(tmp_path):
    path = tmp_path / "spool"
    s = FilesystemSpool(str(path), reactor, segment_body_max=0)
    s.start()
    good = yield store_message(s, b"good\r\n")
    yield s.stop()
    # what a crash can leave: a message being received, a state being written, a state left
    # behind by a removal
    (path / "tmp" / "0000000000ZZZZZZZZ.body").write_bytes(b"half a mess")
    (path / "tmp" / "0000000000ZZZZZZZZ.env.1").write_bytes(b"{")
    (path / "queue" / "0000000002ZZZZZZZZ.env").write_bytes(b"{}")
    s2 = FilesystemSpool(str(path), reactor, segment_body_max=0)
    s2.start()
    try:
        ids = yield s2.list_ids()
        assert ids == [good]
        assert files(s2) == [f"queue/{good}"]
    finally:
        yield s2.stop()


@pytest_twisted.inlineCallbacks
def test_unwritable_spool_fails_the_commit_with_452_and_leaves_nothing(spool):
    yield spool.list_ids()  # the start-up scan is done
    tmp = os.path.join(spool.path, "tmp")
    os.rmdir(tmp)
    open(tmp, "w").close()  # tmp/ is now a file: every create in it fails (even as root)
    try:
        w = spool.open(ENV)
        w.write(b"data\r\n")
        with pytest.raises(TemporaryFailure) as e:
            yield w.commit()
        assert (e.value.reply.code, e.value.reply.enhanced) == (452, "4.3.1")
        assert os.listdir(os.path.join(spool.path, "queue")) == []
    finally:
        os.unlink(tmp)
        os.mkdir(tmp)
    # and it works again once the directory is back
    qid = yield store_message(spool, b"again\r\n")
    assert (yield spool.list_ids()) == [qid]


@pytest_twisted.inlineCallbacks
def test_fsync_failure_at_commit_leaves_nothing_behind(tmp_path):
    def failing(fd: int) -> None:
        raise OSError(28, "No space left on device")

    s = FilesystemSpool(str(tmp_path / "spool"), reactor, fsync=failing, segment_body_max=0)
    s.start()
    try:
        with pytest.raises(TemporaryFailure) as e:
            yield store_message(s, b"x" * 10000)
        assert e.value.reply == Reply(452, "4.3.1", "Insufficient system storage")
        assert files(s) == []
    finally:
        yield s.stop()


@pytest_twisted.inlineCallbacks
def test_abort_forgets_the_message(spool):
    w = spool.open(ENV)
    w.write(b"x" * 1000)
    w.abort()
    w.abort()
    assert files(spool) == []
    assert (yield spool.list_ids()) == []


def test_ids_sort_by_time_and_use_the_injected_randomness(tmp_path):
    from twisted.internet.task import Clock

    clock = Clock()
    clock.advance(1700000000)
    s = FilesystemSpool(str(tmp_path / "spool"), clock, randbytes=lambda n: b"\x00" * n)
    a = s.new_id()
    clock.advance(0.002)
    b = s.new_id()
    assert a < b and a.endswith("00000000") and b.endswith("00000000")
    s2 = FilesystemSpool(str(tmp_path / "spool2"), clock, randbytes=lambda n: b"\xff" * n)
    assert s2.new_id()[:10] == b[:10] and s2.new_id() != b


def test_ids_take_their_randomness_from_the_system_a_pool_at_a_time():
    from twisted.internet.task import Clock

    from mailrelay.queue.store import QueueIdGenerator

    asked: list[int] = []

    def randbytes(n: int) -> bytes:
        asked.append(n)
        return os.urandom(n)

    new_id = QueueIdGenerator(Clock(), randbytes)  # one millisecond: only the random part differs
    assert len({new_id() for _ in range(200)}) == 200
    assert asked == [640, 640]  # a system call per 128 ids, not per id


@pytest_twisted.inlineCallbacks
def test_load_schedule_reads_every_message_in_one_pass(spool):
    import attrs

    a = yield store_message(spool, b"a\r\n")
    b = yield store_message(spool, b"b\r\n")
    m = yield spool.load(b)
    yield spool.save(attrs.evolve(m, next_attempt=1700000600.0, held=True))
    assert (yield spool.load_schedule()) == [(a, 0.0, False), (b, 1700000600.0, True)]


@pytest_twisted.inlineCallbacks
def test_first_load_after_commit_is_what_the_disk_holds(spool):
    qid = yield store_message(spool, b"Subject: fresh\r\n\r\nbody\r\n")
    fresh = yield spool.load(qid)  # from memory: what the commit just wrote
    assert fresh == spool.read_message(qid)
    assert (yield spool.load(qid)) == fresh  # read back from the disk
    saved = attrs.evolve(fresh, attempts=3)
    qid2 = yield store_message(spool, b"second\r\n")
    yield spool.save(saved)
    assert (yield spool.load(qid)).attempts == 3
    yield spool.remove(qid2)  # never loaded: its remembered state goes with it
    with pytest.raises(KeyError):
        yield spool.load(qid2)


@pytest_twisted.inlineCallbacks
def test_removal_does_not_hold_up_commits_and_is_synced_when_idle(spool):
    fsync = spool.fsync_recorder
    qid = yield store_message(spool, b"to be removed\r\n")
    yield spool.list_ids()
    fsync.events.clear()
    yield spool.remove(qid)
    queue_dir = os.path.join(spool.path, "queue")
    for _ in range(100):  # the idle remover makes the unlinks durable on its own
        if queue_dir in fsync.events:
            break
        yield deferLater(0.01)
    assert fsync.events == [queue_dir]
    assert files(spool) == []


@pytest_twisted.inlineCallbacks
def test_a_message_delivered_at_its_first_attempt_is_gone_as_soon_as_its_removal_is_answered(spool):
    fsync = spool.fsync_recorder
    qid = yield store_message(spool, b"delivered\r\n")
    saved = yield store_message(spool, b"deferred once\r\n")
    yield spool.save(attrs.evolve((yield spool.load(saved)), attempts=1))
    fsync.gate.clear()  # the remover's directory sync is held: the unlink itself is not
    d = spool.remove(qid)
    assert d.called  # answered at once: no thread hop back for the commonest removal
    with pytest.raises(KeyError):
        yield spool.load(qid)
    with pytest.raises(KeyError):
        spool.open_body(qid)
    with pytest.raises(KeyError):
        yield spool.save(attrs.evolve(spool.read_message(saved), queue_id=qid))
    with pytest.raises(KeyError):
        yield spool.remove(qid)
    assert qid not in (yield spool.list_ids())
    other = spool.remove(saved)  # saved before: answered once the remover has unlinked it
    yield other
    assert not os.path.exists(os.path.join(spool.path, "queue", saved + ".env"))
    for _ in range(100):
        if files(spool) == []:
            break
        yield deferLater(0.01)
    assert files(spool) == []
    fsync.gate.set()
    with pytest.raises(KeyError):
        yield spool.remove(qid)  # and once unlinked, it is simply unknown


@pytest_twisted.inlineCallbacks
def test_small_body_waits_in_memory_and_a_large_one_goes_to_tmp(spool):
    small = spool.open(ENV)
    small.write(b"Subject: small\r\n\r\n" + b"x" * 1000 + b"\r\n")
    assert files(spool) == []  # no file created on the reactor thread for a small message
    large = spool.open(ENV)
    big = b"y" * 100_000 + b"\r\n"
    for _ in range(4):
        large.write(big)
    assert files(spool) == [f"tmp/{large.queue_id}.body"]
    ids = yield defer.gatherResults([small.commit(), large.commit()])
    with spool.open_body(ids[0]) as f:
        assert f.read() == b"Subject: small\r\n\r\n" + b"x" * 1000 + b"\r\n"
    with spool.open_body(ids[1]) as f:
        assert f.read() == big * 4
    assert sorted(files(spool)) == sorted(f"queue/{q}" for q in ids)


def test_a_message_queued_in_format_1_loads_with_its_trust_not_recorded_and_format_2_keeps_it(
    tmp_path,
):
    """Format 2 records whether the client was trusted (who hears of a capability failure);
    a format 1 message, queued before, reads as not recorded (None) in both stores."""
    import json

    from mailrelay.queue.postgres import _decode, _encode
    from mailrelay.queue.store import message_to_dict, new_message

    qid = "0000000001AAAAAAAA"
    v1 = message_to_dict(new_message(qid, ENV))
    v1["version"] = 1
    del v1["envelope"]["trusted"]
    path = tmp_path / "spool"
    (path / "queue").mkdir(parents=True)
    body = b"Subject: old\r\n\r\nx\r\n"
    (path / "queue" / qid).write_bytes(body + trailer(len(body), json.dumps(v1).encode()))
    assert FilesystemSpool(str(path), None).read_message(qid).envelope.trusted is None
    assert _decode(json.dumps(v1)).envelope.trusted is None
    trusted = new_message(qid, attrs.evolve(ENV, trusted=True))
    assert _decode(_encode(trusted)) == trusted and message_to_dict(trusted)["version"] == 2


def _inode(path: str) -> int:
    return os.stat(path).st_ino


@pytest_twisted.inlineCallbacks
def _wait_until(predicate) -> defer.Deferred[None]:
    for _ in range(300):
        if predicate():
            return
        yield deferLater(0.01)
    raise AssertionError("condition not reached")


@pytest_twisted.inlineCallbacks
def test_the_file_of_a_removed_message_is_rewritten_for_the_next_one_once_its_removal_is_durable(
    spool, monkeypatch
):
    fsync = spool.fsync_recorder
    queue_dir = os.path.join(spool.path, "queue")
    long_body = b"x" * 3000 + b"\r\n"
    first = yield store_message(spool, long_body)
    fsync.events.clear()
    yield spool.remove(first)
    # the remover's idle sync covered it (the recorder sees the sync before the spool counts it)
    yield _wait_until(lambda: queue_dir in fsync.events and removals_synced(spool) >= 1)
    (kept,) = kept_files(spool)
    inode = _inode(os.path.join(spool.path, "tmp", kept))
    renames, opens = [], []
    rename, open_ = os.rename, os.open
    monkeypatch.setattr(os, "rename", lambda a, b: (renames.append((a, b)), rename(a, b))[1])
    monkeypatch.setattr(os, "open", lambda p, *a: (opens.append(p), open_(p, *a))[1])
    second = yield store_message(spool, b"short\r\n")
    monkeypatch.undo()
    assert kept_files(spool) == [] and files(spool) == [f"queue/{second}"]
    assert _inode(os.path.join(queue_dir, second)) == inode  # no inode freed, none made
    # written where it was kept, through the descriptor the remover opened, and renamed once:
    # straight into queue/
    assert renames == [(os.path.join(spool.path, "tmp", kept), os.path.join(queue_dir, second))]
    assert opens == []
    yield spool.save(
        attrs.evolve((yield spool.load(second)), attempts=1)
    )  # drops what memory holds
    with spool.open_body(second) as f:
        assert f.read() == b"short\r\n"  # nothing of the longer message it replaced
    assert (yield spool.load(second)).envelope == ENV
    yield spool.stop()
    again = FilesystemSpool(spool.path, reactor, segment_body_max=0)
    again.start()
    try:
        assert (yield again.list_ids()) == [second]
        with again.open_body(second) as f:
            assert f.read() == b"short\r\n"
    finally:
        yield again.stop()


@pytest_twisted.inlineCallbacks
def test_a_kept_file_is_not_rewritten_before_a_sync_covers_its_removal(spool):
    fsync = spool.fsync_recorder
    first = yield store_message(spool, b"first\r\n")
    fsync.gate.clear()  # no sync of queue/ makes the removal durable yet
    yield spool.remove(first)
    yield _wait_until(lambda: kept_files(spool) != [])
    (kept,) = kept_files(spool)
    inode = _inode(os.path.join(spool.path, "tmp", kept))
    d = store_message(spool, b"second\r\n")
    yield _wait_until(lambda: os.listdir(os.path.join(spool.path, "tmp")) != [kept])  # staged
    fsync.gate.set()
    second = yield d
    assert _inode(os.path.join(spool.path, "queue", second)) != inode  # a new file instead
    assert kept_files(spool) == [kept]


@pytest_twisted.inlineCallbacks
def test_a_message_file_being_read_is_unlinked_not_kept(spool):
    first = yield store_message(spool, b"being delivered\r\n")
    yield spool.save(attrs.evolve((yield spool.load(first)), attempts=1))  # read from its file now
    reader = spool.open_body(first)
    yield spool.remove(first)
    assert kept_files(spool) == []
    for _ in range(3):
        yield store_message(spool, b"another message\r\n")
    assert reader.read() == b"being delivered\r\n"
    reader.close()
    assert spool._reader.open_files.count() == 0


class ThreadRecordingFsync(GatedFsync):
    """Also records which thread fsynced each file of ``tmp/`` (the messages, not the directory)."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def __call__(self, fd: int) -> None:
        if "/spool/tmp/" in os.readlink(f"/proc/self/fd/{fd}"):
            self.threads.append(threading.current_thread().name)
        super().__call__(fd)


class TimedFsync(ThreadRecordingFsync):
    """Also a disk whose every fsync takes ``latency`` seconds of the clock ``now`` (the spool's
    timer)."""

    def __init__(self, latency: float) -> None:
        super().__init__()
        self.latency = latency
        self.now = 0.0

    def __call__(self, fd: int) -> None:
        self.now += self.latency
        super().__call__(fd)


@pytest.mark.parametrize(
    ("fsync_threads", "latency", "batch_in"),
    [
        (16, 0.010, "mailrelay-spool-fsync"),  # a slow disk: overlapped
        (16, 0.0001, "mailrelay-spool-writer"),  # a fast one: a hand-off per file would cost more
        (0, 0.010, "mailrelay-spool-writer"),  # no threads at all
    ],
)
@pytest_twisted.inlineCallbacks
def test_the_files_of_a_batch_are_fsynced_in_parallel_only_while_fsyncs_are_slow(
    tmp_path, fsync_threads, latency, batch_in
):
    fsync = TimedFsync(latency)
    spool = FilesystemSpool(
        str(tmp_path / "spool"),
        reactor,
        fsync=fsync,
        fsync_threads=fsync_threads,
        segment_body_max=0,
        timer=lambda: fsync.now,
    )
    spool.start()
    try:
        fsync.gate.clear()
        first = store_message(spool, b"first\r\n")
        assert fsync.entered.wait(5)  # the writer holds the first message's fsync
        # Wait together; too large to be packed, so each has its file.
        batch = [store_message(spool, b"batch %d\r\n" % i + UNPACKED) for i in range(5)]
        fsync.gate.set()
        yield defer.gatherResults([first, *batch])
        assert len(fsync.threads) == 6
        assert fsync.threads[0] == "mailrelay-spool-writer"  # a single file: no hand-off, timed
        assert all(t.startswith(batch_in) for t in fsync.threads[1:]), fsync.threads
    finally:
        fsync.gate.set()
        yield spool.stop()


def test_the_spool_goes_back_to_fsyncing_itself_when_the_disk_gets_fast(tmp_path):
    fsync = TimedFsync(0.010)
    pool = FsyncPool(fsync, 4, lambda: fsync.now)
    pool.start()
    me = threading.current_thread().name
    (tmp_path / "spool" / "tmp").mkdir(parents=True)

    def batch() -> set[str]:
        """Two files synced as the writer would, here: which threads fsynced them."""
        fds = [
            os.open(str(tmp_path / "spool" / "tmp" / f"x{i}"), os.O_WRONLY | os.O_CREAT, 0o600)
            for i in range(2)
        ]
        del fsync.threads[:]
        try:
            assert pool.sync(fds) == [None, None]
        finally:
            for fd in fds:
                os.close(fd)
        return set(fsync.threads)

    try:
        assert batch() == {me}  # nothing known yet: by the caller, timed (10 ms each)
        assert all(batch() != {me} for _ in range(10))  # slow: the syncer threads
        fsync.latency = 0.0001
        kinds = [batch() == {me} for _ in range(4 * PROBE_EVERY)]
        first_serial = kinds.index(True)
        assert first_serial < PROBE_EVERY  # a probe batch, timed
        assert all(kinds[-PROBE_EVERY:]), "fast again: the caller fsyncs every batch"
    finally:
        pool.stop()


def _open_spares(spool: FilesystemSpool) -> list[str]:
    """The kept files this process holds a descriptor on."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(os.path.join(spool.tmp_dir, SPARE)):
            out.append(target)
    return out


@pytest_twisted.inlineCallbacks
def test_the_remover_keeps_a_bounded_number_of_kept_files_open_and_closes_them_at_stop(spool):
    n = SPARES_OPEN + 6
    ids = yield defer.gatherResults(
        [store_message(spool, b"message %d\r\n" % i + UNPACKED) for i in range(n)]
    )
    inodes = {_inode(os.path.join(spool.path, "queue", q)) for q in ids}
    yield defer.gatherResults([spool.remove(q) for q in ids])
    yield _wait_until(lambda: len(kept_files(spool)) == n and removals_synced(spool) >= n)
    assert len(_open_spares(spool)) == SPARES_OPEN  # the rest are opened when their turn comes
    again = yield defer.gatherResults(
        [store_message(spool, b"again %d\r\n" % i + UNPACKED) for i in range(n)]
    )
    assert {
        _inode(os.path.join(spool.path, "queue", q)) for q in again
    } == inodes  # every one reused
    for q in again[-3:]:
        with spool.open_body(q) as f:
            assert f.read().startswith(b"again ")
    yield defer.gatherResults([spool.remove(q) for q in again[:10]])
    yield _wait_until(lambda: len(kept_files(spool)) == 10)
    yield _wait_until(lambda: len(_open_spares(spool)) == 10)
    yield spool.stop()
    assert _open_spares(spool) == []
    assert len(kept_files(spool)) == 10  # left for the next start to remove


DUPLICATES = Envelope(
    "sender@example.org",
    (
        Recipient("dup@local.test", ("FAILURE",), "rfc822;dup@local.test"),
        Recipient("other@local.test"),
        Recipient("dup@local.test", ("SUCCESS",)),
        Recipient("dup@LOCAL.TEST"),
        Recipient("Dup@local.test"),
    ),
    received_at=1700000000.0,
)


@pytest_twisted.inlineCallbacks
def test_duplicate_recipients_are_queued_once_with_the_first_ones_dsn_parameters(spool):
    """As Postfix's cleanup does: same exact local part, same domain (any case) → one recipient."""
    w = spool.open(DUPLICATES)
    w.write(b"Subject: dup\r\n\r\nbody\r\n")
    qid = yield w.commit()
    want = (
        Recipient("dup@local.test", ("FAILURE",), "rfc822;dup@local.test"),
        Recipient("other@local.test"),
        Recipient("Dup@local.test"),
    )  # local parts are case-sensitive (RFC 5321 2.4)
    for message in ((yield spool.load(qid)), spool.read_message(qid)):
        assert message.envelope.recipients == want
        assert tuple(s.recipient for s in message.statuses) == want
