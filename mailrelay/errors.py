"""Failures that carry the SMTP reply to give (or record) for them."""

from __future__ import annotations

from collections.abc import Sequence

from mailrelay.envelope import Reply


class MailRelayError(Exception):
    """Base of every failure that maps to an SMTP reply."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class TemporaryFailure(MailRelayError):
    """Try again later: 4xx. Never turns into a bounce before the message expires."""


class PermanentFailure(MailRelayError):
    """Will never succeed: 5xx. Refused at RCPT time, or bounced."""


class ConfigError(Exception):
    """A config file is wrong: names the file, the key path and the reason."""

    def __init__(self, path: str, key: str, reason: str) -> None:
        self.path, self.key, self.reason = path, key, reason
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {reason}")


class ConfigErrors(ConfigError):
    """Every error found in one config file: its text is one line per error."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        first = errors[0]
        super().__init__(first.path, first.key, first.reason)
        self.errors = tuple(errors)
        self.args = ("\n".join(str(e) for e in self.errors),)


def config_errors(errors: Sequence[ConfigError]) -> ConfigError:
    """The one error to raise for ``errors`` (not empty): itself when alone."""
    return errors[0] if len(errors) == 1 else ConfigErrors(errors)


def each_config_error(error: ConfigError) -> tuple[ConfigError, ...]:
    """The errors ``error`` stands for: those of a ``ConfigErrors``, else itself."""
    return error.errors if isinstance(error, ConfigErrors) else (error,)


def cannot_listen(source: str, key: str, description: str, error: BaseException) -> ConfigError:
    """The error of the file for a listener at ``key`` whose port cannot be had: the endpoint and
    the system's reason (``Address already in use``) from an ``OSError`` or from Twisted's
    ``CannotListenError``, which holds one as ``socketError``."""
    cause = getattr(error, "socketError", error)
    why = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
    return ConfigError(source, key, f"{description!r}: cannot listen: {why}")
