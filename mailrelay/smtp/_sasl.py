"""AUTH (RFC 4954) for ``Session``, and its SASL exchange: a small machine of its own.

``command`` answers AUTH (its checks, in the order Postfix makes them), ``response`` takes each
line of the exchange; after it the credentials are checked and failures counted, per session
(``max_auth_failures``) and per client address across sessions (the ``AuthThrottle``).

``SaslExchange`` holds one exchange: the mechanism's challenges go out (``challenge``), the
client's responses come in (``respond``), and once it has them all ``credentials`` decodes them.
While it wants a response the session is in ``AUTH`` and hands it every line unparsed. Checking
the credentials (a Deferred, maybe in a thread) is ``check``; what a failure means is
``is_login_failure``.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

from mailrelay import _ascii
from mailrelay.envelope import Reply
from mailrelay.smtp import _parser as p
from mailrelay.smtp import _states as S
from mailrelay.smtp import auth as sasl
from mailrelay.smtp import replies as R
from mailrelay.smtp._log import log

if TYPE_CHECKING:
    from mailrelay.smtp.session import Session

CANNOT_DECODE = Reply(501, "5.5.2", "Cannot decode response")
ABORTED = Reply(501, "5.7.0", "Authentication aborted")
UNRECOGNIZED = Reply(504, "5.5.4", "Unrecognized authentication type")
SUCCESS = Reply(235, "2.7.0", "Authentication successful")
INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
TEMPORARY = Reply(454, "4.7.0", "Temporary authentication failure")

_LOGIN_FAILURES = (error.UnauthorizedLogin, error.UnhandledCredentials)


class SaslExchange:
    """One exchange: ``start`` it, then alternate ``challenge`` and ``respond`` until done."""

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism
        self.responses: list[bytes] = []

    @classmethod
    def start(cls, arg: str, offered: tuple[str, ...]) -> SaslExchange | Reply:
        """``AUTH mechanism [initial-response]``: the exchange, or the reply that refuses it."""
        mechanism, _, initial = _ascii.strip(arg).partition(" ")
        mechanism = _ascii.upper(mechanism)
        if mechanism not in offered or mechanism not in sasl.MECHANISMS:
            return UNRECOGNIZED
        exchange = cls(mechanism)
        if initial:
            try:
                exchange.responses.append(b"" if initial == "=" else sasl.b64decode(initial))
            except sasl.SASLError:
                return CANNOT_DECODE
        return exchange

    def challenge(self) -> bytes | None:
        """The next ``334`` line to send, or None once every response is in."""
        challenges = sasl.MECHANISMS[self.mechanism]
        if len(self.responses) >= len(challenges):
            return None
        # "334 " even when the challenge is empty (RFC 4954 4)
        return b"334 " + base64.b64encode(challenges[len(self.responses)]) + b"\r\n"

    def respond(self, line: str | None) -> Reply | None:
        """A response line (None: not a line we could read); a Reply ends the exchange."""
        if line is None:
            return CANNOT_DECODE
        line = _ascii.strip(line)
        if line == "*":
            return ABORTED
        try:
            self.responses.append(sasl.b64decode(line))
        except sasl.SASLError:
            return CANNOT_DECODE
        return None

    def credentials(self) -> tuple[str, str] | Reply:
        try:
            return sasl.credentials_from(self.mechanism, self.responses)
        except sasl.SASLError as e:
            return Reply(501, "5.5.2", f"Cannot decode response ({e})")


def check(checker: ICredentialsChecker, user: str, password: str) -> Deferred[tuple[bool, Any]]:
    """``(True, user)`` when the checker takes the credentials, else ``(False, failure)``."""
    request: Any = checker.requestAvatarId  # an interface method: untyped here
    d = maybeDeferred(request, UsernamePassword(user.encode(), password.encode()))
    return d.addCallbacks(lambda avatar: (True, user), lambda f: (False, f))


def is_login_failure(detail: Any) -> bool:
    """The checker said no (as opposed to failing)."""
    return isinstance(detail, Failure) and bool(detail.check(*_LOGIN_FAILURES))


# -- the command, for Session ----------------------------------------------------------------


def offered(session: Session) -> bool:
    """Whether EHLO offers AUTH now: configured, not done yet, and over TLS unless allowed."""
    s = session.settings
    return (
        bool(s.auth_mechanisms)
        and session.checker is not None
        and not session.info.auth
        and (session.tls_active or s.allow_plaintext_auth)
    )


def command(session: Session, arg: str) -> None:
    if not session.settings.auth_mechanisms or session.checker is None:
        session.reply(Reply(503, "5.5.1", "Error: authentication not enabled"))
    elif session.state is S.GREETED:
        session.reply(R.NEED_HELO)
    elif session.info.auth:
        session.reply(Reply(503, "5.5.1", "Error: already authenticated"))
    elif session._txn is not None:
        session.reply(Reply(503, "5.5.1", "Error: MAIL transaction in progress"))
    elif session.auth_failures_by_ip is not None and session.auth_failures_by_ip.exceeded(
        session.info.client_address
    ):
        reply = Reply(421, "4.7.0", "Error: too many authentication failures from your address")
        session._close(reply)
    elif not (session.tls_active or session.settings.allow_plaintext_auth):
        text = "Encryption required for requested authentication mechanism"
        session.reply(Reply(538, "5.7.11", text))
    else:
        exchange = SaslExchange.start(arg, session.settings.auth_mechanisms)
        if isinstance(exchange, Reply):
            session.reply(exchange)
            return
        session._sasl = exchange
        _step(session, exchange)


def _step(session: Session, exchange: SaslExchange) -> None:
    challenge = exchange.challenge()
    if challenge is not None:
        session._move(S.AUTH)
        session.out.write(challenge)
        return
    session._move(S.READY)
    session._sasl = None
    credentials = exchange.credentials()
    if isinstance(credentials, Reply):
        session.reply(credentials)
        return
    assert session.checker is not None
    pending = check(session.checker, *credentials)
    session._ask(lambda: pending, (), lambda result: _authenticated(session, result))


def response(session: Session, event: p.Event) -> None:
    session._move(S.READY)
    exchange, session._sasl = session._sasl, None
    assert exchange is not None
    problem = exchange.respond(event.line if isinstance(event, p.Command) else None)
    if problem is not None:
        session.reply(problem)
        return
    session._sasl = exchange
    _step(session, exchange)


def _authenticated(session: Session, result: tuple[bool, Any]) -> None:
    ok, detail = result
    if ok:
        session.info.auth = detail
        session.reply(SUCCESS)
        return
    if not is_login_failure(detail):
        log.failure("credentials check failed in session {id}", detail, id=session.info.session_id)
        session.reply(TEMPORARY)
        return
    session.auth_failures += 1
    if session.auth_failures_by_ip is not None:
        session.auth_failures_by_ip.hit(session.info.client_address)
    log.info(
        "session {id}: authentication failed from [{ip}]",
        id=session.info.session_id,
        ip=session.info.client_address,
    )
    session.reply(INVALID)
    if session.auth_failures >= session.settings.max_auth_failures:
        session._close(Reply(421, "4.7.0", "Error: too many authentication failures"))
