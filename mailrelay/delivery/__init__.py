"""Delivery: turns routes into attempts over ESMTP — next-hop order, connections, per-recipient results."""

from mailrelay.delivery.smtp import SMTPDeliverer

__all__ = ["SMTPDeliverer"]
