"""One filesystem spool per worker process ("shard"), each locked by the one process that runs it.

The filesystem spool assumes a single process (one writer thread, one scheduler, an in-memory
schedule), so ``[server] workers = N`` splits ``[spool] path`` into N shards: shard 0 is the path
itself (so one worker, or a spool from before, is unchanged) and shard k is ``<path>/w<k>``. A
process takes ``flock(LOCK_EX)`` on the shard's directory before it opens the shard and holds it
while it runs, so no shard is ever run by two processes; the kernel drops the lock when the process
dies, however it dies.

When an instance starts with fewer workers than shards on disk, ``drain`` moves the messages of
every shard k >= N into shard k mod N before any worker opens either. Each message's files are
*hard-linked* into the target (the one marking the commit last), the target directory fsynced,
and only then unlinked from the source: at every instant at least one shard holds the whole
message, so a crash mid-drain loses nothing, and the next start completes the move (links
replace what a torn one left) before any worker runs, so nothing is delivered twice either.
Whatever sits in the drained shard's ``tmp/`` was never acknowledged and goes with it.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import re

from twisted.logger import Logger

from mailrelay._files import fsync_dir
from mailrelay.queue.spool.format import SEGMENT, alive, read_segment
from mailrelay.queue.store import is_queue_id

log = Logger(namespace="mailrelay.workers")

_SHARD_DIR = re.compile(r"^w([1-9][0-9]*)$")
_ENV = ".env"


class ShardBusy(Exception):
    """Another live process holds the shard's lock."""


def shard_path(spool_path: str, index: int) -> str:
    """Where worker ``index`` keeps its spool: the path itself for 0, ``<path>/w<index>`` after."""
    return spool_path if index == 0 else os.path.join(spool_path, f"w{index}")


def shards_on_disk(spool_path: str) -> list[int]:
    """The shard numbers with a directory under ``spool_path`` (0 first, when the path exists)."""
    try:
        names = os.listdir(spool_path)
    except FileNotFoundError:
        return []
    found = [
        int(m.group(1))
        for n in names
        if (m := _SHARD_DIR.match(n)) and os.path.isdir(os.path.join(spool_path, n))
    ]
    return [0, *sorted(found)]


class ShardLock:
    """An exclusive ``flock`` on the shard's directory, never waiting: busy raises ``ShardBusy``.

    Locking the directory leaves no file behind in the spool, and the kernel drops the lock when
    the holder's process ends, however it ends.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> ShardLock:
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ShardBusy(f"{self.path} is in use by another mailrelay process") from None
            raise
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # closing the last descriptor drops the lock

    def __enter__(self) -> ShardLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def drain(spool_path: str, workers: int, held: dict[int, ShardLock] | None = None) -> int:
    """Move the messages of shards >= ``workers`` into shard k mod ``workers``; how many moved.

    Takes each shard's lock while it works on it (``held`` maps shards whose lock the caller
    already holds). A shard another process holds is left alone (logged). An emptied shard
    directory is removed.
    """
    held = held or {}
    moved = 0
    for k in shards_on_disk(spool_path):
        if k < workers:
            continue
        source, target = shard_path(spool_path, k), shard_path(spool_path, k % workers)
        try:
            with _locked(source, held.get(k)), _locked(target, held.get(k % workers)):
                n = _move_messages(source, target)
        except ShardBusy as e:
            log.error("not draining a spool shard: {error}", error=str(e))
            continue
        moved += n
        log.info(
            "spool shard {source} drained into {target}: {n} messages (workers = {workers})",
            source=source,
            target=target,
            n=n,
            workers=workers,
        )
        _remove_shard(source)
    return moved


class _locked:
    """The lock of ``path`` for a ``with`` block, unless the caller already holds it."""

    def __init__(self, path: str, already: ShardLock | None) -> None:
        self.lock = None if already is not None else ShardLock(path)

    def __enter__(self) -> None:
        if self.lock is not None:
            self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        if self.lock is not None:
            self.lock.release()


def _messages(queue_dir: str) -> dict[str, list[str]]:
    """The files of each message in a ``queue/`` directory, by queue id, in the order to link them.

    Whatever the spool's layout (``<id>``, ``<id>.env``, or the older ``<id>.body`` + ``<id>.env``)
    every file named after a queue id belongs to that message and moves with it; the file that
    marks the commit (the bare ``<id>``, else the ``.env``) is linked last. A segment
    (``<id>.seg``, named after its first message) moves whole, with every message it holds.
    """
    try:
        names = os.listdir(queue_dir)
    except FileNotFoundError:
        return {}
    out: dict[str, list[str]] = {}
    for name in names:
        stem = name.split(".", 1)[0]
        if is_queue_id(stem):
            out.setdefault(stem, []).append(name)
    for stem, files in out.items():
        files.sort(key=functools.partial(_file_order, stem))
    return dict(sorted(out.items()))


def _file_order(stem: str, name: str) -> tuple[bool, bool, str]:
    """Sort key of one message's files: the one that marks the commit last."""
    return (name == stem, name.endswith(_ENV), name)


def _move_messages(source: str, target: str) -> int:
    src_q, dst_q = os.path.join(source, "queue"), os.path.join(target, "queue")
    os.makedirs(dst_q, mode=0o700, exist_ok=True)
    messages = _messages(src_q)
    present = _messages(dst_q)
    for stem, files in messages.items():
        if (
            stem in files
        ):  # the source still holds the whole message: the target gets exactly its files
            for name in set(present.get(stem, ())) - set(files):
                _unlink(os.path.join(dst_q, name))  # torn by an earlier drain (e.g. a stale state)
        for name in files:
            _link(os.path.join(src_q, name), os.path.join(dst_q, name))
    fsync_dir(dst_q)  # every message is whole in the target before any leaves the source
    moved = sum(_held(dst_q, stem, files) for stem, files in messages.items())
    for files in messages.values():
        for name in reversed(files):  # the commit marker first, as the spool removes
            _unlink(os.path.join(src_q, name))
    fsync_dir(src_q)
    return moved


def _held(queue_dir: str, stem: str, files: list[str]) -> int:
    """How many messages the files of ``stem`` hold: its own, and those of its segment."""
    n = int(any(not name.endswith(SEGMENT) for name in files))
    for name in files:
        if name.endswith(SEGMENT):
            try:
                with open(os.path.join(queue_dir, name), "rb") as f:
                    data = f.read()
            except OSError:
                continue
            n += sum(alive(data, entry) for entry in read_segment(data)[0])
    return n


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except FileExistsError:  # a torn earlier drain left it: replace it with the source's
        os.unlink(dst)
        os.link(src, dst)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_shard(path: str) -> None:
    """Remove a drained shard: what is left is incomplete files (never acknowledged) and sockets."""
    if _messages(os.path.join(path, "queue")):
        return  # a message arrived meanwhile (cannot happen under the lock, but never delete mail)
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            _unlink(os.path.join(root, name))
        for name in dirs:
            try:
                os.rmdir(os.path.join(root, name))
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError as e:
        log.warn("drained spool shard {path} not removed: {error}", path=path, error=str(e))
