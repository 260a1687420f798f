"""The small interfaces between the rooms, so each can be replaced or tested alone.

The wire (``mailrelay.smtp``) knows only ``IPolicy`` and ``IMessageSink``; the queue manager knows
``IQueueStore``, ``IRouter`` and ``IDeliverer``. What a store can do beyond ``IQueueStore`` is
an interface of its own (``ILeasingStore``, ``IScheduleLoader``, ``IBatchLoader``,
``IStartableStore``, and the writers' ``IPrependingWriter``), asked with ``providedBy``, never
sniffed with ``getattr``; ``IOfflineQueue`` is the queue of an instance that is not running, as
the ``mailrelay queue`` command edits it.
Methods documented as "or a Deferred of it" may answer synchronously or asynchronously; callers
wrap them in ``maybeDeferred``.
"""

# mypy: disable-error-code="no-untyped-def, misc"
# (zope.interface declares methods without ``self`` and untyped: specifications, not functions.)

from __future__ import annotations

from zope.interface import Attribute, Interface


class IRouter(Interface):
    """Answers *where* one recipient goes next."""

    def route(recipient, envelope):
        """Return a ``Route``, ``None`` ("not mine, ask the next router") or a Deferred of either.

        Raise (or fail with) ``TemporaryFailure`` when it cannot answer now, ``PermanentFailure``
        when the recipient does not exist or cannot be routed ever.

        @param recipient: the recipient address (``str``).
        @param envelope: the ``Envelope`` of the message.
        """


class IRouterFactory(Interface):
    """What a ``mailrelay.routers`` entry point names: builds a router from its config table."""

    def __call__(options, context):
        """Return an ``IRouter`` provider.

        @param options: the ``[[routes]]`` table (a ``dict``), less its ``type`` key.
        @param context: a ``mailrelay.routing.context.RouterContext`` (reactor, thread pool, ...).
        @raise ConfigError: when an option is wrong (name the key).
        """


class IMessageWriter(Interface):
    """One message being received: its body streams in, then it is committed or aborted."""

    queue_id = Attribute("The id the message will have once committed (str).")

    def write(data):
        """Append body bytes (already dot-unstuffed, CRLF line endings). Never blocks for long."""

    def commit():
        """Make the message durable. Returns a Deferred firing with the queue id once fsynced.

        Fails with ``TemporaryFailure`` (e.g. 452 4.3.1 disk full) when it cannot be stored; nothing
        half-written is left behind then.
        """

    def abort():
        """Throw the message away (size exceeded, client vanished). Idempotent."""


class IPrependingWriter(IMessageWriter):
    """A message writer that also keeps header fields to deliver in front of the text: what a
    stage after the text (DKIM signing at intake) adds once. Every store of ours provides it;
    a writer without it gets its messages delivered as received (unsigned)."""

    def prepend(header):
        """Deliver ``header`` (whole header fields, CRLF-terminated octets) in front of the
        message. At most once, before ``commit()``; made durable by that commit, in the
        message's record (``QueuedMessage.prefix``); the stored text is unchanged."""


class IMessageSink(Interface):
    """The wire's only door to storage: the server opens a writer per accepted DATA/BDAT."""

    def open(envelope):
        """Return an ``IMessageWriter`` for a message with this ``Envelope``."""


class IQueueStore(IMessageSink):
    """Durable storage of queued messages (filesystem spool, PostgreSQL)."""

    def list_ids():
        """Deferred list of the queue ids of every committed message."""

    def load(queue_id):
        """Deferred ``QueuedMessage``; fails with ``KeyError`` when there is no such message."""

    def open_body(queue_id):
        """Open the stored body for reading (a binary file object positioned at 0)."""

    def save(message):
        """Durably record a ``QueuedMessage``'s new state (statuses, attempts, schedule).
        Deferred."""

    def remove(queue_id):
        """Delete the message and its body. Deferred."""

    def subscribe(callback):
        """Call ``callback(queue_id)`` after each commit (new mail); returns nothing."""


class ILeasingStore(IQueueStore):
    """A store shared by several nodes: a node attempts only the messages it has leased.

    The queue manager claims before each attempt and releases after it when its store provides
    this; a lease a dead node held expires, and the store then wakes the other nodes' subscribers.
    """

    def claim(queue_id):
        """Deferred ``True`` if this node now leases ``queue_id`` (due, not held, no live lease
        elsewhere); ``False`` when another node has it or it is gone."""

    def release(queue_id):
        """Give up the lease after the attempt's outcome was saved. Deferred; never fails."""

    def make_due(queue_id=None):
        """Make ``queue_id`` (or every message not held) due now, and wake every node: an operator's
        flush (a node claims only due messages). Deferred list of the ids made due."""


class IScheduleLoader(Interface):
    """A store that reads every message's schedule in one pass, without building each message
    (the filesystem spool: 100,000 messages then take seconds at start-up)."""

    def load_schedule():
        """Deferred list of ``(queue_id, next_attempt, held)`` of every committed message."""


class IBatchLoader(Interface):
    """A store that loads many messages in one pass (a listing of the queue)."""

    def load_many(ids):
        """Deferred list of the ``QueuedMessage`` of each of ``ids`` still queued, in that order
        (those gone meanwhile are left out)."""


class IStartableStore(Interface):
    """A store with work of its own (threads, connections): started before the queue manager,
    stopped after it."""

    def start():
        """Begin that work; returns nothing."""

    def stop():
        """Finish what was submitted and end that work. Deferred (or None when done at once)."""


class IOfflineQueue(Interface):
    """The queue of an instance that is not running, read and edited directly and synchronously
    (``mailrelay queue list/show/summary/delete/hold/release`` with no instance to ask)."""

    def scan_ids():
        """The queue ids of every committed message, sorted."""

    def read_message(queue_id):
        """The ``QueuedMessage``; raises ``KeyError`` when there is no such message."""

    def body_size(queue_id):
        """The stored body's size in bytes; raises ``KeyError`` when there is no such message."""

    def open_body(queue_id):
        """Open the stored body for reading (a binary file object positioned at 0)."""

    def save_now(message):
        """Durably record a ``QueuedMessage``'s new state before returning."""

    def remove_now(queue_id):
        """Delete the message and its body before returning."""


class IOfflineSharedQueue(IOfflineQueue):
    """The queue shared by several nodes (PostgreSQL), edited where no node runs: a flush makes
    messages due in the store, and the nodes running elsewhere hear of it."""

    def make_due(queue_id, now):
        """Make ``queue_id`` (or every message not held) due at ``now`` and wake the running
        nodes; the list of ids made due."""


class IPolicy(Interface):
    """Checks at each stage of an SMTP session.

    Every method returns ``None`` (no objection), a ``Reply`` to refuse with, or a Deferred of
    either.
    ``session`` is a ``mailrelay.envelope.SessionInfo``.
    """

    def connect(session):
        """A client connected (before the greeting)."""

    def helo(session, name):
        """HELO/EHLO with this name."""

    def mail(session, sender, params):
        """MAIL FROM with this reverse-path (``""`` for ``<>``) and its ESMTP parameters."""

    def rcpt(session, sender, recipient, params):
        """RCPT TO with this forward-path and its ESMTP parameters."""

    def data(session, envelope):
        """Before the message text is read (DATA or the first BDAT)."""

    def end_of_data(session, envelope, size):
        """After the whole message text arrived, before it is committed."""


class IDeliverer(Interface):
    """Answers *how*: delivers one message to some of its recipients along one route."""

    def deliver(envelope, recipients, route, open_body):
        """Deliver, returning a Deferred list of ``(Reply, remote)``, one per recipient, in order.

        ``remote`` is the ``host[ip]:port`` that gave the reply, or ``None``. Never fails: network
        trouble is a 4xx ``Reply`` for every recipient it concerns. An answer may carry a third
        item, ``True`` when the next hop took the recipient's DSN request (NOTIFY, RFC 3461): it
        then reports the delivery itself, and the queue sends no "relayed" report of its own.

        @param recipients: the ``Recipient`` values to send, their addresses already rewritten.
        @param route: the ``Route`` they share (hops, TLS policy, AUTH, source address).
        @param open_body: zero-argument callable returning a fresh binary file of the body.
        """
