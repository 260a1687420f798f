"""Three real relays share one PostgreSQL queue; one is SIGKILLed mid-run and the others take over.

Every message that got its 250 (from any node) must arrive at the sink; a message may arrive twice
only if it was in flight at the kill: leased by the killed node then, or sent to it without an
answer (the client then sent it again elsewhere). Those are counted and printed.
"""

from __future__ import annotations

import itertools
import smtplib
import threading
import time
from collections import Counter

import pytest

from tests.support.peers import SMTPSink
from tests.support.pgserver import psycopg, temp_schema
from tests.support.relay import RelayProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def spool_keys(dsn: str) -> str:
    return f'backend = "postgresql"\ndsn = "{dsn}"\nlease_time = "4s"\nscan_interval = "1s"\n'


def routes(port: int) -> str:
    return (
        f'[queue]\nretry_schedule = ["1s"]\n[[routes]]\ntype = "static"\ndomains = ["*"]\n'
        f'hosts = ["127.0.0.1:{port}"]\n'
    )


class Sender(threading.Thread):
    """Sends its share of numbered messages, 10 per session, to its node; when that node is gone,
    to the next live one (as a client falls back to the next MX). Remembers what got a 250 and what
    was sent without an answer."""

    def __init__(
        self, numbers: list[int], nodes: list[RelayProcess], first: int, state: dict
    ) -> None:
        super().__init__(daemon=True)
        self.numbers, self.nodes, self.node, self.state = numbers, nodes, first, state

    def run(self) -> None:
        todo = list(self.numbers)
        while todo and not self.state["stop"].is_set():
            node = self.nodes[self.node]
            try:
                with smtplib.SMTP("127.0.0.1", node.port, timeout=20) as client:
                    while todo:
                        mid = f"<m{todo[0]}@multinode.test>"
                        body = f"Message-ID: {mid}\r\nSubject: multinode\r\n\r\n{'x' * 700}\r\n"
                        self.state["sent"].add(mid)
                        client.sendmail("s@example.org", ["r@example.test"], body.encode())
                        with self.state["lock"]:
                            self.state["acked"].append(mid)
                            self.state["sent"].discard(mid)
                        todo.pop(0)
                        if len(todo) % 10 == 0:
                            break  # a new session every 10 messages
            except (OSError, smtplib.SMTPException):
                self.node = (self.node + 1) % len(self.nodes)  # the node died: try the next one
                time.sleep(0.05)


def message_ids(sink: SMTPSink) -> list[str]:
    out = []
    for t in sink.transactions():
        for line in t.data.split(b"\r\n"):
            if line.startswith(b"Message-ID: "):
                out.append(line[12:].decode())
                break
    return out


def leased_by(dsn: str, pid: int) -> set[str]:
    """The Message-IDs of the messages the process ``pid`` held leases on."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT b.data FROM mailrelay_message m JOIN mailrelay_body b USING (queue_id)"
            " WHERE b.seq = 0 AND m.lease_owner LIKE %s",
            (f"%:{pid}:%",),
        ).fetchall()
    out = set()
    for (data,) in rows:
        for line in bytes(data).split(b"\r\n"):
            if line.startswith(b"Message-ID: "):
                out.add(line[12:].decode())
                break
    return out


@pytest.mark.parametrize("total", [1000, pytest.param(2000, marks=pytest.mark.soak)])
def test_three_nodes_one_killed_every_acknowledged_message_arrives(total):
    sink = SMTPSink().start()
    with temp_schema("mr_multinode") as dsn:
        nodes = [
            RelayProcess(
                routes(sink.port), hostname=f"node{i}.mailrelay.test", spool_keys=spool_keys(dsn)
            )
            for i in range(3)
        ]
        state = {"acked": [], "sent": set(), "lock": threading.Lock(), "stop": threading.Event()}
        try:
            for node in nodes:
                node.start()
            numbers = list(range(total))
            per = [numbers[i::6] for i in range(6)]
            senders = [Sender(per[i], nodes, i % 3, state) for i in range(6)]
            for s in senders:
                s.start()
            while len(state["acked"]) < total // 2:
                time.sleep(0.01)
            victim = nodes[0]
            pid = victim.proc.pid
            victim.kill()
            in_flight = leased_by(dsn, pid) | set(state["sent"])
            victim_ports = {victim.port}
            for s in senders:
                s.join(120)
            assert not any(s.is_alive() for s in senders)
            expected = set(state["acked"])
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                got = Counter(message_ids(sink))
                if expected <= set(got):
                    break
                time.sleep(0.2)
            time.sleep(1.0)  # let any late duplicate show up before counting
            got = Counter(message_ids(sink))
            missing = expected - set(got)
            duplicates = {mid: n for mid, n in got.items() if n > 1}
            print(
                f"\nmultinode: {total} messages, {len(expected)} acknowledged by 3 nodes "
                f"(node on port {victim_ports} killed at {total // 2}), {len(missing)} lost, "
                f"{len(in_flight)} in flight at the kill, "
                f"{sum(n - 1 for n in duplicates.values())} "
                f"delivered twice"
            )
            assert not missing, f"lost {len(missing)} acknowledged messages: {sorted(missing)[:5]}"
            assert set(duplicates) <= in_flight, sorted(set(duplicates) - in_flight)[:5]
            assert all(n == 2 for n in duplicates.values())
            # the survivors emptied the shared queue
            with psycopg.connect(dsn) as conn:
                for _ in itertools.repeat(None, 100):
                    if conn.execute("SELECT count(*) FROM mailrelay_message").fetchone()[0] == 0:
                        break
                    time.sleep(0.1)
                else:
                    raise AssertionError("messages left in the shared queue")
        finally:
            state["stop"].set()
            for node in nodes:
                node.cleanup()
            sink.stop()
