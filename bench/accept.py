"""Accept-only throughput of the ESMTP server side: mailrelay vs aiosmtpd vs twisted.mail, one run.

    .venv/bin/python bench/accept.py [--messages 5000] [--large 200] [--runs 3]

Each system accepts and discards (nothing stored), one process each, default reactor/loop;
"mailrelay durable" is the same server with each message made durable before its 250 and
nothing else (the floor under the relay's accept only, see mailrelay_durable_sink.py). The
client is Postfix's smtp-source (one new session per message, one recipient). Scenarios: 1 KiB at
10 and 50 sessions, 1 MiB at 10 and 50 sessions. Systems alternate run by run; the table gives the
median msg/s, the server's CPU per message (1 KiB) or per MiB (1 MiB), and mailrelay's ratio to
each (above 1: mailrelay better). Nothing here asserts a time; it is not run by ``make test``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peers import HZ, PythonServer, binary, cpu_ticks  # noqa: E402

SYSTEMS = {
    "mailrelay": "mailrelay_sink.py",
    "mailrelay durable": "mailrelay_durable_sink.py",
    "aiosmtpd": "aiosmtpd_sink.py",
    "twisted.mail": "twisted_mail_sink.py",
}


def smtp_source(port: int, sessions: int, n: int, size: int) -> float:
    exe = binary("smtp-source")
    if exe is None:
        raise SystemExit("smtp-source not found (Debian package postfix)")
    args = [
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
    t0 = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, timeout=600)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5000, help="messages per 1 KiB run")
    ap.add_argument("--large", type=int, default=200, help="messages per 1 MiB run (0: none)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    args = ap.parse_args(argv)
    names = [s for s in args.systems.split(",") if s]
    servers: dict[str, PythonServer] = {}
    scenarios = [
        (size, sessions, n)
        for size, sessions, n in [
            (1024, 10, args.messages),
            (1024, 50, args.messages),
            (2**20, 10, args.large),
            (2**20, 50, args.large),
        ]
        if n > 0
    ]  # --large 0: the 1 KiB runs only
    results: dict[tuple[int, int, str], list[tuple[float, float]]] = {}
    try:
        for name in names:  # started inside the try: one that fails to start stops the others
            servers[name] = PythonServer(name, SYSTEMS[name])
        for server in servers.values():  # warm-up
            smtp_source(server.port, 10, 200, 1024)
        for size, sessions, n in scenarios:
            for _ in range(args.runs):
                for name, server in servers.items():
                    pid = server.pid()
                    assert pid is not None
                    before = cpu_ticks(pid)
                    elapsed = smtp_source(server.port, sessions, n, size)
                    cpu = (cpu_ticks(pid) - before) / HZ
                    results.setdefault((size, sessions, name), []).append((n / elapsed, cpu / n))
    finally:
        for server in servers.values():
            server.stop()

    header = ["message", "sessions", "system", "msg/s (median)", "runs", "server CPU", "ratio"]
    rows = []
    for size, sessions, _ in scenarios:
        ours = results.get((size, sessions, "mailrelay"))
        for name in names:
            runs = results[(size, sessions, name)]
            rate = statistics.median(r for r, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            cpu_text = (
                f"{cpu * 1000:.3f} ms/msg"
                if size < 2**20
                else f"{cpu * 1000 * 2**20 / size:.1f} ms/MiB"
            )
            ratio = ""
            if ours is not None and name != "mailrelay":
                our_rate = statistics.median(r for r, _ in ours)
                our_cpu = statistics.median(c for _, c in ours)
                ratio = f"{our_rate / rate:.2f}x msg/s, {cpu / our_cpu:.2f}x CPU" if our_cpu else ""
            label = "1 KiB" if size < 2**20 else "1 MiB"
            rows.append(
                [
                    label,
                    str(sessions),
                    name,
                    f"{rate:,.0f}",
                    " ".join(f"{r:,.0f}" for r, _ in runs),
                    cpu_text,
                    ratio,
                ]
            )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
