"""The listing of ``queue/``, and at start the repair of what a crash left.

A crash leaves at worst files in ``tmp/`` (a message being received, a state being written, a
spare), a torn append at a segment's end, a record whose message also has its own file (moved out
of its segment, the erasure not yet durable), or a state without its message in ``queue/`` (a
removal cut in half: the message goes first). None of them was acknowledged, or all of it is in
the other copy: each is removed (or cut off), never delivered. Runs in the writer thread (a
``jobs.Scan``), so no commit is seen half done.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from twisted.logger import Logger

from mailrelay.queue.spool.format import SEGMENT, SPARE, STATE
from mailrelay.queue.spool.segments import read_segments, unlink
from mailrelay.queue.store import is_queue_id

if TYPE_CHECKING:
    from mailrelay.queue.spool.pipeline import IdSet, Pipeline

log = Logger()


def list_queue(queue_dir: str) -> tuple[set[str], set[str], list[str]]:
    """The names in ``queue/``: messages with a file of their own, saved states, segments."""
    messages, states, segments = set(), set(), []
    for entry in os.scandir(queue_dir):
        stem, ext = os.path.splitext(entry.name)
        if not is_queue_id(stem):
            continue
        if not ext:
            messages.add(stem)
        elif ext == STATE:
            states.add(stem)
        elif ext == SEGMENT:
            segments.append(entry.name)
    return messages, states, segments


def scan(p: Pipeline, removing: IdSet, receiving: IdSet | None) -> tuple[list[str], set[str]]:
    """The committed ids, sorted, and those of them with a saved state.

    At start (``receiving`` given: the messages being received, whose files stay) it also removes
    what a crash left in ``tmp/`` and repairs the segments (see ``segments.read_segments``).
    """
    if receiving is not None:
        for entry in os.scandir(p.tmp_dir):
            if entry.name.startswith(SPARE):
                unlink(entry.path)  # kept for reuse by an earlier run: nothing to report
            elif entry.name not in receiving:
                log.info("spool: removing incomplete file tmp/{name}", name=entry.name)
                unlink(entry.path)
    # Taken before the listing: the remover forgets an id only after its file is gone.
    removed = removing.copy()
    messages, states, segments = list_queue(p.queue_dir)
    if receiving is not None:
        p.index.replace(read_segments(p.queue_dir, segments, messages, repair=True, fsync=p.fsync))
    for stem in states - messages:
        log.warn("spool: removing envelope without message queue/{name}", name=stem + STATE)
        unlink(p.reader.path(stem, STATE))
    messages.update(p.index.ids())
    messages -= removed  # answered as removed, not unlinked yet
    return sorted(messages), states & messages
