"""The queue answers *when*: durable storage (``FilesystemSpool``), scheduling and retries
(``QueueManager``), expiry and reports to the sender (``Notifier``, RFC 3464 in ``bounce``)."""

from mailrelay.queue.manager import QueueManager
from mailrelay.queue.notify import Notifier
from mailrelay.queue.spool import FilesystemSpool

__all__ = ["FilesystemSpool", "Notifier", "QueueManager"]
