"""The mail transaction of ``Session``: MAIL, RCPT, DATA, and the message text to the 250.

MAIL and RCPT check the path and their ESMTP parameters (``params``), ask the policy, and
collect the envelope. The text (DATA, and BDAT's chunks) is then opened, streamed, ended,
committed and answered.

A message is opened once the data policy agrees: the sink's writer, then the intake stage
(``settings.intake``: our Received header first, the hop count as the text streams). At the end
of the text come its verdict (a bad line, too big, a mail loop), the end-of-data policy, the
writer's ``commit``, and only once that has fired ``250 Ok: queued as ID``: the 250 is a
promise that the message is on stable storage (the sink's contract).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from mailrelay import _ascii
from mailrelay.envelope import Envelope, Recipient, Reply, protocol_name
from mailrelay.errors import MailRelayError
from mailrelay.paths import Path, PathError, parse_params, parse_path, split_path
from mailrelay.smtp import _parser as p
from mailrelay.smtp import _states as S
from mailrelay.smtp import replies as R
from mailrelay.smtp._log import accepted
from mailrelay.smtp.params import MailFields, mail_fields, rcpt_fields

if TYPE_CHECKING:
    from mailrelay.smtp.session import Session

_DATA_ERRORS = {
    p.DataError.TOO_BIG: R.TOO_BIG,
    p.DataError.LINE_TOO_LONG: R.TEXT_LINE_TOO_LONG,
    p.DataError.BARE_NEWLINE: R.BARE_NEWLINE_DATA,
}


@attrs.define
class Transaction:
    """One MAIL transaction: from MAIL to the end of its message (or RSET)."""

    sender: str
    fields: MailFields
    recipients: list[Recipient] = attrs.field(factory=list)
    rcpt_attempts: int = 0
    overshoot: int = 0  # RCPTs answered 452 4.5.3 (over max_recipients)
    bdat_total: int = 0  # octets of BDAT chunks so far (0: none yet)
    bdat_started: bool = False
    bdat_failed: Reply | None = None  # every further chunk of this message gets this reply

    @property
    def body(self) -> str | None:
        return self.fields.body


def envelope_of(session: Session, txn: Transaction) -> Envelope:
    info, fields = session.info, txn.fields
    auth = info.auth is not None
    return Envelope(
        sender=txn.sender,
        recipients=tuple(txn.recipients),
        helo=info.helo or "",
        client_address=info.client_address,
        client_name=info.client_name,
        protocol=protocol_name(info.esmtp, info.tls is not None, auth, fields.smtputf8),
        body=fields.body,
        smtputf8=fields.smtputf8,
        size=fields.size,
        ret=fields.ret,
        envid=fields.envid,
        auth=info.auth,
        received_at=session.clock.seconds(),
        trusted=info.trusted or auth,
    )


def open_message(session: Session, envelope: Envelope) -> Reply | None:
    if session.state is S.CLOSED:  # the client left while the data policy thought
        return R.LOCAL_ERROR
    try:
        writer = session.sink.open(envelope)
        intake = session.settings.intake.start(session.info, envelope, writer.queue_id)
        writer.write(intake.header)
    except MailRelayError as e:
        return e.reply
    session._writer, session._intake, session._envelope_in_data = writer, intake, envelope
    return None


def text(session: Session, data: bytes) -> None:
    intake = session._intake
    if intake is None:  # a chunk being skipped: nothing to keep
        return
    before = intake.feed(data)
    if session._writer is not None and intake.rejection is None:
        if before:
            session._writer.write(before)
        session._writer.write(data)


def verdict(session: Session, event: p.DataEnd) -> Reply | None:
    """Why the message (so far) cannot be taken: its text, or the intake's verdict."""
    if event.error is not None:
        return _DATA_ERRORS[event.error]
    return session._intake.rejection if session._intake is not None else None


def finish(session: Session, event: p.DataEnd) -> None:
    """The text is complete: errors, then end-of-data policy, then commit, then the reply."""
    writer, session._writer = session._writer, None
    envelope = session._envelope_in_data
    failure = verdict(session, event)
    session._intake = session._envelope_in_data = None
    session._move(S.READY)
    session._txn = None
    if writer is None or envelope is None:  # cannot happen: text is read with a writer open
        session.reply(R.LOCAL_ERROR)
        return
    if failure is not None:
        writer.abort()
        session.reply(failure)
        return

    def committed(result: Any) -> None:
        if isinstance(result, Reply):  # a TemporaryFailure/PermanentFailure from commit
            writer.abort()
            session.reply(result)
            return
        session.info.messages += 1
        session.errors = 0
        session.observer.message_accepted(session.info, envelope, writer.queue_id, event.size)
        accepted(session.info, envelope, writer.queue_id, event.size)
        session._send(f"250 2.0.0 Ok: queued as {writer.queue_id}\r\n".encode())

    def allowed(objection: Reply | None) -> None:
        if objection is not None:
            writer.abort()
            session.reply(objection)
            return
        session._ask(writer.commit, (), committed)

    session._ask(session.policy.end_of_data, (session.info, envelope, event.size), allowed)


def data_command(session: Session, arg: str) -> None:
    txn = session._txn
    assert txn is not None  # MAIL state
    if not txn.recipients:
        session.reply(R.NO_VALID_RCPT if txn.rcpt_attempts else R.NEED_RCPT)
        return
    if _ascii.strip(arg):
        session.reply(R.NO_ARGUMENTS)
        return
    if txn.bdat_started or txn.body == "BINARYMIME":
        session.reply(Reply(503, "5.5.1", "Error: use BDAT for this message"))
        return
    envelope = envelope_of(session, txn)

    def then(objection: Reply | None) -> None:
        if objection is None:
            objection = open_message(session, envelope)
        if objection is not None:
            session.reply(objection)
            return
        session._move(S.DATA)
        session.parser.begin_data(session.settings.max_message_size)
        session.reply(R.START_DATA)

    session._ask(session.policy.data, (session.info, envelope), then)


def mail_command(session: Session, arg: str) -> None:
    if session.settings.require_auth and not session.info.auth:
        session.reply(Reply(530, "5.7.0", "Authentication required"))
        return
    parsed = _path_and_params(arg, "MAIL FROM", "sender", "5.1.7")
    if isinstance(parsed, Reply):
        session.reply(parsed)
        return
    path, params = parsed
    fields = mail_fields(params, session.settings, session.info.esmtp)
    if isinstance(fields, Reply) or (path.utf8 and not fields.smtputf8):
        session.reply(fields if isinstance(fields, Reply) else R.NEED_SMTPUTF8)
        return
    txn = Transaction(path.address, fields)

    def then(objection: Reply | None) -> None:
        if objection is not None:
            session.reply(objection)
            return
        session._txn = txn
        session._move(S.MAIL)
        session.reply(R.SENDER_OK)

    session._ask(session.policy.mail, (session.info, path.address, params), then)


def rcpt_command(session: Session, arg: str) -> None:
    txn = session._txn
    assert txn is not None  # MAIL state
    txn.rcpt_attempts += 1
    parsed = _path_and_params(arg, "RCPT TO", "recipient", "5.1.3")
    if isinstance(parsed, Reply):
        session.reply(parsed)
        return
    path, params = parsed
    fields = rcpt_fields(params, session.settings)
    if isinstance(fields, Reply) or (path.utf8 and not txn.fields.smtputf8):
        session.reply(fields if isinstance(fields, Reply) else R.NEED_SMTPUTF8)
        return
    if len(txn.recipients) >= session.settings.max_recipients:
        session.reply(R.TOO_MANY_RECIPIENTS)
        txn.overshoot += 1
        if txn.overshoot > session.settings.recipient_overshoot_limit:
            session._count_error()  # a client that never takes the 452 for an answer
        return
    address = path.address
    if address == "postmaster":
        address = f"postmaster@{session.settings.hostname}"
    recipient = Recipient(address, fields.notify, fields.orcpt)

    def then(objection: Reply | None) -> None:
        if objection is not None:
            session.reply(objection)
        elif session._txn is txn:
            txn.recipients.append(recipient)
            session.reply(R.RCPT_OK)
        else:  # the transaction went away meanwhile (cannot happen in order)
            session.reply(R.BAD_SEQUENCE)

    session._ask(session.policy.rcpt, (session.info, txn.sender, path.address, params), then)


def _path_and_params(
    arg: str, command: str, role: str, bad_address: str
) -> tuple[Path, dict[str, str | None]] | Reply:
    """MAIL's or RCPT's path and parameters, or the 501 that says what is wrong with them.

    ``command`` is ``"MAIL FROM"`` or ``"RCPT TO"``: the null path is a sender's only, the
    ``<Postmaster>`` path a recipient's only (RFC 5321 4.1.1.3).
    """
    sender = command == "MAIL FROM"
    try:
        inner, rest = split_path(arg, command.split()[1])
        path = parse_path(inner, allow_null=sender, allow_postmaster=not sender)
        params = parse_params(rest)
    except PathError as e:
        if e.syntax:
            return Reply(501, "5.5.4", f"Syntax: {command}:<address> ({e.reason})")
        return Reply(501, bad_address, f"Bad {role} address syntax ({e.reason})")
    return path, params
