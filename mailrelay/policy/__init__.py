"""Who may send what where: the server-side policies and the chain that runs them.

``PolicyChain`` runs its policies in order at each stage; the first objection (a ``Reply``) wins.
Any policy may answer through a Deferred; the chain waits for it before asking the next one.
``build_policy`` makes the chain a listener needs from ``ServerConfig``, plus an embedder's extras.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

from twisted.internet.defer import Deferred
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

    def mail(
        self, session: Any, sender: str, params: Mapping[str, str | None]
    ) -> Reply | None | Deferred[Reply | None]:
        return None

    def rcpt(
        self, session: Any, sender: str, recipient: str, params: Mapping[str, str | None]
    ) -> Reply | None | Deferred[Reply | None]:
        return None

    def data(self, session: Any, envelope: Envelope) -> Reply | None | Deferred[Reply | None]:
        return None

    def end_of_data(
        self, session: Any, envelope: Envelope, size: int
    ) -> Reply | None | Deferred[Reply | None]:
        return None


@implementer(IPolicy)
class PolicyChain:
    """Several ``IPolicy`` providers as one; synchronous answers stay synchronous (no Deferred).

    Each stage asks only the policies that check it (a method of their own, not ``Policy``'s
    no-op), worked out once here: the usual chain checks one or two stages, and the rest answer
    None at once.
    """

    def __init__(self, policies: Sequence[object]) -> None:  # IPolicy providers
        self.policies = tuple(policies)
        self._stages: dict[str, tuple[Callable[..., Any], ...]] = {
            stage: tuple(
                getattr(p, stage)
                for p in self.policies
                if getattr(type(p), stage, None) is not getattr(Policy, stage)
            )
            for stage in _STAGES
            # a partial policy object: its stage is looked up when asked, and fails as it would
            if all(hasattr(p, stage) for p in self.policies)
        }

    def _run(self, stage: str, args: tuple[Any, ...]) -> Reply | None | Deferred[Reply | None]:
        checks = self._stages.get(stage)
        if checks is None:
            checks = tuple(getattr(p, stage) for p in self.policies)
        if not checks:
            return None
        if len(checks) == 1:  # the usual chain checks each stage once at most
            return checks[0](*args)
        return self._continue(iter(checks), args)

    def _continue(
        self, rest: Iterator[Callable[..., Any]], args: tuple[Any, ...]
    ) -> Reply | None | Deferred[Reply | None]:
        for check in rest:
            answer = check(*args)
            if answer is None:
                continue
            if isinstance(answer, Deferred):
                return answer.addCallback(self._after_deferred, rest, args)
            return answer
        return None

    def _after_deferred(
        self, answer: Reply | None, rest: Iterator[Callable[..., Any]], args: tuple[Any, ...]
    ) -> Reply | None | Deferred[Reply | None]:
        if answer is not None:
            return answer
        return self._continue(rest, args)  # what it raises fails the Deferred it runs in

    def connect(self, session: Any) -> Reply | None | Deferred[Reply | None]:
        return self._run("connect", (session,))

    def helo(self, session: Any, name: str) -> Reply | None | Deferred[Reply | None]:
        return self._run("helo", (session, name))

    def mail(
        self, session: Any, sender: str, params: Mapping[str, str | None]
    ) -> Reply | None | Deferred[Reply | None]:
        return self._run("mail", (session, sender, params))

    def rcpt(
        self, session: Any, sender: str, recipient: str, params: Mapping[str, str | None]
    ) -> Reply | None | Deferred[Reply | None]:
        return self._run("rcpt", (session, sender, recipient, params))

    def data(self, session: Any, envelope: Envelope) -> Reply | None | Deferred[Reply | None]:
        return self._run("data", (session, envelope))

    def end_of_data(
        self, session: Any, envelope: Envelope, size: int
    ) -> Reply | None | Deferred[Reply | None]:
        return self._run("end_of_data", (session, envelope, size))


_STAGES = ("connect", "helo", "mail", "rcpt", "data", "end_of_data")


def build_policy(server: ServerConfig, extra: Sequence[IPolicy] = ()) -> IPolicy:
    """The standard checks for a listener (relay access first), then the embedder's ``extra``."""
    from mailrelay.policy.access import RelayAccess

    access = RelayAccess(server.trusted_networks, server.local_domains, server.relay_domains)
    return cast(IPolicy, PolicyChain([access, *extra]))  # it provides IPolicy (implementer)


__all__ = ["Policy", "PolicyChain", "build_policy"]
