"""What one answer does to a recipient: its new status, who reports a success, and the log line.

Pure functions of values (the log line takes the time it is given), shared by the attempt and by
a store shared with other nodes, which records outcomes as each destination answers.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.logger import Logger

from mailrelay.envelope import (
    QueuedMessage,
    Recipient,
    RecipientState,
    RecipientStatus,
    Reply,
    Route,
)

log = Logger(namespace="mailrelay.queue")


def no_route(recipient: str) -> Reply:
    return Reply(550, "5.1.2", f"no route for <{recipient}>")


def routing_error() -> Reply:
    return Reply(451, "4.3.0", "routing error; will retry")


def delivery_error() -> Reply:
    return Reply(451, "4.3.0", "delivery error; will retry")


def shutdown_reply() -> Reply:
    return Reply(451, "4.3.2", "delivery interrupted by shutdown")


def record(
    status: RecipientStatus, reply: Reply, remote: str | None, success: str = "relayed"
) -> RecipientStatus:
    """A recipient's status after one answer: 2xx delivered, 5xx failed, anything else pending.

    ``success``: who reports a delivery to a sender that asked (see ``RecipientStatus.success``).
    """
    if reply.is_success:
        state = RecipientState.DELIVERED
    elif reply.is_permanent:
        state = RecipientState.FAILED
    else:
        state = RecipientState.PENDING
    return attrs.evolve(
        status,
        state=state,
        attempts=status.attempts + 1,
        last_reply=reply,
        remote=remote,
        success=success if reply.is_success else "",
    )


def success_notice(route: Route, note: tuple[Any, ...]) -> str:
    """Who reports a delivery along ``route`` (RFC 3461 5.2.2).

    We, "delivered", for an LMTP or maildir delivery (final: nobody after us reports, as with
    Postfix's lmtp and local); the next hop when the deliverer noted that it took our DSN request
    (an answer's optional third item is true); else we, "relayed".
    """
    if route.lmtp or route.maildir is not None:
        return "delivered"
    return "passed" if note and note[0] else "relayed"


def rewritten(recipient: Recipient, route: Route) -> Recipient:
    """The recipient as the next hop must see it, keeping the original as ORCPT (RFC 3461)."""
    if not route.recipient or route.recipient == recipient.address:
        return recipient
    return attrs.evolve(
        recipient, address=route.recipient, orcpt=recipient.orcpt or f"rfc822;{recipient.address}"
    )


_OUTCOMES = {RecipientState.DELIVERED: "sent", RecipientState.FAILED: "bounced"}


def log_status(message: QueuedMessage, status: RecipientStatus, started: float, now: float) -> None:
    """One line per recipient and attempt, as Postfix writes it.

    Formatted here with an f-string and handed over as ``log_text`` (one field for the observer
    to format, not eight with format specs); the fields stay in the event for structured (JSON)
    logs.
    """
    reply = status.last_reply
    assert reply is not None
    outcome = _OUTCOMES.get(status.state, "deferred")
    received = message.envelope.received_at
    delay = now - received if received else 0.0
    attempt = now - started
    rcpt = status.recipient.address
    relay = status.remote or "none"
    dsn = reply.enhanced or f"{reply.code // 100}.0.0"
    text = str(reply)
    log.info(
        "{log_text}",
        log_text=f"{message.queue_id}: to=<{rcpt}>, relay={relay}, delay={delay:.2f}, "
        f"delays={attempt:.2f}, dsn={dsn}, status={outcome} ({text})",
        queue_id=message.queue_id,
        rcpt=rcpt,
        relay=relay,
        delay=delay,
        attempt=attempt,
        dsn=dsn,
        status=outcome,
        reply=text,
    )
