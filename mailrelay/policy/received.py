"""Moved: the Received header is the intake stage's (``mailrelay.intake.received``)."""

from mailrelay.intake.received import (
    address_literal,
    protocol_name,
    received_header,
    separator,
)

__all__ = ["address_literal", "protocol_name", "received_header", "separator"]
