"""Where ``mailrelay queue`` gets its answers: a running instance over its control socket
(``Online``), the queue of a stopped one read and edited directly (``Offline``, on any
``IOfflineQueue``; ``OfflineDatabase`` for the shared PostgreSQL queue, an
``IOfflineSharedQueue``), or every spool shard of an instance with ``[server] workers > 1`` as one
queue (``Merged``). Each answers ``list``, ``show``, ``summary``, ``flush`` and ``act`` with
Deferreds of plain JSON-able values, which ``mailrelay.cli`` prints.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Generator, Iterable
from typing import Any, TypeAlias

import attrs
from twisted.internet import defer

from mailrelay import config as configmod
from mailrelay.control import info as infomod
from mailrelay.interfaces import IOfflineQueue, IOfflineSharedQueue

#: What an ``inlineCallbacks`` generator yields and is sent: Deferreds and their results.
Steps: TypeAlias = Generator[defer.Deferred[Any], Any, Any]


class CLIError(Exception):
    """A failure to report in one line, without a traceback."""


class Online:
    """A running instance, over its control socket."""

    def __init__(self, proto: Any) -> None:
        from mailrelay.control import protocol

        self.proto = proto
        self.p = protocol

    def list(self, after: str | None, limit: int) -> defer.Deferred[Any]:
        d = self.proto.callRemote(self.p.ListQueue, after=after, limit=limit)
        return d.addCallback(lambda r: (r["messages"], r["more"]))

    def show(self, queue_id: str) -> defer.Deferred[Any]:
        return self.proto.callRemote(self.p.ShowMessage, queue_id=queue_id).addCallback(
            lambda r: r["message"]
        )

    def summary(self) -> defer.Deferred[Any]:
        return self.proto.callRemote(self.p.Summary).addCallback(lambda r: r["summary"])

    def flush(self, queue_id: str | None) -> defer.Deferred[Any]:
        return self.proto.callRemote(self.p.Flush, queue_id=queue_id).addCallback(
            lambda r: r["count"]
        )

    def act(self, action: str, queue_id: str) -> defer.Deferred[Any]:
        command = {"delete": self.p.Delete, "hold": self.p.Hold, "release": self.p.Release}[action]
        return self.proto.callRemote(command, queue_id=queue_id)


class Offline:
    """A stopped instance: its queue (an ``IOfflineQueue``), read and edited directly."""

    def __init__(self, queue: Any) -> None:
        if not IOfflineQueue.providedBy(queue):
            raise TypeError(f"{queue!r} is not an IOfflineQueue")
        self.queue: Any = queue  # Any: mypy sees no zope interface as a type

    def _info(self, queue_id: str) -> dict[str, Any]:
        message = self.queue.read_message(queue_id)
        return infomod.message_info(message, self.queue.body_size(queue_id))

    def _infos(self, ids: Iterable[str]) -> list[dict[str, Any]]:
        out = []
        for qid in ids:
            try:
                out.append(self._info(qid))
            except (KeyError, FileNotFoundError):
                continue
        return out

    def list(self, after: str | None, limit: int) -> defer.Deferred[Any]:
        ids = [i for i in self.queue.scan_ids() if not after or i > after]
        return defer.succeed((self._infos(ids[:limit]), len(ids) > limit))

    def show(self, queue_id: str) -> defer.Deferred[Any]:
        return defer.maybeDeferred(
            lambda: infomod.message_detail(
                self.queue.read_message(queue_id), self.queue.open_body(queue_id)
            )
        )

    def summary(self) -> defer.Deferred[Any]:
        return defer.succeed(infomod.summary(self._infos(self.queue.scan_ids()), time.time()))

    def flush(self, queue_id: str | None) -> defer.Deferred[Any]:
        return defer.fail(
            CLIError("mailrelay is not running: messages are attempted when it starts")
        )

    def act(self, action: str, queue_id: str) -> defer.Deferred[Any]:
        def run() -> None:
            if action == "delete":
                self.queue.remove_now(queue_id)
                return
            message = self.queue.read_message(queue_id)
            if action == "hold":
                self.queue.save_now(attrs.evolve(message, held=True))
            else:
                self.queue.save_now(attrs.evolve(message, held=False, next_attempt=0.0))

        return defer.maybeDeferred(run)


def offline_spool(spool_path: str) -> Offline:
    """The filesystem spool of a stopped instance."""
    from mailrelay.queue.spool import FilesystemSpool

    if not os.path.isdir(os.path.join(spool_path, "queue")):
        raise CLIError(f"no spool at {spool_path} (and no running instance)")
    return Offline(FilesystemSpool(spool_path, None))


class OfflineDatabase(Offline):
    """No instance answers here: the shared PostgreSQL queue (every node's), read and edited
    directly (an ``IOfflineSharedQueue``)."""

    def __init__(self, queue: Any) -> None:
        if not IOfflineSharedQueue.providedBy(queue):
            raise TypeError(f"{queue!r} is not an IOfflineSharedQueue")
        super().__init__(queue)

    @classmethod
    def connect(cls, dsn: str | None) -> OfflineDatabase:
        from mailrelay.queue.postgres import PostgresQueueReader

        return cls(PostgresQueueReader(dsn or ""))

    def flush(self, queue_id: str | None) -> defer.Deferred[Any]:
        """Due now in the shared tables; the nodes running elsewhere hear of it and attempt it."""

        def run() -> int:
            if queue_id is not None:
                from mailrelay.control.protocol import MessageHeld

                if self.queue.read_message(queue_id).held:  # KeyError: no such message
                    raise MessageHeld(queue_id)
            return len(self.queue.make_due(queue_id, time.time()))

        return defer.maybeDeferred(run)

    def act(self, action: str, queue_id: str) -> defer.Deferred[Any]:
        """As on a stopped spool; a released message is also made due the way ``flush`` does it,
        whose ``NOTIFY`` wakes the running nodes at once (not at their next scan)."""
        d = super().act(action, queue_id)
        if action == "release":
            d.addCallback(lambda _: self.queue.make_due(queue_id, time.time()))
        return d


class Merged:
    """Every spool shard of an instance with ``[server] workers > 1``, as one queue.

    Each shard answers for itself (its worker over its control socket, or its directory when
    that worker is not running); lists are merged in id order, a command about one message goes
    to the shard that has it.
    """

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts

    @defer.inlineCallbacks
    def list(self, after: str | None, limit: int) -> Steps:
        infos, more = [], False
        for part in self.parts:
            page, part_more = yield part.list(after, limit)
            infos += page
            more = more or part_more
        infos.sort(key=lambda m: m["queue_id"])
        return infos[:limit], more or len(infos) > limit

    @defer.inlineCallbacks
    def _first(self, call: Callable[[Any], defer.Deferred[Any]]) -> Steps:
        """``call`` on each shard until one has the message (the others raise KeyError)."""
        for part in self.parts:
            try:
                return (yield call(part))
            except KeyError:
                continue
        raise KeyError("no such message")

    def show(self, queue_id: str) -> defer.Deferred[Any]:
        return self._first(lambda part: part.show(queue_id))

    def act(self, action: str, queue_id: str) -> defer.Deferred[Any]:
        return self._first(lambda part: part.act(action, queue_id))

    @defer.inlineCallbacks
    def flush(self, queue_id: str | None) -> Steps:
        online = [p for p in self.parts if isinstance(p, Online)]
        if not online:
            raise CLIError("mailrelay is not running: messages are attempted when it starts")
        if queue_id is not None:
            return (yield Merged(online)._first(lambda part: part.flush(queue_id)))
        counts = yield defer.gatherResults([p.flush(None) for p in online], consumeErrors=True)
        return sum(counts)

    @defer.inlineCallbacks
    def summary(self) -> Steps:
        summaries = []
        for part in self.parts:
            summaries.append((yield part.summary()))
        return merge_summaries(summaries)


def merge_summaries(summaries: list[dict[str, Any]], top: int = 50) -> dict[str, Any]:
    """Several shards' ``queue summary`` as one: counts added up by domain and age bucket.

    Exact unless a shard had more than ``top`` domains itself (its smallest are then in its
    ``more_domains`` count only).
    """
    rows: dict[str, list[int]] = {}
    first = summaries[0]
    totals = [0] * len(first["total"])
    for s in summaries:
        totals = [a + b for a, b in zip(totals, s["total"], strict=True)]
        for domain, counts in s["rows"]:
            row = rows.setdefault(domain, [0] * len(counts))
            rows[domain] = [a + b for a, b in zip(row, counts, strict=True)]
    ordered = sorted(rows.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    return {
        "buckets": first["buckets"],
        "messages": sum(s["messages"] for s in summaries),
        "held": sum(s["held"] for s in summaries),
        "total": totals,
        "rows": [[domain, counts] for domain, counts in ordered[:top]],
        "more_domains": max(len(ordered) - top, 0) + sum(s["more_domains"] for s in summaries),
    }


def shard_paths(cfg: configmod.Config) -> list[str]:
    """The spool directories of the instance: one per worker, and any a larger run left behind."""
    from mailrelay.queue.spool.shards import shard_path, shards_on_disk

    indexes = set(range(cfg.server.workers)) | set(shards_on_disk(cfg.spool.path))
    return [shard_path(cfg.spool.path, k) for k in sorted(indexes)]


def open_queue(reactor: Any, args: argparse.Namespace) -> defer.Deferred[Any]:
    """The queue that ``args`` (``--config``, ``--socket``) name, as one of the classes above."""
    from mailrelay.control.client import connect, is_listening
    from mailrelay.control.server import socket_path

    cfg = configmod.load(args.config)
    paths = shard_paths(cfg)
    if args.socket or len(paths) == 1:
        path = args.socket or socket_path(cfg.spool.path)
        if is_listening(path):
            return connect(reactor, path).addCallback(Online)
        if cfg.spool.backend == "postgresql":
            return defer.maybeDeferred(OfflineDatabase.connect, cfg.spool.dsn)
        return defer.maybeDeferred(offline_spool, cfg.spool.path)
    sockets = [socket_path(p) for p in paths]
    if cfg.spool.backend == "postgresql":  # every worker sees the whole shared queue: ask one
        live = next((s for s in sockets if is_listening(s)), None)
        if live is not None:
            return connect(reactor, live).addCallback(Online)
        return defer.maybeDeferred(OfflineDatabase.connect, cfg.spool.dsn)
    return _shards(reactor, paths, sockets)


@defer.inlineCallbacks
def _shards(reactor: Any, paths: list[str], sockets: list[str]) -> Steps:
    from mailrelay.control.client import connect, is_listening

    parts: list[Any] = []
    for path, sock in zip(paths, sockets, strict=True):
        if is_listening(sock):
            parts.append(Online((yield connect(reactor, sock))))
        elif os.path.isdir(os.path.join(path, "queue")):
            parts.append(offline_spool(path))
    if not parts:
        raise CLIError(f"no spool at {paths[0]} (and no running instance)")
    return Merged(parts)
