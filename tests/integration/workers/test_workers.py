"""``[server] workers = 2`` end to end: a real ``twistd mailrelay`` supervisor, its worker
processes,
smtp-source / smtplib clients and smtp-sink as the next hop."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from tests.support.peers import SMTPSink, free_port, require
from tests.support.relay import RelayProcess, Sender
from tests.support.reliability.helpers import message_ids, route_to

pytestmark = pytest.mark.integration

_RECEIVED_ID = re.compile(rb"\(mailrelay\) with E?SMTP\S* id ([0-9A-Z]{18})")


def shard_of(queue_id: str) -> int:
    """The worker that minted ``queue_id``: a sharded ``QueueIdGenerator`` writes its number as the
    id's 11th character, a digit of the ids' base32."""
    return "0123456789ABCDEFGHJKMNPQRSTVWXYZ".index(queue_id[10])


def start_workers(relay: RelayProcess, n: int = 2) -> RelayProcess:
    relay.start()
    for k in range(n):
        relay.wait_log(f"worker {k} running")
    return relay


def worker_pids(relay: RelayProcess) -> dict[int, int]:
    """The latest pid of each worker, from the supervisor's log."""
    found = re.findall(r"worker (\d+) started \(pid (\d+)\)", relay.log_text())
    return {int(k): int(pid) for k, pid in found}


def smtp_source(port: int, sessions: int, n: int) -> None:
    subprocess.run(
        [
            require("smtp-source"),
            "-s",
            str(sessions),
            "-m",
            str(n),
            "-l",
            "300",
            "-N",
            "-f",
            "s@example.org",
            "-t",
            "r@example.test",
            f"127.0.0.1:{port}",
        ],
        check=True,
        timeout=60,
        stdout=subprocess.DEVNULL,
    )


def received_ids(sink: SMTPSink) -> list[str]:
    out = []
    for raw in sink.messages():
        m = _RECEIVED_ID.search(raw)
        assert m, raw[:500]
        out.append(m.group(1).decode())
    return out


def cli(relay: RelayProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mailrelay.cli", "queue", *args, "--config", str(relay.config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def queued_ids(relay: RelayProcess) -> list[str]:
    listing = cli(relay, "list", "--json")
    assert listing.returncode == 0, listing.stderr
    return [m["queue_id"] for m in json.loads(listing.stdout)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


def test_both_workers_accept_and_every_message_arrives_once(smtp_sink):
    sink = smtp_sink
    metrics_port = free_port()
    relay = RelayProcess(
        route_to(
            sink.port,
            extra=f"[server]\nworkers = 2\n[metrics]\nlisten = "
            f'"tcp:{metrics_port}:interface=127.0.0.1"\n',
        )
    )
    try:
        start_workers(relay)
        sent = 0
        for _ in range(5):  # the kernel picks the worker: load until both have taken mail
            smtp_source(relay.port, 10, 40)
            sent += 40
            sink.wait_for(sent)
            if {shard_of(i) for i in received_ids(sink)} == {0, 1}:
                break
        ids = received_ids(sink)
        assert len(ids) == sent and len(set(ids)) == sent  # each once
        assert {shard_of(i) for i in ids} == {0, 1}
        page = (
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
            .read()
            .decode()
        )
        figures = dict(
            line.rsplit(" ", 1) for line in page.splitlines() if line and not line.startswith("#")
        )
        assert (
            float(figures["mailrelay_messages_accepted_total"]) == sent
        )  # both workers' counts, added up
        assert float(figures["mailrelay_workers_running"]) == 2
        assert float(figures["mailrelay_workers_scraped"]) == 2
        assert relay.stop() == 0
    finally:
        relay.cleanup()


def test_a_worker_killed_under_load_is_restarted_and_every_acknowledged_message_arrives(smtp_sink):
    sink = smtp_sink
    relay = RelayProcess(
        route_to(sink.port, extra='[server]\nworkers = 2\n[queue]\nretry_schedule = ["1s"]\n')
    )
    acked: list[str] = []
    senders = [Sender(relay.port, f"s{i}", acked, per_session=3, pause=0.02) for i in range(4)]
    try:
        start_workers(relay)
        victim = worker_pids(relay)[1]
        for s in senders:
            s.start()
        deadline = time.monotonic() + 30
        while len(acked) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(victim, signal.SIGKILL)
        relay.wait_log("killed by SIGKILL; restarting")
        deadline = time.monotonic() + 30
        while worker_pids(relay)[1] == victim and time.monotonic() < deadline:
            time.sleep(0.05)
        relay.wait_log("worker 1 running (pid", timeout=20)
        before = len(acked)
        while len(acked) < before + 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        for s in senders:
            s.stopping.set()
        for s in senders:
            s.join(15)
        expected = set(acked)
        assert len(expected) >= 40
        deadline = time.monotonic() + 60
        while not expected <= set(message_ids(sink)) and time.monotonic() < deadline:
            time.sleep(0.2)
        missing = expected - set(message_ids(sink))
        assert not missing, f"{len(missing)} acknowledged messages lost: {sorted(missing)[:5]}"
        assert worker_pids(relay)[1] != victim and alive(worker_pids(relay)[1])
    finally:
        for s in senders:
            s.stopping.set()
        relay.cleanup()


def test_sighup_reaches_every_worker_and_sigterm_stops_them_all(smtp_sink):
    sink = smtp_sink
    relay = RelayProcess(route_to(sink.port, extra="[server]\nworkers = 2\n"))
    try:
        start_workers(relay)
        pids = worker_pids(relay)
        assert relay.proc is not None
        relay.config.write_text(
            relay.config.read_text().replace('type = "static"', 'type = "static"\n# edited')
        )
        os.kill(relay.proc.pid, signal.SIGHUP)
        relay.wait_log("[worker 0] reloaded")
        relay.wait_log("[worker 1] reloaded")
        assert all(alive(p) for p in pids.values())  # reloaded, not restarted
        assert relay.stop() == 0
        log = relay.log_text()
        assert "all workers stopped" in log
        assert "worker 0 (pid" in log and "stopped: exit status 0" in log
        assert not any(alive(p) for p in pids.values())
    finally:
        relay.cleanup()


def test_the_cli_sees_every_shard_and_fewer_workers_take_over_the_mail_of_the_rest():
    down = free_port()  # the next hop is down: the mail stays queued
    relay = RelayProcess(
        route_to(down, extra='[server]\nworkers = 2\n[queue]\nretry_schedule = ["1h"]\n')
    )
    sink = SMTPSink(port=down)
    try:
        start_workers(relay)
        sent = 0
        for _ in range(5):
            smtp_source(relay.port, 6, 12)
            sent += 12
            ids = queued_ids(relay)
            if {shard_of(i) for i in ids} == {0, 1} and len(ids) == sent:
                break
        ids = queued_ids(relay)  # online: both workers asked, answers merged
        assert len(ids) == sent and ids == sorted(ids)
        assert {shard_of(i) for i in ids} == {0, 1}
        in_w1 = next(i for i in ids if shard_of(i) == 1)
        shown = cli(relay, "show", in_w1, "--json")
        assert shown.returncode == 0 and json.loads(shown.stdout)["queue_id"] == in_w1
        assert cli(relay, "hold", in_w1).returncode == 0
        summary = json.loads(cli(relay, "summary", "--json").stdout)
        assert summary["messages"] == sent and summary["held"] == 1
        assert relay.stop() == 0
        assert queued_ids(relay) == ids  # offline: every shard's directory read
        assert cli(relay, "release", in_w1).returncode == 0

        sink.start()  # the next hop comes back; the instance restarts with one worker
        relay.config.write_text(relay.config.read_text().replace("workers = 2", "workers = 1"))
        relay.start()
        relay.wait_log("drained into")
        flushed = cli(relay, "flush")  # they were deferred for an hour
        assert flushed.returncode == 0, flushed.stderr
        sink.wait_for(sent)
        got = Counter(received_ids(sink))
        assert set(got) == set(ids) and max(got.values()) == 1
        assert not (relay.spool / "w1").exists()
    finally:
        relay.cleanup()
        sink.cleanup()


def test_an_implicit_tls_listener_is_shared_by_the_workers(smtp_sink, tmp_path):
    import smtplib
    import ssl

    from tests.support.smtp.certs import make_certs

    ca, cert, key = make_certs(tmp_path, "relay.mailrelay.test")
    tls_port = free_port()
    relay = RelayProcess(route_to(smtp_sink.port, extra="[server]\nworkers = 2\n"))
    text = relay.config.read_text()
    relay.config.write_text(
        text.replace(
            f'listen = ["tcp:{relay.port}:interface=127.0.0.1"]',
            f'listen = ["tcp:{relay.port}:interface=127.0.0.1", '
            f'"ssl:{tls_port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"]',
        )
    )
    try:
        start_workers(relay)
        ctx = ssl.create_default_context(cafile=str(ca))
        for i in range(6):
            with smtplib.SMTP_SSL("127.0.0.1", tls_port, context=ctx, timeout=10) as c:
                c.sendmail(
                    "s@example.org", ["r@example.test"], f"Subject: tls {i}\r\n\r\nhi\r\n".encode()
                )
        raws = smtp_sink.wait_for(6)
        assert all(b"(using TLSv1." in raw and b"with ESMTPS id" in raw for raw in raws)
    finally:
        relay.cleanup()


def test_workers_stop_when_the_supervisor_is_killed(smtp_sink):
    relay = RelayProcess(route_to(smtp_sink.port, extra="[server]\nworkers = 2\n"))
    try:
        start_workers(relay)
        pids = worker_pids(relay)
        relay.kill()  # SIGKILL: no chance to pass anything on
        deadline = time.monotonic() + 20
        while any(alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in pids.values()), "orphaned workers kept running"
    finally:
        relay.cleanup()


def test_a_listener_the_supervisor_cannot_bind_stops_it_with_a_clear_error(smtp_sink):
    import socket

    taken, metrics = socket.socket(), socket.socket()
    for s in (taken, metrics):
        s.bind(("127.0.0.1", 0))
        s.listen(1)
    metrics_port = metrics.getsockname()[1]
    relay = RelayProcess(
        route_to(smtp_sink.port, extra="[server]\nworkers = 2\n")
        + f'[metrics]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\n',
        port=taken.getsockname()[1],
    )
    try:
        relay.start()  # "listening": the port is, by our socket
        assert relay.proc is not None and relay.proc.wait(timeout=20) != 0
        assert (
            f"server.listen[0]: 'tcp:{relay.port}:interface=127.0.0.1': cannot listen: Address "
            f"already in use" in relay.log_text()
        )
        assert (
            f"metrics.listen: 'tcp:{metrics_port}:interface=127.0.0.1': cannot listen: Address "
            f"already in use" in relay.log_text()
        )
        assert "worker 0 started" not in relay.log_text()
    finally:
        taken.close()
        metrics.close()
        relay.cleanup()
