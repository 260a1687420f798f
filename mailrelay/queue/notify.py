"""What the sender hears: expiry of what waited too long, and RFC 3464 reports of each attempt.

Reports are injected into the store as new messages from ``<>``, so they are delivered (and
retried) like any other; the queue manager calls ``settle`` after every attempt. They are written
through ``sink`` (by default the store itself): the relay passes the same door the SMTP server
writes through, so a report is signed at intake like any mail (DKIM, for our hostname's domain).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from mailrelay.config import QueueConfig
from mailrelay.envelope import Envelope, QueuedMessage, RecipientState, RecipientStatus
from mailrelay.interfaces import IMessageSink, IQueueStore
from mailrelay.queue import schedule
from mailrelay.queue.bounce import Action, build_report, capability_failure, report_envelope, wants

log = Logger(namespace="mailrelay.queue")


class Notifier:
    """Expires messages and queues failure, delay and success reports for their senders.

    A failure for a capability the next hop lacks (see ``capability_failure``) is reported only
    to a trusted sender (``sender_trusted``): anyone else could forge the sender and have us send
    the report, with their text in it, to a victim (backscatter). It is logged instead. Any other
    report to an untrusted sender returns only the original's header (as RET=HDRS).
    """

    def __init__(
        self,
        store: IQueueStore,
        clock: Any,
        config: QueueConfig,
        hostname: str,
        trusted_client: Callable[[str], bool] = lambda address: False,
        sink: IMessageSink | None = None,
    ) -> None:
        self.store = store
        self.sink: Any = store if sink is None else sink  # Any: a zope interface is no type
        self.clock = clock
        self.config = config
        self.hostname = hostname
        self.trusted_client = trusted_client  # is this client address in the trusted networks?

    def sender_trusted(self, envelope: Envelope) -> bool:
        """What the server recorded; else (queued before it did, or injected by an embedder)
        judged now: authenticated, from a trusted network, or not from the network at all."""
        if envelope.trusted is not None:
            return envelope.trusted
        return (
            envelope.auth is not None
            or not envelope.client_address
            or self.trusted_client(envelope.client_address)
        )

    def settle(self, message: QueuedMessage, tried: list[int]) -> defer.Deferred[QueuedMessage]:
        """Expire what is too old, then report to the sender what this attempt settled
        (RFC 3464)."""
        if not message.pending and all(
            message.statuses[i].state is RecipientState.DELIVERED
            and not _ours_to_report(message.statuses[i])
            for i in tried
        ):
            return defer.succeed(message)  # the common case: all relayed, nothing to report
        now = self.clock.seconds()
        if (
            message.pending
            and all(message.statuses[i].state is RecipientState.PENDING for i in tried)
            and not schedule.is_expired(message, self.config.max_lifetime, now)
            and not schedule.needs_delay_warning(message, self.config.delay_warning, now)
        ):
            return defer.succeed(message)  # only waited (a busy destination): nothing to report
        return self._settle(message, tried)

    @defer.inlineCallbacks
    def _settle(
        self, message: QueuedMessage, tried: list[int]
    ) -> Generator[defer.Deferred[Any], Any, QueuedMessage]:
        now = self.clock.seconds()
        statuses = list(message.statuses)
        failed = [statuses[i] for i in tried if statuses[i].state is RecipientState.FAILED]
        succeeded = [statuses[i] for i in tried if _ours_to_report(statuses[i])]
        relayed = [s for s in succeeded if s.success != "delivered"]
        delivered = [s for s in succeeded if s.success == "delivered"]
        if message.pending and schedule.is_expired(message, self.config.max_lifetime, now):
            for i, s in enumerate(statuses):
                if s.state is RecipientState.PENDING:
                    statuses[i] = attrs.evolve(s, state=RecipientState.FAILED)
                    failed.append(statuses[i])
                    log.info(
                        "{queue_id}: to=<{rcpt}>, status=expired, returned to sender ({reply})",
                        queue_id=message.queue_id,
                        rcpt=s.recipient.address,
                        reply=str(s.last_reply) if s.last_reply else "never attempted",
                    )
            message = attrs.evolve(message, statuses=tuple(statuses))
        if failed:
            yield self.report(message, failed, Action.FAILED)
        if relayed:
            yield self.report(message, relayed, Action.RELAYED)
        if delivered:
            yield self.report(message, delivered, Action.DELIVERED)
        if message.pending and schedule.needs_delay_warning(
            message, self.config.delay_warning, now
        ):
            yield self.report(
                message,
                list(message.pending),
                Action.DELAYED,
                until=schedule.expires_at(message, self.config.max_lifetime),
            )
            message = attrs.evolve(message, warned=True)
        return message

    @defer.inlineCallbacks
    def report(
        self,
        message: QueuedMessage,
        statuses: list[RecipientStatus],
        action: Action,
        until: float | None = None,
    ) -> Generator[defer.Deferred[Any], Any, None]:
        """Inject one report for ``statuses`` into the store; it is delivered like any message."""
        qid = message.queue_id
        sender = message.envelope.sender
        if sender:
            chosen = [s for s in statuses if wants(s.recipient, action)]
            trusted = self.sender_trusted(message.envelope)
            if not trusted and message.envelope.ret != "HDRS":
                # The sender may be forged: return its header only, never a text of its choosing
                # to whoever it named (RET=FULL and NOTIFY=SUCCESS would reflect it at will).
                message = attrs.evolve(message, envelope=attrs.evolve(message.envelope, ret="HDRS"))
            if action is Action.FAILED and not trusted:
                withheld = [s for s in chosen if capability_failure(s)]
                if withheld:
                    log.info(
                        "{queue_id}: no non-delivery notification to untrusted sender <{sender}>"
                        " for {rcpts}: the next hop cannot take the message, which any client"
                        " could cause",
                        queue_id=qid,
                        sender=sender,
                        rcpts=", ".join(f"<{s.recipient.address}>" for s in withheld),
                    )
                    chosen = [s for s in chosen if not capability_failure(s)]
            to = sender
        else:
            # Never a report to <>. A failed bounce (double bounce) goes to the postmaster, if any.
            chosen = statuses if action is Action.FAILED else []
            postmaster = self.config.postmaster
            if chosen and (
                not postmaster
                or all(s.recipient.address.lower() == postmaster.lower() for s in chosen)
            ):
                log.warn(
                    "{queue_id}: undeliverable notification dropped (double bounce) for {rcpts}",
                    queue_id=qid,
                    rcpts=", ".join(f"<{s.recipient.address}>" for s in chosen),
                )
                return
            to = postmaster or ""
        if not chosen:
            return
        now = self.clock.seconds()
        try:
            body = self.store.open_body(qid)
        except (KeyError, OSError):
            body = None
        writer = self.sink.open(report_envelope(message, to, self.hostname, now))
        try:
            for chunk in build_report(
                message,
                chosen,
                action,
                to=to,
                hostname=self.hostname,
                now=now,
                body=body,
                until=until,
            ):
                writer.write(chunk)
        except Exception:
            writer.abort()
            log.failure(
                "{queue_id}: cannot build the {action} report", queue_id=qid, action=action.value
            )
            return
        finally:
            if body is not None:
                body.close()
        try:
            report_id = yield writer.commit()
        except Exception:
            log.failure(
                "{queue_id}: cannot queue the {action} report", queue_id=qid, action=action.value
            )
            return
        kind = {
            Action.FAILED: "non-delivery",
            Action.DELAYED: "delay",
            Action.RELAYED: "success",
            Action.DELIVERED: "success",
        }[action]
        log.info(
            "{queue_id}: sender {kind} notification: {report_id}",
            queue_id=qid,
            kind=kind,
            report_id=report_id,
        )


def _ours_to_report(status: RecipientStatus) -> bool:
    """Delivered, asked for a success report (NOTIFY=SUCCESS), and not passed on with the
    request to a next hop that reports itself (RFC 3461 5.2.2): else the sender gets two."""
    return (
        status.state is RecipientState.DELIVERED
        and status.success != "passed"
        and wants(status.recipient, Action.RELAYED)
    )
