"""Delivery: turns routes into attempts — over ESMTP/LMTP (next-hop order, connections,
per-recipient results) or into a local Maildir."""

from mailrelay.delivery.by_route import ByRouteDeliverer
from mailrelay.delivery.maildir import MaildirDeliverer
from mailrelay.delivery.smtp import SMTPDeliverer

__all__ = ["ByRouteDeliverer", "MaildirDeliverer", "SMTPDeliverer"]
