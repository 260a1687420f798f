"""The SASL exchange of AUTH (RFC 4954): a small machine of its own inside the session.

``SaslExchange`` holds one exchange: the mechanism's challenges go out (``challenge``), the
client's responses come in (``respond``), and once it has them all ``credentials`` decodes them.
While it wants a response the session is in ``AUTH`` and hands it every line unparsed. Checking
the credentials (a Deferred, maybe in a thread) is ``check``; what a failure means is
``is_login_failure``.
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.cred import error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

from mailrelay import _ascii
from mailrelay.envelope import Reply
from mailrelay.smtp import auth as sasl

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
    d = maybeDeferred(checker.requestAvatarId, UsernamePassword(user.encode(), password.encode()))
    return d.addCallbacks(lambda avatar: (True, user), lambda f: (False, f))


def is_login_failure(detail: Any) -> bool:
    """The checker said no (as opposed to failing)."""
    return isinstance(detail, Failure) and bool(detail.check(*_LOGIN_FAILURES))
