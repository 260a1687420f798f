"""The small interfaces between the rooms, so each can be replaced or tested alone.

The wire (``mailrelay.smtp``) knows only ``IPolicy`` and ``IMessageSink``; the queue manager knows
``IQueueStore``, ``IRouter`` and ``IDeliverer``. Methods documented as "or a Deferred of it" may
answer synchronously or asynchronously; callers wrap them in ``maybeDeferred``.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IRouter(Interface):
    """Answers *where* one recipient goes next."""

    def route(recipient, envelope):  # type: ignore[no-untyped-def]
        """Return a ``Route``, ``None`` ("not mine, ask the next router") or a Deferred of either.

        Raise (or fail with) ``TemporaryFailure`` when it cannot answer now, ``PermanentFailure``
        when the recipient does not exist or cannot be routed ever.

        @param recipient: the recipient address (``str``).
        @param envelope: the ``Envelope`` of the message.
        """


class IRouterFactory(Interface):
    """What a ``mailrelay.routers`` entry point names: builds a router from its config table."""

    def __call__(options, context):  # type: ignore[no-untyped-def]
        """Return an ``IRouter`` provider.

        @param options: the ``[[routes]]`` table (a ``dict``), less its ``type`` key.
        @param context: a ``mailrelay.routing.context.RouterContext`` (reactor, thread pool, ...).
        @raise ConfigError: when an option is wrong (name the key).
        """


class IMessageWriter(Interface):
    """One message being received: its body streams in, then it is committed or aborted."""

    queue_id = Attribute("The id the message will have once committed (str).")

    def write(data):  # type: ignore[no-untyped-def]
        """Append body bytes (already dot-unstuffed, CRLF line endings). Never blocks for long."""

    def commit():  # type: ignore[no-untyped-def]
        """Make the message durable. Returns a Deferred firing with the queue id once fsynced.

        Fails with ``TemporaryFailure`` (e.g. 452 4.3.1 disk full) when it cannot be stored; nothing
        half-written is left behind then.
        """

    def abort():  # type: ignore[no-untyped-def]
        """Throw the message away (size exceeded, client vanished). Idempotent."""


class IMessageSink(Interface):
    """The wire's only door to storage: the server opens a writer per accepted DATA/BDAT."""

    def open(envelope):  # type: ignore[no-untyped-def]
        """Return an ``IMessageWriter`` for a message with this ``Envelope``."""


class IQueueStore(IMessageSink):
    """Durable storage of queued messages (filesystem spool, PostgreSQL)."""

    def list_ids():  # type: ignore[no-untyped-def]
        """Deferred list of the queue ids of every committed message."""

    def load(queue_id):  # type: ignore[no-untyped-def]
        """Deferred ``QueuedMessage``; fails with ``KeyError`` when there is no such message."""

    def open_body(queue_id):  # type: ignore[no-untyped-def]
        """Open the stored body for reading (a binary file object positioned at 0)."""

    def save(message):  # type: ignore[no-untyped-def]
        """Durably record a ``QueuedMessage``'s new state (statuses, attempts, schedule). Deferred."""

    def remove(queue_id):  # type: ignore[no-untyped-def]
        """Delete the message and its body. Deferred."""

    def subscribe(callback):  # type: ignore[no-untyped-def]
        """Call ``callback(queue_id)`` after each commit (new mail); returns nothing."""


class ILeasingStore(IQueueStore):
    """A store shared by several nodes: a node attempts only the messages it has leased.

    The queue manager claims before each attempt and releases after it when its store provides
    this; a lease a dead node held expires, and the store then wakes the other nodes' subscribers.
    """

    def claim(queue_id):  # type: ignore[no-untyped-def]
        """Deferred ``True`` if this node now leases ``queue_id`` (due, not held, no live lease
        elsewhere); ``False`` when another node has it or it is gone."""

    def release(queue_id):  # type: ignore[no-untyped-def]
        """Give up the lease after the attempt's outcome was saved. Deferred; never fails."""

    def make_due(queue_id=None):  # type: ignore[no-untyped-def]
        """Make ``queue_id`` (or every message not held) due now, and wake every node: an operator's
        flush (a node claims only due messages). Deferred list of the ids made due."""


class IPolicy(Interface):
    """Checks at each stage of an SMTP session.

    Every method returns ``None`` (no objection), a ``Reply`` to refuse with, or a Deferred of either.
    ``session`` is a ``mailrelay.smtp.session.SessionInfo``.
    """

    def connect(session):  # type: ignore[no-untyped-def]
        """A client connected (before the greeting)."""

    def helo(session, name):  # type: ignore[no-untyped-def]
        """HELO/EHLO with this name."""

    def mail(session, sender, params):  # type: ignore[no-untyped-def]
        """MAIL FROM with this reverse-path (``""`` for ``<>``) and its ESMTP parameters."""

    def rcpt(session, sender, recipient, params):  # type: ignore[no-untyped-def]
        """RCPT TO with this forward-path and its ESMTP parameters."""

    def data(session, envelope):  # type: ignore[no-untyped-def]
        """Before the message text is read (DATA or the first BDAT)."""

    def end_of_data(session, envelope, size):  # type: ignore[no-untyped-def]
        """After the whole message text arrived, before it is committed."""


class IDeliverer(Interface):
    """Answers *how*: delivers one message to some of its recipients along one route."""

    def deliver(envelope, recipients, route, open_body):  # type: ignore[no-untyped-def]
        """Deliver, returning a Deferred list of ``(Reply, remote)``, one per recipient, in order.

        ``remote`` is the ``host[ip]:port`` that gave the reply, or ``None``. Never fails: network
        trouble is a 4xx ``Reply`` for every recipient it concerns. An answer may carry a third
        item, ``True`` when the next hop took the recipient's DSN request (NOTIFY, RFC 3461): it
        then reports the delivery itself, and the queue sends no "relayed" report of its own.

        @param recipients: the ``Recipient`` values to send, their addresses already rewritten.
        @param route: the ``Route`` they share (hops, TLS policy, AUTH, source address).
        @param open_body: zero-argument callable returning a fresh binary file of the body.
        """
