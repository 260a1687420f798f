"""The supervisor's ``/metrics``: every running worker's figures, asked at scrape time and summed.

Each worker already answers the control channel's ``Metrics`` command (its own registry in the
text format) on ``<its shard>/control.sock``; the supervisor asks them all when scraped and
merges (``mailrelay.metrics.merge_exposition``), then adds its own (workers running, restarts).
So one ``[metrics] listen`` endpoint shows the whole instance, with no shared files or
multiprocess mode. A worker that does not answer within ``TIMEOUT`` is left out of that scrape
(``mailrelay_workers_scraped`` says how many answered).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from mailrelay.metrics import StaticCollector, merge_exposition

log = Logger(namespace="mailrelay.workers")

TIMEOUT = 5.0


@defer.inlineCallbacks
def worker_metrics(reactor: Any, socket_path: str) -> Generator[defer.Deferred[Any], Any, str]:
    """One worker's figures (text format), over its control socket."""
    from mailrelay.control import protocol
    from mailrelay.control.client import connect

    proto = yield connect(reactor, socket_path, timeout=TIMEOUT)
    try:
        answer = yield proto.callRemote(protocol.Metrics).addTimeout(TIMEOUT, reactor)
    finally:
        proto.transport.loseConnection()
    return answer["text"]


@defer.inlineCallbacks
def instance_metrics(supervisor: Any) -> Generator[defer.Deferred[Any], Any, bytes]:
    """The whole instance's ``/metrics`` page: the workers' figures summed, and the supervisor's."""
    from mailrelay.control.server import socket_path
    from mailrelay.queue.spool.shards import shard_path

    paths = [
        socket_path(shard_path(supervisor.config.spool.path, w.index))
        for w in supervisor.workers
        if w.process is not None
    ]
    results = yield defer.DeferredList(
        [worker_metrics(supervisor.reactor, p) for p in paths], consumeErrors=True
    )
    texts = [text for ok, text in results if ok]
    for ok, failure in results:
        if not ok:
            log.debug("a worker's metrics: {error}", error=failure.getErrorMessage())
    registry = CollectorRegistry()
    scraped = GaugeMetricFamily(
        "mailrelay_workers_scraped", "Workers whose figures this page adds up", value=len(texts)
    )
    registry.register(StaticCollector([*merge_exposition(texts), scraped]))
    return generate_latest(registry) + generate_latest(supervisor.metrics.registry)


class _InstanceMetrics(Resource):
    isLeaf = True

    def __init__(self, supervisor: Any) -> None:
        super().__init__()
        self.supervisor = supervisor

    def render_GET(self, request: Any) -> Any:
        d = instance_metrics(self.supervisor)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))  # the scraper hung up

        def write(body: bytes) -> None:
            if not gone:
                request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
                request.write(body)
                request.finish()

        def failed(f: Any) -> None:
            log.failure("metrics page", f)
            if not gone:
                request.setResponseCode(500)
                request.finish()

        d.addCallbacks(write, failed)
        return NOT_DONE_YET


def supervisor_metrics_site(supervisor: Any) -> Site:
    """``/metrics`` for the whole instance (and ``/`` pointing to it), like ``metrics_site``."""
    from mailrelay.metrics import _Index

    root = Resource()
    root.putChild(b"metrics", _InstanceMetrics(supervisor))
    root.putChild(b"", _Index())
    return Site(root)
