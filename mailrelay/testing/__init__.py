"""Public fakes for tests — ours, embedders' and router plugin authors'.

Each provides the same interface as the real thing (checked with ``verifyObject`` in our own tests)
and works without threads, sockets or a running reactor, so a test stays deterministic::

    store = MemoryQueueStore(clock)
    deliverer = RecordingDeliverer([Reply(451, "4.4.1", "try later"), Reply(250, "2.0.0", "ok")])
    router = FakeRouter({"example.test": route_to("127.0.0.1", 2526)})
    plugin = MyRouter.from_options({"path": "table.txt"}, router_context())  # a plugin's factory
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import IO, Any

import attrs
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer

from mailrelay import _ascii
from mailrelay.address import domain_of
from mailrelay.envelope import Envelope, NextHop, QueuedMessage, Recipient, Reply, Route
from mailrelay.errors import MailRelayError
from mailrelay.interfaces import IDeliverer, IPrependingWriter, IQueueStore, IRouter
from mailrelay.queue.store import QueueIdGenerator, new_message, storage_failure
from mailrelay.routing.context import RouterContext
from mailrelay.testing.dns import FakeResolver

__all__ = [
    "DeliveryCall",
    "FakeResolver",
    "FakeRouter",
    "MemoryQueueStore",
    "RecordingDeliverer",
    "route_to",
    "router_context",
]


def router_context(
    reactor: Any = None,
    *,
    source: str = "mailrelay.toml",
    key: str = "routes[0]",
    threadpool: Any = None,
    resolver: Any = None,
    seed: int = 0,
) -> RouterContext:
    """The ``RouterContext`` a router factory is given at start-up, for a test: a fresh ``Clock``
    unless ``reactor`` is given, randomness seeded with ``seed``, and errors that name
    ``source: key.<option>`` (``mailrelay.toml: routes[0].path``) as they would in a config file.
    ``threadpool`` ``None`` suits routers that block nothing; ``resolver`` is for the MX router
    (a ``FakeResolver``)."""
    return RouterContext(
        reactor=reactor if reactor is not None else Clock(),
        threadpool=threadpool,
        source=source,
        key=key,
        random=random.Random(seed),
        resolver=resolver,
    )


def route_to(host: str, port: int = 25, **kw: Any) -> Route:
    """A ``Route`` to one next hop; keyword arguments go to ``Route`` (``tls``, ``recipient``)."""
    return Route(hops=(NextHop(host, port),), **kw)


# -- store -----------------------------------------------------------------------------------


@implementer(IPrependingWriter)
class _MemoryWriter:
    def __init__(self, store: MemoryQueueStore, queue_id: str, envelope: Envelope) -> None:
        self.store = store
        self.queue_id = queue_id
        self.envelope = envelope
        self.buffer = io.BytesIO()
        self.done = False
        self.prefix = b""

    def write(self, data: bytes) -> None:
        if not self.done:
            self.buffer.write(data)

    def prepend(self, header: bytes) -> None:
        self.prefix = header

    def commit(self) -> defer.Deferred[str]:
        if self.done:
            raise RuntimeError(f"message {self.queue_id} already committed or aborted")
        self.done = True
        if self.store.full:
            return defer.fail(storage_failure())
        self.store.bodies[self.queue_id] = self.buffer.getvalue()
        self.store.messages[self.queue_id] = new_message(self.queue_id, self.envelope, self.prefix)
        self.store.commits.append(self.queue_id)
        for callback in list(self.store.subscribers):
            callback(self.queue_id)
        return defer.succeed(self.queue_id)

    def abort(self) -> None:
        self.done = True


@implementer(IQueueStore)
class MemoryQueueStore:
    """``IQueueStore`` in memory: every operation answers at once through a fired Deferred.

    ``messages`` and ``bodies`` are plain dicts a test may read (or seed); set ``full = True`` to
    make commits fail with 452 4.3.1 as a full disk would. ``clock`` supplies the time for queue
    ids and ``received_at``; it defaults to a fresh ``task.Clock``.
    """

    def __init__(self, clock: Any = None, randbytes: Callable[[int], bytes] = os.urandom) -> None:
        self.clock = clock if clock is not None else Clock()
        self.new_id = QueueIdGenerator(self.clock, randbytes)
        self.messages: dict[str, QueuedMessage] = {}
        self.bodies: dict[str, bytes] = {}
        self.subscribers: list[Callable[[str], object]] = []
        self.commits: list[str] = []
        self.saves: list[QueuedMessage] = []
        self.removed: list[str] = []
        self.full = False

    def open(self, envelope: Envelope) -> _MemoryWriter:
        if not envelope.received_at:
            envelope = attrs.evolve(envelope, received_at=self.clock.seconds())
        return _MemoryWriter(self, self.new_id(), envelope)

    def inject(self, envelope: Envelope, body: bytes) -> str:
        """Store a whole message at once (a shortcut for ``open`` + ``write`` + ``commit``)."""
        writer = self.open(envelope)
        writer.write(body)
        writer.commit()
        return writer.queue_id

    def list_ids(self) -> defer.Deferred[list[str]]:
        return defer.succeed(sorted(self.messages))

    def load(self, queue_id: str) -> defer.Deferred[QueuedMessage]:
        if queue_id not in self.messages:
            return defer.fail(KeyError(queue_id))
        return defer.succeed(self.messages[queue_id])

    def open_body(self, queue_id: str) -> IO[bytes]:
        if queue_id not in self.bodies:
            raise KeyError(queue_id)
        return io.BytesIO(self.bodies[queue_id])

    def save(self, message: QueuedMessage) -> defer.Deferred[None]:
        if message.queue_id not in self.messages:
            return defer.fail(KeyError(message.queue_id))
        self.messages[message.queue_id] = message
        self.saves.append(message)
        return defer.succeed(None)

    def remove(self, queue_id: str) -> defer.Deferred[None]:
        if queue_id not in self.messages:
            return defer.fail(KeyError(queue_id))
        del self.messages[queue_id]
        del self.bodies[queue_id]
        self.removed.append(queue_id)
        return defer.succeed(None)

    def subscribe(self, callback: Callable[[str], object]) -> None:
        self.subscribers.append(callback)


# -- deliverer -------------------------------------------------------------------------------

#: One recipient's answer: ``(reply, remote)``, or with ``True`` when the hop took its DSN request.
Outcome = tuple[Reply, str | None] | tuple[Reply, str | None, bool]

#: One scripted answer: a ``Reply`` for every recipient, a list of replies (one per recipient),
#: a mapping of address → reply (others get ``default``), a callable ``(call) -> list[Reply]``,
#: or ``None`` to leave the call's Deferred unfired (the test fires ``call.deferred`` itself).
Answer = (
    Reply
    | Sequence[Reply]
    | Mapping[str, Reply]
    | Callable[["DeliveryCall"], Sequence[Reply]]
    | Exception
    | None
)


@attrs.define
class DeliveryCall:
    """What ``RecordingDeliverer.deliver`` was asked, with the body it read and its Deferred."""

    envelope: Envelope
    recipients: list[Recipient]
    route: Route
    body: bytes
    deferred: defer.Deferred[list[Outcome]]

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self.recipients]

    def answer(self, replies: Reply | Sequence[Reply], remote: str | None = None) -> None:
        """Fire a call left pending (scripted ``None``)."""
        if isinstance(replies, Reply):
            replies = [replies] * len(self.recipients)
        self.deferred.callback([(r, remote) for r in replies])


_OK = Reply(250, "2.0.0", "Ok")


@implementer(IDeliverer)
class RecordingDeliverer:
    """``IDeliverer`` that records every call and answers from a script, then with ``default``.

    ``remote`` is reported as the host that answered (default: the route's first hop). ``dsn``:
    the hop takes DSN requests, so a success for a recipient with NOTIFY says so (its third item).
    """

    def __init__(
        self,
        script: Iterable[Answer] = (),
        default: Answer = _OK,
        remote: str | None = None,
        dsn: bool = False,
    ) -> None:
        self.script = list(script)
        self.default = default
        self.remote = remote
        self.dsn = dsn
        self.calls: list[DeliveryCall] = []

    def deliver(
        self,
        envelope: Envelope,
        recipients: Sequence[Recipient],
        route: Route,
        open_body: Callable[[], IO[bytes]],
    ) -> defer.Deferred[list[Outcome]]:
        with open_body() as f:
            body = f.read()
        d: defer.Deferred[list[Outcome]] = defer.Deferred()
        call = DeliveryCall(envelope, list(recipients), route, body, d)
        self.calls.append(call)
        answer = self.script.pop(0) if self.script else self.default
        if answer is None:
            return d
        if isinstance(answer, Exception):
            d.errback(answer)
            return d
        if callable(answer) and not isinstance(answer, Reply):
            replies: Sequence[Reply] = answer(call)
        elif isinstance(answer, Reply):
            replies = [answer] * len(recipients)
        elif isinstance(answer, Mapping):
            fallback = self.default if isinstance(self.default, Reply) else _OK
            replies = [answer.get(r.address, fallback) for r in recipients]
        else:
            replies = list(answer)
        hop = route.hops[0] if route.hops else None
        remote = self.remote or (f"{hop.name or hop.host}[{hop.host}]:{hop.port}" if hop else None)
        passed = [self.dsn and bool(rcpt.notify) for rcpt in recipients] + [False] * len(replies)
        d.callback(
            [
                (r, remote, True) if passed[k] and r.is_success else (r, remote)
                for k, r in enumerate(replies)
            ]
        )
        return d

    @property
    def delivered(self) -> list[tuple[str, bytes]]:
        """``(address, body)`` for every recipient that got a 2xx, in order."""
        out = []
        for call in self.calls:
            if call.deferred.called and isinstance(call.deferred.result, list):
                for rcpt, (reply, *_) in zip(call.recipients, call.deferred.result, strict=False):
                    if reply.is_success:
                        out.append((rcpt.address, call.body))
        return out


# -- router ----------------------------------------------------------------------------------

RouterAnswer = Route | None | MailRelayError | Callable[[str, Envelope], Any]


@implementer(IRouter)
class FakeRouter:
    """``IRouter`` from a mapping of recipient address or domain → answer.

    An answer is a ``Route``, ``None`` ("not mine"), a ``TemporaryFailure``/``PermanentFailure`` to
    raise, or a callable ``(recipient, envelope)`` returning any of those or a Deferred. The full
    address is looked up first (ASCII letters lower-cased), then its domain, then ``"*"``.
    ``calls`` records every question.
    """

    def __init__(self, mapping: Mapping[str, RouterAnswer]) -> None:
        self.mapping = {_ascii.lower(k): v for k, v in mapping.items()}
        self.calls: list[tuple[str, Envelope]] = []

    def route(self, recipient: str, envelope: Envelope) -> Any:
        self.calls.append((recipient, envelope))
        key = _ascii.lower(recipient)
        for candidate in (key, domain_of(key), "*"):
            if candidate in self.mapping:
                answer = self.mapping[candidate]
                break
        else:
            return None
        if isinstance(answer, MailRelayError):
            raise answer
        if callable(answer) and not isinstance(answer, Route):
            return answer(recipient, envelope)
        return answer
