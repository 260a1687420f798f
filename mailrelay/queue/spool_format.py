"""Moved to ``mailrelay.queue.spool.format``; kept for ``mailrelay.workers.shards``, which imports
``SEGMENT``, ``alive`` and ``read_segment`` from here (another part of issue 20 owns that file)."""

from mailrelay.queue.spool.format import SEGMENT, alive, read_segment

__all__ = ["SEGMENT", "alive", "read_segment"]
