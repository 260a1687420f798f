"""CHUNKING (RFC 3030): the BDAT command and the end of each chunk, for ``Session``.

A chunk's octets must be read whatever we think of the command (else they would be read as
commands), so a BDAT out of sequence or of a refused message is read and thrown away
(``_skip``), and its reply owed until the chunk is consumed. The first good chunk of a message
opens it (the data policy, then the store) as DATA does; a chunk that fails (too big, a bad
line) dooms the rest of the message: every further chunk gets the same reply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailrelay import _ascii
from mailrelay.envelope import Reply
from mailrelay.smtp import _parser as p
from mailrelay.smtp import _states as S
from mailrelay.smtp import _transaction
from mailrelay.smtp import replies as R

if TYPE_CHECKING:
    from mailrelay.smtp.session import Session

BAD_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT size [LAST]")


def command(session: Session, arg: str) -> None:
    if not session.settings.chunking:
        session.reply(R.UNKNOWN_COMMAND)
        return
    parts = _ascii.split(arg)
    size = _ascii.number(parts[0], 18) if 1 <= len(parts) <= 2 else None
    if size is None or (len(parts) == 2 and _ascii.upper(parts[1]) != "LAST"):
        session._close(BAD_SYNTAX)  # without a size we cannot tell its octets from commands
        return
    last = len(parts) == 2
    txn = session._txn
    problem: Reply | None = None
    if session.state is S.GREETED:
        problem = R.NEED_HELO
    elif txn is None:
        problem = R.NEED_MAIL
    elif not txn.recipients:
        problem = R.NO_VALID_RCPT if txn.rcpt_attempts else R.NEED_RCPT
    elif txn.bdat_failed is not None:
        problem = txn.bdat_failed
    if problem is not None or txn is None:
        _skip(session, size, last, problem or R.BAD_SEQUENCE)
        return
    if txn.bdat_started:
        _read(session, txn, size, last)
        return
    envelope = _transaction.envelope_of(session, txn)

    def then(objection: Reply | None) -> None:
        if objection is None:
            objection = _transaction.open_message(session, envelope)
        if objection is not None:
            txn.bdat_failed = objection
            _skip(session, size, last, objection)
            return
        txn.bdat_started = True
        _read(session, txn, size, last)

    session._ask(session.policy.data, (session.info, envelope), then)


def _read(session: Session, txn: _transaction.Transaction, size: int, last: bool) -> None:
    session._move(S.DATA)
    binary = txn.body == "BINARYMIME"
    maximum = session.settings.max_message_size
    session.parser.begin_bdat(size, last, maximum, txn.bdat_total, binary=binary)


def _skip(session: Session, size: int, last: bool, reply: Reply) -> None:
    """Read a chunk we will not take, and answer ``reply`` once it is consumed."""
    session._bdat_reply = reply
    session._bdat_return = session.state
    session._move(S.DATA)
    session.parser.begin_bdat(size, last, 0, 1, binary=True)
    session.parser.doom(p.DataError.TOO_BIG)


def chunk_end(session: Session, event: p.DataEnd) -> None:
    if session._bdat_reply is not None:
        reply, session._bdat_reply = session._bdat_reply, None
        session._move(session._bdat_return)
        if event.last and session._txn is not None and session._txn.bdat_failed is not None:
            session._reset()
        session.reply(reply)
        return
    txn = session._txn
    assert txn is not None
    txn.bdat_total = event.size
    if event.last:
        _transaction.finish(session, event)
        return
    session._move(S.MAIL)
    failure = _transaction.verdict(session, event)
    if failure is not None:
        session._abort_writer()
        txn.bdat_failed = failure
        session.reply(failure)
        return
    session.reply(Reply(250, "2.0.0", f"Ok: {event.size} octets received"))
