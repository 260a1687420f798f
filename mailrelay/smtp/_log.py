"""The server's log lines: one per accepted message and one per connection, in Postfix's words.

All under the namespace ``mailrelay.smtp.session`` (operators' filters and the docs name it).
"""

from __future__ import annotations

from twisted.logger import Logger

from mailrelay.envelope import Envelope, SessionInfo
from mailrelay.smtp._fast import log_info

log = Logger(namespace="mailrelay.smtp.session")


def accepted(info: SessionInfo, envelope: Envelope, queue_id: str, size: int) -> None:
    log_info(
        log,
        "{queue_id}: client=[{ip}] helo={helo} from=<{sender}> size={size} nrcpt={nrcpt} "
        "proto={proto}{tls}{auth}",
        queue_id=queue_id,
        ip=info.client_address,
        helo=info.helo,
        sender=envelope.sender,
        size=size,
        nrcpt=len(envelope.recipients),
        proto=envelope.protocol,
        tls=f" tls={info.tls.version}" if info.tls else "",
        auth=f" sasl_username={info.auth}" if info.auth else "",
    )


def disconnected(info: SessionInfo, errors: int) -> None:
    log_info(
        log,
        "disconnect from [{ip}]:{port} helo={helo} messages={messages} errors={errors}",
        ip=info.client_address,
        port=info.client_port,
        helo=info.helo,
        messages=info.messages,
        errors=errors,
    )
