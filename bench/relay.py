"""End-to-end relay benchmark: mailrelay next to Postfix (and accept-only servers) in one run.

    .venv/bin/python bench/relay.py [--messages 5000] [--runs 3] [--sessions 10,50] ...

The client is always Postfix's smtp-source, one new session per message, one recipient, 1 KiB:

    smtp-source -s SESSIONS -m N -l 1024 -N -f sender@example.org -t rcpt@example.test
                -M client.example.org 127.0.0.1:PORT

Scenarios (see bench/README.md):
  e2e      smtp-source → system → smtp-sink; clock stops when the sink has counted all N.
  accept   smtp-source → system, accept only; clock stops when smtp-source exits. mailrelay stores
           and fsyncs as always, its next hop never answers (delivery paused); aiosmtpd and
           twisted.mail discard; "mailrelay durable" is our protocol with one durable write per
           batch and nothing else (bench/mailrelay_durable_sink.py): the floor under the relay.
  sink     smtp-source → smtp-sink directly: the protocol ceiling of this machine.
  latency  our asyncio client: time from DATA's final dot to the 250 (p50/p90/p99).

Systems are measured alternately (run 1 of each, run 2 of each, ..., the order flipped every
other run); ``--workers 1,2`` makes mailrelay with one process and with two worker processes two
systems of the same run. Prints one table with each system's median and mailrelay's ratio to it.
Never asserts anything about time.

``--baseline REV`` adds the relay of commit REV (checked out into a temp git worktree, removed
afterwards) as one more system, run alternately with the working tree's; by default only the two
relays, scenarios e2e, accept and large. A second table gives each scenario's baseline figure, the
working tree's, their ratio and a flag when it is outside ±``--tolerance`` % (5).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _baseline import checkout, compare  # noqa: E402
from _baseline import format_text as compare_text  # noqa: E402
from _latency import LatencyResult, measure  # noqa: E402
from _peers import (  # noqa: E402
    HZ,
    ROOT,
    BlackHole,
    MailRelay,
    Postfix,
    PythonServer,
    Sink,
    System,
    binary,
)
from _profile import Profiler, summary  # noqa: E402

SCENARIOS = ("e2e", "accept", "sink", "latency", "large", "rss")
SYSTEMS = ("mailrelay", "postfix", "aiosmtpd", "twisted.mail", "mailrelay durable")
BASELINE_SCENARIOS = "e2e,accept,large"
T = TypeVar("T")


@attrs.define
class Run:
    seconds: float
    accept_seconds: float
    cpu_percent: float
    ok: bool = True


@attrs.define
class Row:
    scenario: str
    sessions: int
    system: str
    runs: list[Run] = attrs.Factory(list)
    latency: LatencyResult | None = None

    def rates(self, n: int) -> list[float]:
        return [n / r.seconds for r in self.runs if r.ok]

    def median(self, n: int) -> float | None:
        rates = self.rates(n)
        return statistics.median(rates) if rates else None


def source_args(port: int, sessions: int, n: int, size: int = 1024) -> list[str]:
    exe = binary("smtp-source")
    if exe is None:
        raise RuntimeError("smtp-source not found (Debian package postfix)")
    return [
        exe,
        "-s",
        str(sessions),
        "-m",
        str(n),
        "-l",
        str(size),
        "-N",
        "-f",
        "sender@example.org",
        "-t",
        "rcpt@example.test",
        "-M",
        "client.example.org",
        f"127.0.0.1:{port}",
    ]


def smtp_source(port: int, sessions: int, n: int, size: int = 1024) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        source_args(port, sessions, n, size),
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=max(120, n / 10 + n * size / 2**20),
    )
    return time.perf_counter() - t0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def big_message_rss(relay: Relay, size: int, timeout: float) -> tuple[float, float]:
    """Send one message of ``size`` bytes through the relay; (peak RSS growth MiB, seconds)."""
    pid = relay.system.pid()
    assert pid is not None
    base = peak = rss_kib(pid)
    t0 = time.perf_counter()
    proc = subprocess.Popen(source_args(relay.system.port, 1, 1, size), stdout=subprocess.DEVNULL)
    relay.expected += 1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        peak = max(peak, rss_kib(pid))
        if proc.poll() is not None and (proc.returncode or relay.sink.count() >= relay.expected):
            break
        time.sleep(0.01)
    if proc.wait(timeout=timeout) != 0:
        relay.expected -= 1
        raise RuntimeError(f"smtp-source failed sending {size} bytes")
    return (peak - base) / 1024, time.perf_counter() - t0


class Relay:
    """A relaying system with its own sink, so that 'all delivered' is the sink's count."""

    def __init__(self, name: str, make: Callable[[int], System]) -> None:
        self.name = name
        self.sink = Sink()
        self.expected = 0
        try:
            self.system = make(self.sink.port)
        except Exception:
            self.sink.stop()
            raise

    def send(self, sessions: int, n: int, timeout: float) -> Run:
        cpu0 = self.system.cpu()
        t0 = time.perf_counter()
        accept = smtp_source(self.system.port, sessions, n)
        self.expected += n
        ok = self.sink.wait_for(self.expected, timeout)
        elapsed = time.perf_counter() - t0
        cpu = (self.system.cpu() - cpu0) / HZ / elapsed * 100
        if not ok:
            got = self.sink.count()
            print(
                f"  {self.name}: sink got {got} of {self.expected} within {timeout:.0f}s",
                file=sys.stderr,
            )
            self.expected = got
        return Run(elapsed, accept, cpu, ok)

    def settle(self, timeout: float) -> None:
        """Wait for everything sent so far (e.g. by the latency client) to reach the sink."""
        if not self.sink.wait_for(self.expected, timeout):
            self.expected = self.sink.count()
        if isinstance(self.system, Postfix):
            deadline = time.monotonic() + timeout
            while self.system.queued() and time.monotonic() < deadline:
                time.sleep(0.05)

    def stop(self) -> None:
        try:
            self.system.stop()
        finally:
            self.sink.stop()


class Stoppable(Protocol):
    def stop(self) -> None: ...


S = TypeVar("S", bound=Stoppable)


def start(
    what: str, factory: Callable[[], S], started: list[Stoppable], required: bool = False
) -> S | None:
    """Start one system; if it fails, say why and go on without it (unless it is ``required``:
    with --baseline, a comparison missing either side would be a long run for nothing)."""
    try:
        obj = factory()
    except Exception as e:  # a missing package, not root, a crash at start-up: skip, say why
        if required:
            raise
        print(f"skipping {what}: {e}", file=sys.stderr)
        return None
    started.append(obj)
    return obj


def in_turn(items: list[T], run: int) -> list[T]:
    """The systems in the order of this run: flipped every other run, so neither side of a
    comparison always goes first (right after the other's burst of disk and CPU)."""
    return items if run % 2 == 0 else items[::-1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--messages", "-n", type=int, default=5000, help="messages per run (default 5000)"
    )
    ap.add_argument(
        "--runs", type=int, default=3, help="runs per system and session count (median)"
    )
    ap.add_argument("--sessions", default="10,50", help="concurrent sessions, comma-separated")
    ap.add_argument(
        "--scenarios",
        help="of " + ",".join(SCENARIOS) + f" (default: all; with --baseline {BASELINE_SCENARIOS})",
    )
    ap.add_argument(
        "--systems",
        help="which systems besides mailrelay to compare (mailrelay always runs; default: all, "
        "with --baseline none)",
    )
    ap.add_argument("--latency-messages", type=int, default=2000)
    ap.add_argument(
        "--large-messages", type=int, default=100, help="1 MiB messages per run (large)"
    )
    ap.add_argument("--rss-size", type=int, default=100, help="MiB of the one big message (rss)")
    ap.add_argument(
        "--workers",
        default="1",
        help="mailrelay's [server] workers, comma-separated: each value is a system of its own, "
        "measured alternately with the others; the first is 'mailrelay' (the ratios' "
        "reference), the others 'mailrelay wN' (default 1)",
    )
    ap.add_argument(
        "--baseline",
        metavar="REV",
        help="also run the relay of commit REV (a temp git worktree, removed after), alternating "
        "with the working tree's, and print both side by side with their ratio",
    )
    ap.add_argument(
        "--tolerance",
        type=float,
        default=5.0,
        help="with --baseline: flag a ratio further than this many %% from 1 (default 5)",
    )
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample mailrelay (end to end) with py-spy during the runs; stacks to DIR",
    )
    ap.add_argument("--rst", action="store_true", help="print the table as an RST list-table too")
    args = ap.parse_args(argv)
    if args.scenarios is None:
        args.scenarios = BASELINE_SCENARIOS if args.baseline else ",".join(SCENARIOS)
    if args.systems is None:
        args.systems = "" if args.baseline else ",".join(SYSTEMS)
    for option, given, known in (
        ("--systems", args.systems, SYSTEMS),
        ("--scenarios", args.scenarios, SCENARIOS),
    ):
        unknown = {x for x in given.split(",") if x} - set(known)
        if unknown:  # a misspelt name would silently measure nothing
            ap.error(f"{option}: unknown {', '.join(sorted(unknown))} (known: {', '.join(known)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        baseline: tuple[str, Path] | None = None
        if args.baseline:
            try:
                path, short = stack.enter_context(checkout(args.baseline))
            except RuntimeError as e:  # not a commit, not a git checkout
                print(f"relay.py: --baseline: {e}", file=sys.stderr)
                return 2
            baseline = (f"baseline {short}", path)
            print(f"baseline {args.baseline} ({short}) checked out in {path}", file=sys.stderr)
        return bench(args, baseline)


def bench(args: argparse.Namespace, baseline: tuple[str, Path] | None) -> int:
    """Start the systems, measure, stop them, print. ``baseline``: (label, source tree)."""
    sessions = [int(s) for s in args.sessions.split(",") if s]
    workers = [int(w) for w in args.workers.split(",") if w]
    labels = {w: "mailrelay" if i == 0 else f"mailrelay w{w}" for i, w in enumerate(workers)}
    # the relays under test: (label, workers, source tree)
    trees = [(labels[w], w, ROOT) for w in workers]
    if baseline is not None:
        trees.append((baseline[0], workers[0], baseline[1]))
    scenarios = [s for s in args.scenarios.split(",") if s]
    systems = {s for s in args.systems.split(",") if s}
    n = args.messages
    e2e_timeout = max(60.0, n / 20)

    started: list[Stoppable] = []
    relays: list[Relay] = []
    accepts: list[System] = []
    sink: Sink | None = None
    rows: dict[tuple[str, int, str], Row] = {}
    rss_rows: list[tuple[str, ...]] = []
    profilers: list[Profiler] = []
    collapsed: list[Path] = []

    def row(scenario: str, s: int, system: str) -> Row:
        return rows.setdefault((scenario, s, system), Row(scenario, s, system))

    try:
        if {"e2e", "latency", "rss"} & set(scenarios):
            for name, w, tree in trees:
                make = partial(Relay, name, partial(e2e_relay, name, w, tree))
                relay = start(name, make, started, required=baseline is not None)
                if relay is not None:
                    relays.append(relay)
            if "postfix" in systems:
                relay = start("postfix", partial(Relay, "postfix", Postfix), started)
                if relay is not None:
                    relays.append(relay)
        if {"accept", "large"} & set(scenarios):
            for name, w, tree in trees:
                # a black hole each: one relay's stalled deliveries must not fill the other's
                # backlog (listen(1)) and change how its delivery attempts wait
                hole = start(f"black hole for {name}", BlackHole, started)
                if hole is None:
                    continue
                mr = start(
                    f"{name} (accept only)",
                    partial(MailRelay, hole.port, "1h", name, w, tree),
                    started,
                    required=baseline is not None,
                )
                if mr is not None:
                    accepts.append(mr)
            for name, script in (
                ("aiosmtpd", "aiosmtpd_sink.py"),
                ("twisted.mail", "twisted_mail_sink.py"),
                ("mailrelay durable", "mailrelay_durable_sink.py"),
            ):
                if name in systems:
                    server = start(name, partial(PythonServer, name, script), started)
                    if server is not None:
                        accepts.append(server)
        if "sink" in scenarios:
            sink = start("smtp-sink", Sink, started)

        print(f"warming up ({args.warmup} messages each)", file=sys.stderr)
        for relay in relays:
            relay.send(10, args.warmup, e2e_timeout)
        for srv in accepts:
            smtp_source(srv.port, 10, args.warmup)

        if args.profile:
            for relay in relays:
                pid = relay.system.pid()
                if relay.name == "mailrelay" and pid:
                    profilers.append(Profiler(pid, args.profile, "mailrelay-e2e"))
            for srv in accepts:
                pid = srv.pid()
                if isinstance(srv, MailRelay) and srv.tree == ROOT and srv.workers == 1 and pid:
                    profilers.append(Profiler(pid, args.profile, "mailrelay-accept"))
        for s in sessions:
            for r in range(args.runs):
                if "e2e" in scenarios:
                    for relay in in_turn(relays, r):
                        run = relay.send(s, n, e2e_timeout)
                        row("end to end", s, relay.name).runs.append(run)
                        print(
                            f"  e2e     s={s} run {r + 1} {relay.name:13} "
                            f"{n / run.seconds:7.0f} msg/s "
                            f"(accept {n / run.accept_seconds:.0f}/s, cpu {run.cpu_percent:.0f}%)",
                            file=sys.stderr,
                        )
                if "accept" in scenarios:
                    for srv in in_turn(accepts, r):
                        cpu0 = srv.cpu()
                        secs = smtp_source(srv.port, s, n)
                        run = Run(secs, secs, (srv.cpu() - cpu0) / HZ / secs * 100)
                        row("accept only", s, srv.name).runs.append(run)
                        print(
                            f"  accept  s={s} run {r + 1} {srv.name:13} {n / secs:7.0f} msg/s "
                            f"(cpu {run.cpu_percent:.0f}%)",
                            file=sys.stderr,
                        )
                if sink is not None:
                    cpu0 = sink.cpu()
                    t0 = time.perf_counter()
                    smtp_source(sink.port, s, n)
                    secs = time.perf_counter() - t0
                    row("sink (ceiling)", s, "smtp-sink").runs.append(
                        Run(secs, secs, (sink.cpu() - cpu0) / HZ / secs * 100)
                    )
            if "latency" in scenarios:
                for relay in relays:
                    result = measure(relay.system.port, s, args.latency_messages)
                    relay.expected += len(result.samples_ms)
                    row("latency", s, relay.name).latency = result
                    print(
                        f"  latency s={s} {relay.name:13} p50 {result.percentile(50):.1f} "
                        f"p90 {result.percentile(90):.1f} p99 {result.percentile(99):.1f} ms "
                        f"({result.errors} errors)",
                        file=sys.stderr,
                    )
                    relay.settle(e2e_timeout)
            if "large" in scenarios:
                for r in range(args.runs):
                    for srv in in_turn(accepts, r):
                        cpu0 = srv.cpu()
                        secs = smtp_source(srv.port, s, args.large_messages, 2**20)
                        run = Run(secs, secs, (srv.cpu() - cpu0) / HZ / secs * 100)
                        row("accept 1 MiB", s, srv.name).runs.append(run)
                        print(
                            f"  1 MiB   s={s} run {r + 1} {srv.name:13} "
                            f"{args.large_messages / secs:7.1f} msg/s "
                            f"{run.cpu_percent * secs * 10 / args.large_messages:.1f} ms CPU/MiB",
                            file=sys.stderr,
                        )
        if "rss" in scenarios:
            for relay in relays:
                if relay.name == "mailrelay":
                    try:
                        growth, secs = big_message_rss(relay, args.rss_size * 2**20, e2e_timeout)
                    except RuntimeError as e:
                        print(f"  rss: {e}", file=sys.stderr)
                        continue
                    rss_rows.append(
                        (
                            "RSS growth, one big message",
                            "1",
                            "mailrelay",
                            f"{growth:.1f} MiB for {args.rss_size} MiB",
                            f"{secs:.1f} s",
                            "",
                            "",
                            "",
                        )
                    )
                    print(
                        f"  rss     {relay.name} +{growth:.1f} MiB ({secs:.1f}s)", file=sys.stderr
                    )
    finally:
        collapsed = [p.stop() for p in profilers]
        for obj in reversed(started):
            try:
                obj.stop()
            except Exception as e:
                print(f"stopping {obj}: {e}", file=sys.stderr)

    table = render(list(rows.values()), n, args.large_messages) + rss_rows
    print()
    print(
        f"{n} messages of 1 KiB per run, median of {args.runs} run(s); "
        "ratio = mailrelay ÷ system (msg/s), system ÷ mailrelay (p99 latency, CPU per MiB): "
        "> 1 means mailrelay is better"
    )
    print(format_text(table))
    if args.rst:
        print()
        print(format_rst(table))
    if baseline is not None:
        print()
        print(
            f"{baseline[0]} ({args.baseline}) against the working tree ({ROOT}), median of "
            f"{args.runs} alternating run(s); ratio = working tree ÷ baseline, flagged outside "
            f"±{args.tolerance:g}%"
        )
        verdict = compare(
            medians(list(rows.values()), n, args.large_messages),
            baseline[0],
            "mailrelay",
            args.tolerance / 100,
        )
        print(compare_text(verdict))
    for path in collapsed:
        print()
        print(summary(path))
    if args.json:
        args.json.write_text(
            json.dumps([attrs.asdict(r) for r in rows.values()], indent=1, default=str)
        )
    return 0


def e2e_relay(label: str, workers: int, tree: Path, sink_port: int) -> MailRelay:
    return MailRelay(sink_port, label=label, workers=workers, tree=tree)


def medians(rows: list[Row], n: int, n_large: int) -> dict[tuple[str, int, str], float]:
    """Each row's headline figure: median msg/s, or median ms CPU per MiB for 1 MiB messages."""
    out: dict[tuple[str, int, str], float] = {}
    for r in rows:
        if r.scenario == "accept 1 MiB" and r.runs:
            out[(r.scenario, r.sessions, r.system)] = cpu_ms_per_mib(r, n_large)
        elif r.latency is None:
            median = r.median(n)
            if median is not None:
                out[(r.scenario, r.sessions, r.system)] = median
    return out


HEADER = (
    "scenario",
    "sessions",
    "system",
    "figure",
    "runs",
    "accept msg/s",
    "CPU % (1 core)",
    "ratio",
)


def cpu_ms_per_mib(row: Row, n: int) -> float:
    """CPU milliseconds per MiB received, median over the runs (n messages of 1 MiB each)."""
    return statistics.median(x.cpu_percent * x.seconds * 10 / n for x in row.runs)


def render(rows: list[Row], n: int, n_large: int = 0) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for r in rows:
        if r.scenario == "accept 1 MiB":
            mine_row = next(
                (
                    x
                    for x in rows
                    if x.scenario == r.scenario
                    and x.sessions == r.sessions
                    and x.system == "mailrelay"
                ),
                None,
            )
            cpu = cpu_ms_per_mib(r, n_large)
            ratio = (
                f"{cpu / cpu_ms_per_mib(mine_row, n_large):.2f}"
                if mine_row is not None and r.system != "mailrelay"
                else ""
            )
            out.append(
                (
                    r.scenario,
                    str(r.sessions),
                    r.system,
                    f"{r.median(n_large):.1f} msg/s, {cpu:.1f} ms CPU/MiB",
                    "/".join(f"{n_large / x.seconds:.1f}" for x in r.runs),
                    "",
                    f"{statistics.median(x.cpu_percent for x in r.runs):.0f}",
                    ratio,
                )
            )
            continue
        if r.latency is not None:
            lat = r.latency
            mine_lat = next(
                (
                    x.latency
                    for x in rows
                    if x.scenario == "latency"
                    and x.sessions == r.sessions
                    and x.system == "mailrelay"
                ),
                None,
            )
            ratio = (
                f"{lat.percentile(99) / mine_lat.percentile(99):.2f}"
                if mine_lat is not None and mine_lat.samples_ms and r.system != "mailrelay"
                else ""
            )
            figure = (
                f"p50 {lat.percentile(50):.1f} / p90 {lat.percentile(90):.1f} / "
                f"p99 {lat.percentile(99):.1f} ms"
            )
            out.append(
                (
                    r.scenario,
                    str(r.sessions),
                    r.system,
                    figure,
                    f"{len(lat.samples_ms)} msgs, {lat.errors} errors",
                    "",
                    "",
                    ratio,
                )
            )
            continue
        median = r.median(n)
        mine = next(
            (
                x.median(n)
                for x in rows
                if x.scenario == r.scenario and x.sessions == r.sessions and x.system == "mailrelay"
            ),
            None,
        )
        ratio = f"{mine / median:.2f}" if mine and median and r.system != "mailrelay" else ""
        runs = "/".join(f"{n / x.seconds:.0f}" if x.ok else "timeout" for x in r.runs)
        accept = statistics.median(n / x.accept_seconds for x in r.runs) if r.runs else 0
        cpu = statistics.median(x.cpu_percent for x in r.runs) if r.runs else 0
        figure = f"{median:.0f} msg/s" if median else "failed"
        out.append(
            (
                r.scenario,
                str(r.sessions),
                r.system,
                figure,
                runs,
                f"{accept:.0f}" if r.scenario == "end to end" else "",
                f"{cpu:.0f}",
                ratio,
            )
        )
    return out


def format_text(table: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in [HEADER, *table]) for i in range(len(HEADER))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [HEADER, *table]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_rst(table: list[tuple[str, ...]]) -> str:
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in [HEADER, *table]:
        lines.append(f"   * - {row[0]}")
        lines.extend(f"     - {c}" for c in row[1:])
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
