"""Sampling profile of a running mailrelay with py-spy, summarised as the hottest functions.

py-spy attaches to the PID from outside (no change to the process), samples its stacks and
writes them in collapsed form ("a;b;c N" per line); we keep that file and a flame graph, and
print where the samples end up (self time) and which functions they pass through (total time).
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
from pathlib import Path


class Profiler:
    def __init__(self, pid: int, out_dir: Path, name: str, rate: int = 200) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        out_dir.mkdir(parents=True, exist_ok=True)
        self.collapsed = out_dir / f"{name}.collapsed.txt"
        self.proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--output",
                str(self.collapsed),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> Path:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.collapsed


def summary(collapsed: Path, top: int = 20) -> str:
    own: collections.Counter[str] = collections.Counter()
    through: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            through[frame] += count
    if not total:
        return f"no samples in {collapsed}"
    lines = [f"{total} samples ({collapsed})", "self time:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append("total time (mailrelay frames):")
    ours = [(f, n) for f, n in through.most_common() if "mailrelay" in f][:top]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in ours]
    return "\n".join(lines)
