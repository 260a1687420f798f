"""The spool fixture and its parts: a spool whose fsyncs are recorded and can be held
(``GatedFsync``)."""

from __future__ import annotations

import os
import threading

import pytest
import pytest_twisted
from twisted.internet import reactor

from mailrelay.queue.spool import FilesystemSpool


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
