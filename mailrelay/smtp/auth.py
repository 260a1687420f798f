"""SMTP AUTH (RFC 4954) support: SASL PLAIN/LOGIN decoding and a hashed password file checker.

Any ``twisted.cred`` ``ICredentialsChecker`` accepting ``IUsernamePassword`` can authenticate
clients; ``HashedPasswordFile`` is the one shipped. Its file holds one ``user:hash`` per line
(``#`` comments allowed), the hash made by ``hash_password`` (PBKDF2-SHA256, salted)::

    python -m mailrelay.smtp.auth            # prompts for a password, prints the hash

The file is re-read when it changes. Hashing is deliberately slow, so checks run in the reactor's
thread pool when one is given, never on the reactor thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Callable
from typing import Any

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer, threads
from zope.interface import implementer

SCHEME = "pbkdf2-sha256"
DEFAULT_ITERATIONS = 200_000


def hash_password(
    password: str, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
) -> str:
    """``$pbkdf2-sha256$<iterations>$<salt b64>$<hash b64>``."""
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    b64 = base64.b64encode
    return f"${SCHEME}${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of ``password`` against a ``hash_password`` string (False: malformed)."""
    try:
        _, scheme, iterations, salt, digest = stored.split("$")
        if scheme != SCHEME:
            return False
        expected = base64.b64decode(digest)
        got = hashlib.pbkdf2_hmac(
            "sha256", password.encode("utf-8"), base64.b64decode(salt), int(iterations)
        )
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(expected, got)


@implementer(ICredentialsChecker)
class HashedPasswordFile:
    """Checks user name and password against a ``user:hash`` file; the avatar id: the user name."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, path: str, reactor: Any = None, threadpool: Any = None) -> None:
        self.path = path
        self._reactor = reactor
        self._threadpool = threadpool
        self._mtime: float | None = None
        self._users: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        mtime = os.stat(self.path).st_mtime
        if mtime == self._mtime:
            return
        users = {}
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                user, sep, stored = line.partition(":")
                if not sep or not user or not stored.startswith("$"):
                    raise ValueError(f"{self.path}:{lineno}: expected user:$pbkdf2-sha256$...")
                users[user] = stored
        self._users, self._mtime = users, mtime

    def _check(self, username: str, password: str) -> str:
        try:
            self._load()
        except (OSError, ValueError):
            pass  # keep the last good file
        stored = self._users.get(username)
        # hash even for unknown users, so timing does not tell which names exist
        ok = verify_password(password, stored or hash_password("", 1000, b"0" * 16))
        if stored is None or not ok:
            raise error.UnauthorizedLogin("bad user name or password")
        return username

    # The avatar id is the user name as str; ICredentialsChecker's stub says bytes only.
    def requestAvatarId(self, creds: Any) -> defer.Deferred[Any]:
        username = (
            creds.username.decode("utf-8", "replace")
            if isinstance(creds.username, bytes)
            else creds.username
        )
        password = (
            creds.password.decode("utf-8", "replace")
            if isinstance(creds.password, bytes)
            else creds.password
        )
        if self._reactor is not None and self._threadpool is not None:
            return threads.deferToThreadPool(
                self._reactor, self._threadpool, self._check, username, password
            )
        return defer.maybeDeferred(self._check, username, password)


class SASLError(ValueError):
    """The client's SASL response is malformed (501)."""


def b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise SASLError("invalid base64") from None


def decode_plain(response: bytes) -> tuple[str, str, str]:
    """RFC 4616: ``authzid NUL authcid NUL passwd`` → (authzid, user, password)."""
    parts = response.split(b"\0")
    if len(parts) != 3 or not parts[1]:
        raise SASLError("malformed PLAIN response")
    try:
        authzid, user, password = (p.decode("utf-8") for p in parts)
    except UnicodeDecodeError:
        raise SASLError("PLAIN response is not UTF-8") from None
    return authzid, user, password


#: Mechanism name → the server's challenges, one per step (base64 is added by the session).
MECHANISMS: dict[str, tuple[bytes, ...]] = {
    "PLAIN": (b"",),
    "LOGIN": (b"Username:", b"Password:"),
}


def credentials_from(mechanism: str, responses: list[bytes]) -> tuple[str, str]:
    """The (user, password) a finished exchange gave; raises ``SASLError``."""
    if mechanism == "PLAIN":
        authzid, user, password = decode_plain(responses[0])
        if authzid and authzid != user:
            raise SASLError("authorization identity differs from authentication identity")
        return user, password
    try:
        return responses[0].decode("utf-8"), responses[1].decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError("LOGIN response is not UTF-8") from None


def main(argv: list[str] | None = None, prompt: Callable[[str], str] | None = None) -> int:
    """``python -m mailrelay.smtp.auth``: ask for a password, print its hash for the file."""
    import argparse
    import getpass

    parser = argparse.ArgumentParser(
        prog="python -m mailrelay.smtp.auth",
        description="Ask for a password (without echo) and print its hash, for a 'user:hash' line "
        "of the [server] auth_password_file.",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=DEFAULT_ITERATIONS,
        help=f"PBKDF2-SHA256 iterations (default {DEFAULT_ITERATIONS})",
    )
    args = parser.parse_args(argv)
    password = (prompt or getpass.getpass)("Password: ")
    print(hash_password(password, args.iterations))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
