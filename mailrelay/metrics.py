"""Prometheus metrics: an ``IRelayObserver`` that counts, and the twisted.web page that shows them.

Each ``RelayMetrics`` has its own ``CollectorRegistry`` (never the global one), so two services in
one process, or many tests, never collide. Queue size and age are read from the queue manager when
scraped, not kept up to date on every event.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.twisted import MetricsResource
from twisted.web.resource import Resource
from twisted.web.server import Site

from mailrelay.envelope import Envelope, Reply
from mailrelay.observer import RelayObserver

#: Delivery attempts and end-to-end delays span milliseconds (a sink next door) to days (retries).
ATTEMPT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
DELAY_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400)
SIZE_BUCKETS = (1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)

_BASE32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def queue_id_time(queue_id: str) -> float | None:
    """When ``queue_id`` was minted (its first 10 base32 characters are epoch milliseconds)."""
    millis = 0
    for ch in queue_id[:10]:
        value = _BASE32.find(ch)
        if value < 0:
            return None
        millis = millis * 32 + value
    return millis / 1000.0 if len(queue_id) >= 10 else None


def status_label(reply: Reply) -> str:
    """A bounded label for a reply: its enhanced code (``5.7.1``), else its basic code."""
    return reply.enhanced or str(reply.code)


def outcome(reply: Reply) -> str:
    """Postfix's words for a recipient's attempt: sent, deferred or bounced."""
    if reply.is_success:
        return "sent"
    return "bounced" if reply.is_permanent else "deferred"


class _QueueCollector(Collector):
    """Reads the manager's schedule at scrape time: messages waiting, in flight, the oldest age."""

    def __init__(self, manager: Any, clock: Any) -> None:
        self.manager = manager
        self.clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        scheduled = self.manager.scheduled()
        active = self.manager.active_ids()
        ids = set(scheduled) | set(active)
        times = [t for t in map(queue_id_time, ids) if t is not None]
        now = self.clock.seconds()
        yield GaugeMetricFamily(
            "mailrelay_queue_messages",
            "Messages in the queue (scheduled or being delivered)",
            value=len(ids),
        )
        yield GaugeMetricFamily(
            "mailrelay_queue_active_messages",
            "Messages with a delivery attempt running",
            value=len(active),
        )
        yield GaugeMetricFamily(
            "mailrelay_queue_oldest_age_seconds",
            "Age of the oldest queued message",
            value=max(0.0, now - min(times)) if times else 0.0,
        )


class RelayMetrics(RelayObserver):
    """Counts what the relay reports, into ``self.registry`` (a fresh registry unless given)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.connections = Counter(
            "mailrelay_connections_total", "SMTP connections accepted", registry=r
        )
        self.connections_open = Gauge(
            "mailrelay_connections_open", "SMTP connections open now", registry=r
        )
        self.refused = Counter(
            "mailrelay_connections_refused_total",
            "Connections turned away at connect",
            ["status"],
            registry=r,
        )
        self.rejections = Counter(
            "mailrelay_smtp_rejections_total",
            "4xx/5xx replies by command and status",
            ["command", "status"],
            registry=r,
        )
        self.accepted = Counter(
            "mailrelay_messages_accepted_total", "Messages queued (250 after DATA/BDAT)", registry=r
        )
        self.rejected = Counter(
            "mailrelay_messages_rejected_total",
            "Messages refused after their text (DATA/BDAT), by status",
            ["reason"],
            registry=r,
        )
        self.sizes = Histogram(
            "mailrelay_message_size_bytes",
            "Size of accepted messages",
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.deliveries = Counter(
            "mailrelay_deliveries_total",
            "Recipient outcomes of delivery attempts and of routing by outcome",
            ["outcome"],
            registry=r,
        )
        self._delivery_children: dict[str, Any] = {}
        self.attempt_seconds = Histogram(
            "mailrelay_delivery_attempt_seconds",
            "Duration of one delivery attempt to a next hop",
            buckets=ATTEMPT_BUCKETS,
            registry=r,
        )
        self.delay_seconds = Histogram(
            "mailrelay_delivery_delay_seconds",
            "Time from acceptance to successful delivery",
            buckets=DELAY_BUCKETS,
            registry=r,
        )
        self.tls = Counter(
            "mailrelay_tls_handshakes_total",
            "TLS sessions by direction and version",
            ["direction", "version"],
            registry=r,
        )
        self.outbound = Counter(
            "mailrelay_outbound_connections_total",
            "New connections to next hops",
            ["tls"],
            registry=r,
        )
        self.reloads = Counter(
            "mailrelay_config_reloads_total",
            "Configuration reloads (SIGHUP)",
            ["result"],
            registry=r,
        )
        self.clock: Any = None

    def watch_queue(self, manager: Any, clock: Any) -> None:
        """Report the size and age of ``manager``'s queue at every scrape."""
        self.clock = clock
        self.registry.register(_QueueCollector(manager, clock))

    # -- IRelayObserver ------------------------------------------------------------------------

    def connection_opened(self, info: Any) -> None:
        self.connections.inc()
        self.connections_open.inc()

    def connection_closed(self, info: Any) -> None:
        self.connections_open.dec()

    def connection_refused(self, client_address: str, reply: Reply) -> None:
        self.refused.labels(status_label(reply)).inc()

    def tls_established(self, direction: str, version: str) -> None:
        self.tls.labels(direction, version or "unknown").inc()

    def command_rejected(self, command: str, reply: Reply) -> None:
        label = status_label(reply)
        self.rejections.labels(command or "none", label).inc()
        if command in ("DATA", "BDAT"):
            self.rejected.labels(label).inc()

    def message_accepted(self, info: Any, envelope: Envelope, queue_id: str, size: int) -> None:
        self.accepted.inc()
        self.sizes.observe(size)

    def _count_delivery(self, result: str) -> None:
        child = self._delivery_children.get(result)
        if (
            child is None
        ):  # labels() takes a lock and validates: once per outcome, not per recipient
            child = self._delivery_children[result] = self.deliveries.labels(result)
        child.inc()

    def delivery_attempted(
        self, envelope: Envelope, reply: Reply, remote: str | None, seconds: float
    ) -> None:
        result = outcome(reply)
        self._count_delivery(result)
        self.attempt_seconds.observe(seconds)
        if result == "sent" and envelope.received_at and self.clock is not None:
            self.delay_seconds.observe(max(0.0, self.clock.seconds() - envelope.received_at))

    def recipient_unrouted(self, envelope: Envelope, recipient: str, reply: Reply) -> None:
        self._count_delivery(outcome(reply))  # bounced or deferred, though no next hop was tried

    def outbound_connection(self, remote: str, tls: str) -> None:
        self.outbound.labels("yes" if tls else "no").inc()
        if tls:
            self.tls.labels("outbound", tls.split()[0]).inc()


def metrics_site(registry: CollectorRegistry) -> Site:
    """A twisted.web site answering ``/metrics`` (and ``/`` with a pointer to it)."""
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=registry))
    root.putChild(b"", _Index())
    return _QuietSite(root)


class _QuietSite(Site):
    """No "Starting factory" line (the listener's own line says where it listens), and no access
    log line per request: a scrape every few seconds would fill the mail log with nothing."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


class _Index(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"mailrelay: metrics at /metrics\n"


#: Gauges whose instance-wide value is the largest of the processes', not their sum.
MERGE_MAX = frozenset({"mailrelay_queue_oldest_age_seconds"})


def merge_exposition(texts: list[str]) -> list[Any]:
    """Several processes' ``/metrics`` texts as one instance's metric families.

    Every sample with the same name and labels is added up (counters, histogram buckets, sums and
    counts, gauges such as queue sizes and open connections), except the gauges of
    ``MERGE_MAX`` (the oldest message is the oldest of any process) and ``*_created`` (the
    earliest). A worker that restarted starts its counters again from 0, which Prometheus'
    ``rate()`` reads as a counter reset.
    """
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Any] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, family)
            merged = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in merged:
                    merged[key] = sample.value
                elif sample.name.endswith("_created"):
                    merged[key] = min(merged[key], sample.value)
                elif family.name in MERGE_MAX:
                    merged[key] = max(merged[key], sample.value)
                else:
                    merged[key] += sample.value
    out = []
    for name, family in families.items():
        from prometheus_client.metrics_core import Metric

        metric = Metric(family.name, family.documentation, family.type, family.unit)
        for (sample_name, labels), value in values[name].items():
            metric.add_sample(sample_name, dict(labels), value)
        out.append(metric)
    return out


class StaticCollector(Collector):
    """Yields the families it is given (merged figures, for a one-off registry to render)."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Iterator[Any]:
        return iter(self.families)
