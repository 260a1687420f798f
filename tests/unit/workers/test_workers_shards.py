"""Spool shards of worker processes: paths, locks, draining the shards of workers that are gone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from twisted.internet import task

from mailrelay.queue.spool.shards import (
    ShardLock,
    drain,
    shard_path,
    shards_on_disk,
)
from mailrelay.queue.store import QueueIdGenerator, is_queue_id


def commit(path: str, n: int, shard: int) -> dict[str, dict[str, bytes]]:
    """``n`` messages in ``<path>/queue``, as files named after ids minted the way worker ``shard``
    mints them: ``<id>`` (the message) and, for every other one, ``<id>.env`` (its saved state).

    The drain moves a message's files without reading them, whatever the spool's layout; that the
    real spool takes drained mail is tested end to end in test_workers.py.
    """
    q = os.path.join(path, "queue")
    os.makedirs(q, exist_ok=True)
    new_id = QueueIdGenerator(task.Clock(), shard=shard)
    out = {}
    for i in range(n):
        qid = new_id()
        files = {qid: f"message {qid}".encode()}
        if i % 2:
            files[qid + ".env"] = f"state {qid}".encode()
        for name, data in files.items():
            with open(os.path.join(q, name), "wb") as f:
                f.write(data)
        out[qid] = files
    return out


def queued(path: str) -> dict[str, bytes]:
    q = os.path.join(path, "queue")
    if not os.path.isdir(q):
        return {}
    out = {}
    for name in os.listdir(q):
        with open(os.path.join(q, name), "rb") as f:
            out[name] = f.read()
    return out


def files(*messages: dict[str, dict[str, bytes]]) -> dict[str, bytes]:
    return {name: data for m in messages for one in m.values() for name, data in one.items()}


def test_shard_paths_keep_the_first_in_the_spool_itself(tmp_path):
    spool = str(tmp_path / "spool")
    assert shard_path(spool, 0) == spool
    assert shard_path(spool, 3) == os.path.join(spool, "w3")
    assert shards_on_disk(spool) == []
    os.makedirs(os.path.join(spool, "w2"))
    os.makedirs(os.path.join(spool, "w10"))
    os.makedirs(os.path.join(spool, "wx"))
    assert shards_on_disk(spool) == [0, 2, 10]


def test_sharded_ids_are_distinct_and_carry_the_worker():
    clock = task.Clock()
    same = lambda n: b"\xff" * n  # noqa: E731 - the same "random" bytes in every worker
    ids = [QueueIdGenerator(clock, same, shard=k)() for k in range(32)]
    assert len(set(ids)) == 32 and all(is_queue_id(i) for i in ids)
    # the same time and "random" bytes: only the worker's own character (the 11th) differs
    assert len({i[10] for i in ids}) == 32 and len({i[:10] + i[11:] for i in ids}) == 1
    with pytest.raises(ValueError):
        QueueIdGenerator(clock, shard=32)


def test_a_shard_is_locked_by_one_process_at_a_time(tmp_path):
    path = str(tmp_path / "w1")
    lock = ShardLock(path).acquire()
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from mailrelay.queue.spool.shards import ShardLock, ShardBusy\n"
            f"try: ShardLock({path!r}).acquire()\nexcept ShardBusy as e: print(e); sys.exit(3)",
        ],
        capture_output=True,
        text=True,
    )
    assert other.returncode == 3, other.stderr
    assert "in use by another mailrelay process" in other.stdout
    lock.release()
    ShardLock(path).acquire().release()  # free again


def test_drain_moves_every_message_of_the_extra_shards_and_removes_them(tmp_path):
    spool = str(tmp_path / "spool")
    msgs = {k: commit(shard_path(spool, k), 3, k) for k in range(4)}
    os.makedirs(os.path.join(shard_path(spool, 3), "tmp"))
    with open(os.path.join(shard_path(spool, 3), "tmp", "x.body"), "wb") as f:
        f.write(b"never acknowledged")
    assert drain(spool, 2) == 6
    assert shards_on_disk(spool) == [0, 1]
    assert queued(shard_path(spool, 0)) == files(msgs[0], msgs[2])
    assert queued(shard_path(spool, 1)) == files(msgs[1], msgs[3])
    assert drain(spool, 2) == 0


def test_drain_to_one_worker_takes_every_shard(tmp_path):
    spool = str(tmp_path / "spool")
    msgs = [commit(shard_path(spool, k), 2, k) for k in (0, 1, 5)]
    assert drain(spool, 1) == 4
    assert queued(spool) == files(*msgs)
    assert shards_on_disk(spool) == [0]


def test_a_drain_interrupted_after_linking_completes_without_a_second_copy(tmp_path):
    spool = str(tmp_path / "spool")
    msgs = commit(shard_path(spool, 1), 2, 1)
    src, dst = os.path.join(shard_path(spool, 1), "queue"), os.path.join(spool, "queue")
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):  # what a crash right after the links leaves: both shards hold it
        os.link(os.path.join(src, name), os.path.join(dst, name))
    with_state = next(q for q, f in msgs.items() if len(f) == 2)
    os.unlink(
        os.path.join(src, with_state)
    )  # ... and one marker already unlinked, its state not yet
    assert drain(spool, 1) == 2
    assert queued(spool) == files(msgs)
    assert not os.path.exists(shard_path(spool, 1))


def test_a_drain_interrupted_midway_replaces_the_torn_copy(tmp_path):
    spool = str(tmp_path / "spool")
    msgs = commit(shard_path(spool, 1), 2, 1)
    os.makedirs(os.path.join(spool, "queue"), exist_ok=True)
    for (
        qid
    ) in msgs:  # a state file without its message in the target, whether the source has one or not
        with open(os.path.join(spool, "queue", qid + ".env"), "wb") as f:
            f.write(b"torn")
    assert drain(spool, 1) == 2
    assert queued(spool) == files(msgs)


def test_a_shard_run_by_another_process_is_not_drained(tmp_path):
    spool = str(tmp_path / "spool")
    msgs = commit(shard_path(spool, 1), 1, 1)
    held = ShardLock(shard_path(spool, 1)).acquire()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from mailrelay.queue.spool.shards import drain; print(drain({spool!r}, 1))",
            ],
            capture_output=True,
            text=True,
        )
    finally:
        held.release()
    assert proc.stdout.strip() == "0", proc.stderr
    assert {n: d for n, d in queued(shard_path(spool, 1)).items()} == files(msgs)
