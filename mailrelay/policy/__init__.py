"""Who may send what where: the server-side policies and the chain that runs them.

``PolicyChain`` runs its policies in order at each stage; the first objection (a ``Reply``) wins.
Any policy may answer through a Deferred; the chain waits for it before asking the next one.
``build_policy`` makes the chain a listener needs from ``ServerConfig``, plus an embedder's extras.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from zope.interface import implementer

from mailrelay.config import ServerConfig
from mailrelay.envelope import Envelope, Reply
from mailrelay.interfaces import IPolicy


@implementer(IPolicy)
class Policy:
    """A policy with no objections: subclass it and override only the stages you check.

    Each method returns ``None`` (no objection), a ``Reply`` (refuse with it) or a Deferred of
    either; raising ``TemporaryFailure``/``PermanentFailure`` gives their reply.
    """

    def connect(self, session: Any) -> Reply | None | Deferred[Reply | None]:
        return None

    def helo(self, session: Any, name: str) -> Reply | None | Deferred[Reply | None]:
        return None

    def mail(self, session: Any, sender: str, params: Mapping[str, str | None]) -> Reply | None | Deferred[Reply | None]:
        return None

    def rcpt(
        self, session: Any, sender: str, recipient: str, params: Mapping[str, str | None]
    ) -> Reply | None | Deferred[Reply | None]:
        return None

    def data(self, session: Any, envelope: Envelope) -> Reply | None | Deferred[Reply | None]:
        return None

    def end_of_data(self, session: Any, envelope: Envelope, size: int) -> Reply | None | Deferred[Reply | None]:
        return None


@implementer(IPolicy)
class PolicyChain:
    """Several ``IPolicy`` providers as one; synchronous answers stay synchronous (no Deferred)."""

    def __init__(self, policies: Sequence[IPolicy]) -> None:
        self.policies = tuple(policies)
        # Each stage's bound methods, looked up once (every command of every session runs one).
        self._stages: dict[str, tuple[Any, ...]] = {}

    def _run(self, method: str, args: tuple[Any, ...]) -> Reply | None | Deferred[Reply | None]:
        stage = self._stages.get(method)
        if stage is None:
            stage = self._stages[method] = tuple(getattr(p, method) for p in self.policies)
        if len(stage) == 1:  # the usual chain: one answer, passed on as it is
            return stage[0](*args)  # type: ignore[no-any-return]
        for i, check in enumerate(stage):
            answer = check(*args)
            if answer is None:
                continue
            if isinstance(answer, Deferred):
                return answer.addCallback(self._after_deferred, iter(self.policies[i + 1:]), method, args)
            return answer  # type: ignore[no-any-return]
        return None

    def _continue(
        self, rest: Iterator[IPolicy], method: str, args: tuple[Any, ...]
    ) -> Reply | None | Deferred[Reply | None]:
        for policy in rest:
            answer = getattr(policy, method)(*args)
            if answer is None:
                continue
            if isinstance(answer, Deferred):
                return answer.addCallback(self._after_deferred, rest, method, args)
            return answer  # type: ignore[no-any-return]
        return None

    def _after_deferred(
        self, answer: Reply | None, rest: Iterator[IPolicy], method: str, args: tuple[Any, ...]
    ) -> Reply | None | Deferred[Reply | None]:
        if answer is not None:
            return answer
        return maybeDeferred(self._continue, rest, method, args)

    def connect(self, session: Any) -> Reply | None | Deferred[Reply | None]:
        return self._run("connect", (session,))

    def helo(self, session: Any, name: str) -> Reply | None | Deferred[Reply | None]:
        return self._run("helo", (session, name))

    def mail(self, session: Any, sender: str, params: Mapping[str, str | None]) -> Reply | None | Deferred[Reply | None]:
        return self._run("mail", (session, sender, params))

    def rcpt(
        self, session: Any, sender: str, recipient: str, params: Mapping[str, str | None]
    ) -> Reply | None | Deferred[Reply | None]:
        return self._run("rcpt", (session, sender, recipient, params))

    def data(self, session: Any, envelope: Envelope) -> Reply | None | Deferred[Reply | None]:
        return self._run("data", (session, envelope))

    def end_of_data(self, session: Any, envelope: Envelope, size: int) -> Reply | None | Deferred[Reply | None]:
        return self._run("end_of_data", (session, envelope, size))


def build_policy(server: ServerConfig, extra: Sequence[IPolicy] = ()) -> IPolicy:
    """The standard checks for a listener (relay access first), then the embedder's ``extra``."""
    from mailrelay.policy.access import RelayAccess

    access = RelayAccess(server.trusted_networks, server.local_domains, server.relay_domains)
    return PolicyChain([access, *extra])


__all__ = ["Policy", "PolicyChain", "build_policy"]
