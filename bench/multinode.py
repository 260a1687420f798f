"""Throughput of mailrelay nodes sharing one PostgreSQL queue: 1, 2 and 3 nodes, same run.

    .venv/bin/python bench/multinode.py [--messages 3000] [--sessions 10] [--runs 3]
    .venv/bin/python bench/multinode.py --dsn "host=127.0.0.1 dbname=test user=postgres"

Each configuration gets a fresh schema (made here, dropped after). N messages of 1 KiB, one
recipient, a new session per message, are sent by one ``smtp-source`` per node (N/k messages,
``--sessions`` sessions each, all at once) and relayed to one ``smtp-sink``. Printed per
configuration (medians): *accept* msg/s (until every smtp-source has its 250s) and *end to end*
msg/s (until the sink has counted all N). The filesystem spool on one node is the reference row.
Nothing asserts a time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peers import Sink, free_port, stop_process, wait_listening  # noqa: E402
from relay import source_args  # noqa: E402

CONFIG = """\
[server]
hostname = "node{index}.bench.test"
listen = ["tcp:{port}:interface=127.0.0.1:backlog=1024"]
trusted_networks = ["127.0.0.0/8"]
max_connections_per_ip = 1000

[spool]
path = "{spool}"
{spool_keys}

[queue]
retry_schedule = ["5s"]

[[routes]]
type = "static"
domains = ["*"]
hosts = ["127.0.0.1:{nexthop}"]
"""


class Node:
    """One ``twistd -n mailrelay`` in a temp dir."""

    def __init__(self, index: int, nexthop: int, spool_keys: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bench-node-"))
        self.port = free_port()
        conf = self.dir / "mailrelay.toml"
        conf.write_text(
            CONFIG.format(
                index=index,
                port=self.port,
                spool=self.dir / "spool",
                spool_keys=spool_keys,
                nexthop=nexthop,
            )
        )
        self.log = open(self.dir / "twistd.log", "wb")
        twistd = Path(sys.executable).parent / "twistd"
        self.proc = subprocess.Popen(
            [str(twistd), "-n", "--pidfile=", "mailrelay", "--config", str(conf)],
            cwd=self.dir,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_listening(self.port, proc=self.proc)

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()
        subprocess.run(["rm", "-rf", str(self.dir)], check=False)


def one_run(nodes: int, backend: str, dsn: str, n: int, sessions: int) -> tuple[float, float]:
    """(accept msg/s, end-to-end msg/s) for ``nodes`` nodes on a fresh schema."""
    sink = Sink()
    schema = f"mr_bench_{uuid.uuid4().hex[:10]}"
    started: list[Node] = []
    try:
        if backend == "postgresql":
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f'CREATE SCHEMA "{schema}"')
            node_dsn = f"{dsn} options='-csearch_path={schema}'"
            keys = f'backend = "postgresql"\ndsn = "{node_dsn}"\n'
        else:
            keys = ""
        for i in range(nodes):
            started.append(Node(i, sink.port, keys))
        share = [n // nodes + (1 if i < n % nodes else 0) for i in range(nodes)]
        t0 = time.perf_counter()
        sources = [
            subprocess.Popen(source_args(node.port, sessions, k), stdout=subprocess.DEVNULL)
            for node, k in zip(started, share, strict=True)
        ]
        for p in sources:
            p.wait(timeout=600)
        accepted = time.perf_counter() - t0
        if not sink.wait_for(n, timeout=600):
            raise RuntimeError(f"the sink counted {sink.count()} of {n}")
        delivered = time.perf_counter() - t0
        return n / accepted, n / delivered
    finally:
        for node in started:
            node.stop()
        sink.stop()
        if backend == "postgresql":
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", default="host=127.0.0.1 port=5432 dbname=test user=postgres")
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--sessions", type=int, default=10, help="concurrent sessions per node")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nodes", default="1,2,3")
    args = parser.parse_args(argv)
    configs = [("filesystem", 1)] + [("postgresql", int(k)) for k in args.nodes.split(",")]
    results: dict[tuple[str, int], list[tuple[float, float]]] = {c: [] for c in configs}
    for _ in range(args.runs):  # alternate the configurations, run after run
        for backend, nodes in configs:
            results[(backend, nodes)].append(
                one_run(nodes, backend, args.dsn, args.messages, args.sessions)
            )
    print(
        f"\n{args.messages} messages of 1 KiB, {args.sessions} sessions per node, "
        f"median of {args.runs} runs"
    )
    print(f"{'backend':<12} {'nodes':>5} {'accept msg/s':>13} {'end-to-end msg/s':>17}")
    for (backend, nodes), runs in results.items():
        acc = statistics.median(r[0] for r in runs)
        e2e = statistics.median(r[1] for r in runs)
        print(f"{backend:<12} {nodes:>5} {acc:>13.0f} {e2e:>17.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
