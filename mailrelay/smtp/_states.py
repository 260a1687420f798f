"""The server session's states, the moves between them, and which handler answers which command.

Written down as tables (as h11's ``_state.py`` does) so that a reader, not a debugger, can say
what the session does next. ``Session._move`` is the only place the state changes, and it refuses
a move that ``TRANSITIONS`` does not list (a bug: the session ends with 451, never the server).

The states are plain module constants compared by identity (h11's sentinels), not an ``enum``.

The rule the dispatch table rests on: between commands the session is ``READY`` exactly when no
transaction is open and ``MAIL`` exactly when one is (``Session._txn``); so "need MAIL" and
"nested MAIL" are properties of the state, not checks inside the handlers.
"""

from __future__ import annotations

from typing import Final


class State:
    """One state of the server session (compared by identity)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<State {self.name}>"


CONNECTED: Final = State("CONNECTED")  # greeting not sent yet (the connect policy may be pending)
GREETED: Final = State("GREETED")  # waiting for HELO/EHLO
READY: Final = State("READY")  # HELO/EHLO done, no transaction
MAIL: Final = State("MAIL")  # MAIL accepted; RCPTs (or BDAT chunks) being collected
DATA: Final = State("DATA")  # message text streaming in (DATA, or one BDAT chunk)
AUTH: Final = State("AUTH")  # in a SASL exchange: the next line is a response, not a command
CLOSED: Final = State("CLOSED")

ALL = (CONNECTED, GREETED, READY, MAIL, DATA, AUTH, CLOSED)


class TransitionError(RuntimeError):
    """A move the table does not allow: a bug in the session."""


#: state -> the states it may move to. Every state may close; a chunk being skipped (BDAT out of
#: sequence) is read in DATA from wherever it came, and returns there.
TRANSITIONS: dict[State, frozenset[State]] = {
    CONNECTED: frozenset({GREETED, CLOSED}),
    GREETED: frozenset({GREETED, READY, DATA, CLOSED}),  # GREETED again: STARTTLS
    READY: frozenset({READY, MAIL, DATA, AUTH, GREETED, CLOSED}),  # AUTH: a SASL exchange
    MAIL: frozenset({MAIL, READY, DATA, GREETED, CLOSED}),  # READY: RSET, HELO, end of BDAT
    DATA: frozenset({READY, MAIL, GREETED, CLOSED}),  # GREETED: back from a skipped chunk
    AUTH: frozenset({READY, CLOSED}),
    CLOSED: frozenset({CLOSED}),
}

#: Commands every state that takes commands answers with the same handler.
_ANY = {
    "EHLO": "_ehlo",
    "HELO": "_helo",
    "RSET": "_rset",
    "NOOP": "_noop",
    "QUIT": "_quit",
    "VRFY": "_vrfy",
    "EXPN": "_expn",
    "HELP": "_help",
    "STARTTLS": "_starttls",
    "AUTH": "_auth",  # its own checks come first: "not enabled" before "need HELO"
    "BDAT": "_bdat",  # must read the chunk whatever the state, so it sorts that out itself
}

#: (state, verb) -> the name of the Session method that answers it. Only GREETED, READY and MAIL
#: take commands: CONNECTED reads nothing yet, DATA reads text, AUTH reads SASL responses.
#: Looked up on the instance by name, so a test may replace one handler of one session.
COMMANDS: dict[tuple[State, str], str] = {
    **{(state, verb): name for state in (GREETED, READY, MAIL) for verb, name in _ANY.items()},
    (GREETED, "MAIL"): "_need_helo",
    (GREETED, "RCPT"): "_need_helo",
    (GREETED, "DATA"): "_need_helo",
    (READY, "MAIL"): "_mail",
    (READY, "RCPT"): "_need_mail",
    (READY, "DATA"): "_need_mail",
    (MAIL, "MAIL"): "_nested_mail",
    (MAIL, "RCPT"): "_rcpt",
    (MAIL, "DATA"): "_data",
}

#: The verbs we know, for HELP and for the observer's labels (never the client's own text).
VERBS = frozenset(verb for _, verb in COMMANDS)
