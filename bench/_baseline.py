"""``relay.py --baseline REV``: another commit's relay beside the working tree's, and the verdict.

The baseline is checked out with ``git worktree add --detach`` into a temp directory (removed
afterwards, also on Ctrl-C); its relay runs with that directory first on ``PYTHONPATH``, the
working tree's relay with the working tree first, under the same interpreter and venv. Only the
relay's code differs: the harness, peers and client are the working tree's.

The comparison is one row per scenario and session count: the baseline's median, the working
tree's, their ratio (working tree ÷ baseline) and a flag when that ratio is outside the tolerance.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from _peers import ROOT

#: (scenario as relay.py names its rows, the figure compared, higher is better)
COMPARED = {
    "end to end": ("msg/s", True),
    "accept only": ("msg/s", True),
    "accept 1 MiB": ("ms CPU/MiB", False),
}
HEADER = ("scenario", "sessions", "baseline", "working tree", "ratio", "flag")


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


@contextmanager
def checkout(rev: str) -> Iterator[tuple[Path, str]]:
    """Check ``rev`` out into a temp worktree; yield (its path, its short hash); remove it after."""
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    short = _git("rev-parse", "--short", commit)
    path = Path(tempfile.mkdtemp(prefix=f"bench-baseline-{short}-"))
    _git("worktree", "add", "--detach", str(path), commit)
    try:
        yield path, short
    finally:
        try:
            _git("worktree", "remove", "--force", str(path))
        except RuntimeError as e:  # e.g. removed by hand meanwhile: still drop its bookkeeping
            print(f"baseline worktree: {e}", file=sys.stderr)
            shutil.rmtree(path, ignore_errors=True)
            _git("worktree", "prune")


def compare(
    figures: dict[tuple[str, int, str], float], baseline: str, tree: str, tolerance: float
) -> list[tuple[str, ...]]:
    """Rows of the verdict table from medians keyed by (scenario, sessions, system)."""
    out: list[tuple[str, ...]] = []
    keys = sorted(
        {(scenario, s) for scenario, s, _ in figures if scenario in COMPARED},
        key=lambda k: (list(COMPARED).index(k[0]), k[1]),
    )
    for scenario, s in keys:
        unit, higher_better = COMPARED[scenario]
        old = figures.get((scenario, s, baseline))
        new = figures.get((scenario, s, tree))
        if not old or not new:
            out.append((scenario, str(s), _fmt(old, unit), _fmt(new, unit), "", "no figure"))
            continue
        ratio = new / old
        flag = ""
        if abs(ratio - 1) > tolerance:
            better = (ratio > 1) == higher_better
            flag = f"OUTSIDE ±{tolerance:.0%}: {'better' if better else 'WORSE'}"
        out.append((scenario, str(s), _fmt(old, unit), _fmt(new, unit), f"{ratio:.3f}", flag))
    return out


def _fmt(value: float | None, unit: str) -> str:
    if not value:
        return "failed"
    return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"


def format_text(table: Sequence[tuple[str, ...]]) -> str:
    rows = [HEADER, *table]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
