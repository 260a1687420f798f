"""The spool fixture and its parts: a spool whose fsyncs are recorded and can be held
(``GatedFsync``); and what the spool tests share: the envelope they store (``ENV``), storing a
body in chunks (``store_message``), the files a spool holds (``files``), a pause on the reactor
(``deferLater``)."""

from __future__ import annotations

import os
import threading

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from mailrelay.envelope import Envelope, Recipient
from mailrelay.queue.spool import FilesystemSpool
from mailrelay.queue.spool.format import SPARE

ENV = Envelope(
    "sender@example.org",
    (Recipient("a@example.test"), Recipient("b@example.test", ("FAILURE",))),
    helo="client.example.org",
    received_at=1700000000.0,
)


class GatedFsync:
    """An fsync that records what it synced and can be held shut, to see what waits for it."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, fd: int) -> None:
        self.entered.set()
        self.gate.wait(10)
        self.events.append(os.readlink(f"/proc/self/fd/{fd}"))
        os.fsync(fd)


def gated_spool(tmp_path, **options):  # type: ignore[no-untyped-def]
    """A started spool whose fsyncs are recorded (``spool.fsync_recorder``); stopped after.
    Packs are fsynced too (``dsync=False``), so the recorder sees every durable write."""
    fsync = GatedFsync()
    options.setdefault("dsync", False)
    s = FilesystemSpool(str(tmp_path / "spool"), reactor, fsync=fsync, **options)
    s.fsync_recorder = fsync
    s.start()
    yield s
    fsync.gate.set()
    pytest_twisted.blockon(s.stop())


@pytest.fixture
def spool(tmp_path):
    yield from gated_spool(tmp_path)


def store_message(spool: FilesystemSpool, body: bytes, chunks: int = 1) -> defer.Deferred[str]:
    """Commit ``body`` under ``ENV``, written in ``chunks`` pieces."""
    w = spool.open(ENV)
    step = max(1, len(body) // chunks)
    for i in range(0, len(body), step):
        w.write(body[i : i + step])
    return w.commit()


def files(spool: FilesystemSpool) -> list[str]:
    """The spool's files, less the spares kept for reuse (tmp/spare.<n>: no message)."""
    out = []
    for d in ("tmp", "queue"):
        out += [f"{d}/{n}" for n in sorted(os.listdir(os.path.join(spool.path, d)))]
    return [f for f in out if not f.startswith("tmp/" + SPARE)]


def deferLater(seconds: float) -> defer.Deferred[None]:
    """Fires after ``seconds`` on the real reactor."""
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)
